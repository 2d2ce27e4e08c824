#!/usr/bin/env bash
# Sets up a fresh machine: the dataset-fashion-mnist Debian package (when
# absent) and a virtual environment in .venv with invp-tf and its extras.
# Usage: bash scripts/setup.sh [EXTRAS], e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  # Tests do not need it (they skip the real-data check); the demo stops with a
  # message naming the missing file.
  $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || {
    $sudo_cmd apt-get update >/dev/null 2>&1 &&
      $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "warning: could not install the Debian package dataset-fashion-mnist" >&2
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/pip install --quiet -e ".[$extras]"
else
  .venv/bin/pip install --quiet -e .
fi
