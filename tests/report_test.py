"""The benchmarks' shared statistics: paired differences and paired speed ratios."""

import math
import os

import numpy as np
import pytest

from benchmarks import report


def test_paired_difference_by_hand():
    # Differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half 4.302653 / sqrt(3).
    mean, low, high = report.paired_difference([3, 5, 7], [2, 3, 4])
    half = 4.302653 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-6)
    assert report.paired_difference([1.0], [0.5]) == (0.5, None, None)


def test_paired_speed_ratio_is_the_geometric_mean_of_time_ratios():
    # B takes 1.1x, 1.2x, 1.0x A's time in three rounds: A is faster.
    a = np.array([0.5, 0.4, 0.6])
    b = a * np.array([1.1, 1.2, 1.0])
    mean, low, high = report.paired_speed_ratio(a, b)
    assert mean == pytest.approx((1.1 * 1.2 * 1.0) ** (1 / 3))
    assert low < mean < high
    logs = np.log([1.1, 1.2, 1.0])
    half = 4.302653 * logs.std(ddof=1) / math.sqrt(3)
    assert (low, high) == pytest.approx(
        (math.exp(logs.mean() - half), math.exp(logs.mean() + half))
    )
    assert report.paired_speed_ratio([1.0], [2.0]) == (2.0, None, None)


def test_write_block_replaces_between_markers_and_appends_when_absent(tmp_path):
    path = tmp_path / "BENCH.md"
    path.write_text("# Bench\n\nprose\n")
    begin, end = "<!-- t: begin -->", "<!-- t: end -->"
    report.write_block(str(path), begin, end, "| a |", "cmd one", "## Table")
    first = path.read_text()
    assert first.startswith("# Bench\n\nprose\n\n## Table\n\n<!-- t: begin -->\ncmd one; ")
    assert first.endswith("\n\n| a |\n<!-- t: end -->\n")
    path.write_text(first + "\nafter\n")
    report.write_block(str(path), begin, end, "| b |", "cmd two", "## Table")
    second = path.read_text()
    assert second.count(begin) == 1 and "| a |" not in second and "| b |" in second
    assert second.endswith("<!-- t: end -->\n\nafter\n") and "cmd two; " in second
    assert [p.name for p in tmp_path.iterdir()] == ["BENCH.md"]  # no temporary left


def test_write_json_round_trips(tmp_path):
    path = str(tmp_path / "r.json")
    report.write_json(path, {"b": [1, 2.5], "a": None})
    assert report.read_json(path) == {"a": None, "b": [1, 2.5]}
    assert report.read_json(str(tmp_path / "absent.json"), default=7) == 7


def test_semi_study_table_pairs_each_arm_with_scratch_by_seed():
    from benchmarks import semi_study

    def cell(top1, lr=0.05):
        return {"top1": top1, "learning_rate": lr, "labelled": 600}

    results = {"cells": {}}
    for seed, (invp, inst, scratch) in enumerate([(0.80, 0.78, 0.70), (0.82, 0.77, 0.71)]):
        for arm, top1 in (("recipe", invp), ("instance", inst), ("scratch", scratch)):
            results["cells"][f"d/0.01/seed{seed}/{arm}"] = cell(top1)
    text = semi_study.table(results, "d", [0.01, 0.1], ["0", "1", "2"])
    rows = {line.split(" | ")[1]: line for line in text.splitlines()[2:]}
    assert set(rows) == {"InvP-pretrained", "instance-pretrained", "from scratch (random init)"}
    # InvP - scratch: differences 0.10 and 0.11, paired over the seeds both have.
    mean, low, high = report.paired_difference([0.80, 0.82], [0.70, 0.71])
    assert f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] above 0" in rows["InvP-pretrained"]
    assert "| 1% (600) |" in rows["InvP-pretrained"] and "| 0,1 |" in rows["InvP-pretrained"]
    assert rows["from scratch (random init)"].endswith("| - |")
    assert "10%" not in text  # no cell of that fraction has finished


def test_machine_names_the_gpus_nvidia_smi_lists(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    line = "echo 'NVIDIA H100 80GB HBM3, 81559 MiB'\n"
    fake.write_text("#!/bin/sh\n" + line + line)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert report.gpus() == "2 x NVIDIA H100 80GB HBM3, 81559 MiB each"
    assert report.machine().endswith(", 2 x NVIDIA H100 80GB HBM3, 81559 MiB each")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert report.gpus() == "no GPU"
