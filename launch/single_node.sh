#!/usr/bin/env bash
# Train on all GPUs of this machine (or N CPU ranks) with the deepspeed launcher.
#   bash launch/single_node.sh configs/vit_b16_text.yaml data.train=/data/laion/{000000..009999}.tar
#   GPUS=4 bash launch/single_node.sh configs/tiny.yaml data.train=shards/     # 4 ranks (CPU: 4 processes)
# Extra arguments are key=value config overrides; RESUME=latest continues the run in output_dir.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: single_node.sh CONFIG [key=value ...]}; shift
if [ -z "${GPUS:-}" ]; then
  GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 2)
fi
resume=(); [ -n "${RESUME:-}" ] && resume=(--resume "$RESUME")
quiet=(--log_level error)  # the launcher's info lines; --verbose (or ACCORD_VERBOSE=1) keeps them
{ [[ " $* " == *" --verbose "* ]] || [ "${ACCORD_VERBOSE:-0}" != 0 ]; } && quiet=()
# no NVIDIA GPU: say CPU, rather than have DeepSpeed warn in every process that it found no accelerator
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/deepspeed "${quiet[@]}" --num_gpus "$GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module accord.train --config "$config" "${resume[@]}" "$@"
