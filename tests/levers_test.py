"""benchmarks.levers: one record per (lever, seed), never retrained, gaps to the right target."""

import json
import os
import subprocess

from benchmarks import levers


def _fake_train(calls):
    """A stand-in for `python -m invp_tf.train`: writes a 3-epoch metrics.jsonl."""

    def run(command, **kwargs):
        calls.append(command)
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        os.makedirs(workdir, exist_ok=True)
        rows = [
            {"epoch": 0, "knn_top1": None, "train_seconds": 10.0, "images_per_second": 100.0},
            {"epoch": 1, "knn_top1": 0.80, "train_seconds": 12.0, "images_per_second": 110.0},
            {"epoch": 2, "knn_top1": 0.85, "train_seconds": 14.0, "images_per_second": 120.0},
        ]
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        assert kwargs["check"] and kwargs["cwd"] == levers.report.REPO
        return subprocess.CompletedProcess(command, 0)

    return run


def test_run_one_records_the_final_knn_gap_and_times_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(levers.subprocess, "run", _fake_train(calls))
    monkeypatch.setattr(levers.report, "machine", lambda: "test machine")
    monkeypatch.setattr(levers, "RESULTS", str(tmp_path / "levers.json"))
    results = {"runs": {}}
    runs = str(tmp_path / "runs")
    r = levers.run_one("demo", "bf16_e18", 3, runs, results)
    assert calls[0][3:] == [
        "--flagfile=configs/fashion_mnist.flags",
        f"--workdir={runs}/demo/bf16_e18/seed3",
        "--temperature=0.1",
        "--nomixed_precision",
        "--epochs=14",
        "--mixed_precision",
        "--epochs=18",
        "--seed=3",
    ]
    assert r["knn_top1"] == 0.85 and r["knn_curve"] == [[2, 0.80], [3, 0.85]]
    assert r["gap_to_target"] == round(0.85 - 0.8448, 4)
    assert r["fit_seconds"] == 36.0 and r["images_per_second"] == 110.0
    assert not r["resumed"]
    assert json.load(open(levers.RESULTS))["runs"]["demo/bf16_e18/seed3"]["knn_top1"] == 0.85
    # Finished: never retrained.
    assert levers.run_one("demo", "bf16_e18", 3, runs, results) == r and len(calls) == 1


def test_resumed_runs_are_marked_and_the_table_lists_finished_levers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(levers.subprocess, "run", _fake_train([]))
    monkeypatch.setattr(levers.report, "machine", lambda: "test machine")
    monkeypatch.setattr(levers, "RESULTS", str(tmp_path / "levers.json"))
    results = {"runs": {}}
    levers.run_one("long", "tau007", 0, str(tmp_path / "runs"), results)
    assert results["runs"]["long/tau007/seed0"]["gap_to_target"] == round(0.85 - 0.8692, 4)
    assert results["runs"]["long/tau007/seed0"]["flags"][1:] == ["--temperature=0.07", "--seed=0"]
    os.makedirs(tmp_path / "runs" / "demo" / "base" / "seed0" / "checkpoints")
    resumed = levers.run_one("demo", "base", 0, str(tmp_path / "runs"), results)
    assert resumed["resumed"]
    text = levers.table(results, "demo", ["base", "tau02_bf16_e18"], ["0"])
    rows = text.splitlines()
    assert rows[2].startswith("| base | the demo before") and "(resumed)" in rows[2]
    assert "| 0.8500 (2: 0.8000, 3: 0.8500) | +0.0052 |" in rows[2]
    assert len([r for r in rows if r.startswith("| ")]) == 2  # header and base; no tau02
    assert "Target: 0.8448" in text
