#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and trains the Fashion-MNIST demo of
# configs/fashion_mnist.flags into runs/demo (rerun to resume).
# Usage: bash scripts/demo.sh [WORKDIR [FLAG...]], e.g. a short try:
#        bash scripts/demo.sh runs/try --epochs=1 --train_examples=4000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m invp_tf.train --flagfile=configs/fashion_mnist.flags \
  --workdir="${1:-runs/demo}" "${@:2}"
