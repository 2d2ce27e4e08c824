"""scripts/gpu_check.sh --smoke: every step of the GPU check, tiny, on this machine."""

import os
import subprocess
import sys

from benchmarks import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_writes_a_row_per_measurement_naming_the_machine(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", f"--out={out}"],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = (out / "rows.md").read_text().splitlines()
    whats = [row.split(" | ")[1] for row in rows]
    # The step with each search without XLA and the exact one under it, the graph build,
    # the pipeline and the training run.
    assert whats.count("train step") == 4, whats
    assert sum("--jit=on" in row for row in rows) == 1
    assert "input pipeline" in whats and "training from an image folder" in whats
    assert any(w.startswith("kNN graph") or "graph" in w for w in whats), whats
    for row in rows:
        assert row.startswith("| ") and row.endswith(" |")
        assert report.machine() in row
    assert "machine: " + report.machine() in result.stdout
    assert "memory plan per replica" in (out / "plan.txt").read_text()
    assert "images per CPU-second" in (out / "input_pipeline.log").read_text()
