"""What every benchmark row carries: the machine it ran on, and where rows go."""

import datetime
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine():
    """One-line description of this machine: core count and CPU model."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}, no GPU"


def append_rows(output, rows):
    """Appends markdown table rows `| date | ... |` to `output` (relative to the repo)."""
    today = datetime.date.today()
    with open(os.path.join(REPO, output), "a") as f:
        f.writelines(f"| {today} | {row} |\n" for row in rows)
