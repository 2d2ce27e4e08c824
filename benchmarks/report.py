"""What every benchmark row carries: the machine it ran on, and where rows go."""

import datetime
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine():
    """One-line description of this machine: core count, CPU model and its GPUs."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}, {gpus()}"


def gpus():
    """The GPUs nvidia-smi lists ("8 x NVIDIA H100 80GB HBM3, 81559 MiB each"), or "no GPU"."""
    from invp_tf import memory_plan  # pylint: disable=g-import-not-at-top (TensorFlow)

    names = memory_plan.nvidia_smi("name,memory.total")
    if not names:
        return "no GPU"
    name, _, memory = names[0].partition(",")
    return f"{len(names)} x {name.strip()}, {memory.strip()} each"


def append_rows(output, rows):
    """Adds `| date | ... |` rows to `output` (relative to the repo).

    They go at the end of the file's first table, the one whose header starts
    `| date |`, so that they stay rows of it whatever prose follows; at the end of
    the file if it has no such table.
    """
    path = os.path.join(REPO, output)
    today = datetime.date.today()
    new = [f"| {today} | {row} |\n" for row in rows]
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| date |")), None)
    if header is None:
        lines.extend(new)
    else:
        end = header
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if end and not lines[end - 1].endswith("\n"):
            lines[end - 1] += "\n"
        lines[end:end] = new
    _write(path, "".join(lines))


def write_block(output, begin, end, text, command, heading):
    """Replaces the block between the markers `begin` and `end` of `output` (relative to the
    repo) by `text` under a line naming `command`, this machine and today's date; appends
    `heading` and the block when the markers are absent."""
    path = os.path.join(REPO, output)
    with open(path) as f:
        content = f.read()
    block = f"{begin}\n{command}; {machine()}; updated {time.strftime('%Y-%m-%d')}\n\n"
    block += f"{text}\n{end}"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    _write(path, content)


def _write(path, text):
    """The library's one atomic write (a temporary file, then a rename)."""
    from invp_tf import workdir  # pylint: disable=g-import-not-at-top  # TensorFlow: only here

    workdir.write_atomically(path, text)


def train_command(flagfile, workdir, *extra_flags):
    """The argv of `python -m invp_tf.train` with this interpreter, a recipe and a workdir."""
    return [
        sys.executable,
        "-m",
        "invp_tf.train",
        f"--flagfile={flagfile}",
        f"--workdir={workdir}",
        *extra_flags,
    ]


def train(flagfile, workdir, *extra_flags, quiet=False):
    """Runs `python -m invp_tf.train` in a fresh process; returns (metrics rows, wall seconds).

    quiet: capture the run's output instead of showing it.
    """
    command = train_command(flagfile, workdir, *extra_flags)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=quiet)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], seconds


def read_json(path, default=None):
    """The JSON value in `path`, or `default` when the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    """Writes `value` to `path` atomically (a temporary file, then a rename)."""
    _write(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def paired_difference(a, b):
    """Mean and 95% t-interval of the paired differences a - b (None bounds for one pair)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from scipy import stats  # pylint: disable=g-import-not-at-top  # scikit-learn's dependency

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def paired_speed_ratio(seconds_a, seconds_b):
    """Speed of A over B (B's seconds / A's) from paired rounds: geometric mean and its
    95% t-interval over the rounds' log ratios (None bounds for one round)."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    mean, low, high = paired_difference(np.log(seconds_b), np.log(seconds_a))
    return tuple(None if x is None else float(np.exp(x)) for x in (mean, low, high))


def diff_cell(mean, low, high):
    """A paired difference (paired_difference's output) as a table cell with its verdict."""
    if low is None:
        return f"{mean:+.4f} (1 seed, no CI)"
    verdict = "above 0" if low > 0 else "below 0" if high < 0 else "not separable"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] {verdict}"
