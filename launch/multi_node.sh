#!/usr/bin/env bash
# Train on several machines with the deepspeed launcher (passwordless ssh from this node to every host, the same
# checkout and .venv path everywhere, shards on a shared filesystem or object store).
#   HOSTFILE=hosts.txt bash launch/multi_node.sh configs/vit_b16_text.yaml data.train=s3://bucket/{000000..099999}.tar
# hosts.txt, one line per node:   node-a slots=8
#                                 node-b slots=8
# MASTER_ADDR defaults to this host; NUM_NODES to the lines of the hostfile; RESUME=latest continues a run.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: multi_node.sh CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines of 'host slots=N')}
NUM_NODES=${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}
MASTER_ADDR=${MASTER_ADDR:-$(hostname -I | awk '{print $1}')}
resume=(); [ -n "${RESUME:-}" ] && resume=(--resume "$RESUME")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
exec .venv/bin/deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module accord.train --config "$config" "${resume[@]}" "$@"
