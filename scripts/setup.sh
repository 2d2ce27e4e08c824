#!/usr/bin/env bash
# Sets up a fresh machine: the dataset-fashion-mnist Debian package and a C++
# compiler (each when absent) and a virtual environment in .venv with invp-tf
# and its extras.
# Usage: bash scripts/setup.sh [EXTRAS], e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
sudo_cmd=""
if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
# TF 2.20 and scann 1.4.2 have wheels for Python 3.9-3.13; the code needs 3.10 (setup.py).
if ! python3 -c "import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))"; then
  echo "error: python3 is $(python3 -V 2>&1); invp-tf needs Python 3.10-3.13 (TensorFlow 2.20" \
    "has no wheels for newer ones): put such a python3 first on PATH, then rerun" >&2
  exit 1
fi
# Debian and Ubuntu ship Python without venv (ensurepip): install python3-venv when
# `python3 -m venv` cannot work.
if [ ! -d .venv ] && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  if command -v apt-get >/dev/null; then
    $sudo_cmd apt-get install -y python3-venv >/dev/null 2>&1 || {
      $sudo_cmd apt-get update >/dev/null 2>&1 &&
        $sudo_cmd apt-get install -y python3-venv >/dev/null 2>&1; } || true
  fi
  if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
    echo "error: python3 -m venv does not work; install python3-venv (Debian/Ubuntu) or a" \
      "Python 3.10-3.13 with venv, then rerun" >&2
    exit 1
  fi
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  # Tests do not need it (they skip the real-data check); the demo stops with a
  # message naming the missing file.
  $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || {
    $sudo_cmd apt-get update >/dev/null 2>&1 &&
      $sudo_cmd apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "warning: could not install the Debian package dataset-fashion-mnist" >&2
fi
if ! command -v "${CXX:-c++}" >/dev/null; then
  # The native kernels (invp_tf/top_mask.cc: the exact TopM search; invp_tf/views.cc: the
  # views' resize and blur) are compiled on first use; without a C++ compiler TensorFlow
  # ops run instead (the same sets and views, the search about 3x, the views 1.6x slower).
  $sudo_cmd apt-get install -y g++ >/dev/null 2>&1 || {
    $sudo_cmd apt-get update >/dev/null 2>&1 && $sudo_cmd apt-get install -y g++ >/dev/null 2>&1; } ||
    echo "warning: no C++ compiler (install g++): the exact TopM search and the views will be slower" >&2
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/pip install --quiet -e ".[$extras]"
else
  .venv/bin/pip install --quiet -e .
fi
