#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and trains the Fashion-MNIST demo of
# configs/fashion_mnist.flags into runs/demo (rerun to resume).
# Usage: bash scripts/demo.sh [WORKDIR [FLAG...]], e.g. a short try:
#        bash scripts/demo.sh runs/try --epochs=1 --train_examples=4000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The recipe trains in bfloat16, which pays only where the CPU has bfloat16 units (AMX or
# AVX512-BF16); elsewhere it is emulated and can be slower than float32, so the demo trains
# in float32 there. A FLAG given on the command line (--mixed_precision, e.g. on a GPU)
# still decides. INVP_TF_CPUINFO: the file read instead of /proc/cpuinfo (tests).
if grep -qswE "amx_bf16|avx512_bf16" "${INVP_TF_CPUINFO:-/proc/cpuinfo}"; then
  precision=--mixed_precision
else
  precision=--nomixed_precision
  echo "demo: no bfloat16 units (AMX or AVX512-BF16) on this CPU: training in float32"
fi
.venv/bin/python -m invp_tf.train --flagfile=configs/fashion_mnist.flags \
  --workdir="${1:-runs/demo}" "$precision" "${@:2}"
