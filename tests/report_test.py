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
