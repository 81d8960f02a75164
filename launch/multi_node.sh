#!/usr/bin/env bash
# Train on several machines with the deepspeed launcher. Shards and output_dir on a filesystem every node shares
# (checkpoints and the loader state of every rank are read back from there on resume), the same checkout and
# .venv path everywhere.
#   HOSTFILE=hosts.txt bash launch/multi_node.sh configs/vit_b16_text.yaml data.train=s3://bucket/{000000..099999}.tar
# hosts.txt, one line per node:   node-a slots=8
#                                 node-b slots=8
# With ssh (default): run it once, on the first host; the launcher starts every node over passwordless ssh.
# Without ssh: run it on every node with NODE_RANK=0..N-1 and the same MASTER_ADDR (the first node's address).
# MASTER_ADDR defaults to this host; NUM_NODES to the lines of the hostfile; RESUME=latest continues a run.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: multi_node.sh CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines of 'host slots=N')}
NUM_NODES=${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}
MASTER_ADDR=${MASTER_ADDR:-$(hostname -I | awk '{print $1}')}
resume=(); [ -n "${RESUME:-}" ] && resume=(--resume "$RESUME")
no_ssh=(); [ -n "${NODE_RANK:-}" ] && no_ssh=(--no_ssh --node_rank "$NODE_RANK")
quiet=(--log_level error)  # the launcher's info lines; --verbose (or ACCORD_VERBOSE=1) keeps them
{ [[ " $* " == *" --verbose "* ]] || [ "${ACCORD_VERBOSE:-0}" != 0 ]; } && quiet=()
# no NVIDIA GPU: say CPU, rather than have DeepSpeed warn in every process that it found no accelerator
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/deepspeed "${quiet[@]}" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" "${no_ssh[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module accord.train --config "$config" "${resume[@]}" "$@"
