#!/usr/bin/env bash
# Sets up (scripts/setup.sh test) and runs the default test suite and the
# formatter/linter checks. Slow tests: .venv/bin/python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check invp_tf tests benchmarks
.venv/bin/ruff format --check invp_tf tests benchmarks
.venv/bin/python -m pytest -q "$@"
