#!/usr/bin/env bash
# Sets up (scripts/setup.sh test,hub) and runs the default test suite and the
# formatter/linter checks (hub: tests/export_test.py fine-tunes the export with
# hub.KerasLayer under tf-keras). Slow tests: .venv/bin/python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,hub
.venv/bin/ruff check invp_tf tests benchmarks scripts
.venv/bin/ruff format --check invp_tf tests benchmarks scripts
.venv/bin/python -m pytest -q "$@"
