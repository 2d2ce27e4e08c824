#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and trains the Fashion-MNIST demo of
# configs/fashion_mnist.flags into runs/demo (rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m invp_tf.train --flagfile=configs/fashion_mnist.flags --workdir="${1:-runs/demo}"
