"""invp-import of a full-size ResNet-50 checkpoint in the authors' format: time and peak memory.

    python -m benchmarks.import_checkpoint [--rows=1281167] [--format=zip] [--directory=/tmp]

Writes a checkpoint as the authors' `main.py` saves it ({'epoch', 'state_dict' with
`module.` keys, 'optimizer', 'memory_banks', 'neigh'}) with `torch_checkpoint.save`: random
weights of every key and shape of the full-size ResNet-50 manifest
(tests/data/authors_checkpoints/full_size_state_dict_shapes.json), a bank of --rows random unit
rows [rows, 128] float32 and a graph [rows, 4] int64 (ImageNet's 1.28M by default). Then it
runs `python -m invp_tf.import_checkpoint` on it in a child process and reports its wall
seconds, CPU seconds and peak resident memory (the child's VmHWM, sampled) against the
file's size, beside the peak of a child that only imports the same modules (TensorFlow's own
share), and the peak private (anonymous) memory of both, sampled every 20 ms from /proc:
RSS also counts pages mapped from files, TensorFlow's libraries and the checkpoint's storages.
Prints one BENCHMARKS.md row. The files go to --directory and are deleted afterwards.
"""

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app
from absl import flags

from invp_tf import torch_checkpoint

_ROWS = flags.DEFINE_integer("rows", 1_281_167, "Rows of the bank and the graph.")
_FORMAT = flags.DEFINE_enum("format", "zip", torch_checkpoint.FORMATS, "torch format written.")
_MANIFEST = flags.DEFINE_string("manifest", "resnet50_linear", "Network of the manifest.")
_DIRECTORY = flags.DEFINE_string("directory", tempfile.gettempdir(), "Where the files go.")

REPO = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "tests" / "data" / "authors_checkpoints" / "full_size_state_dict_shapes.json"


def write_checkpoint(path, manifest, rows, file_format, seed=0):
    """The authors' checkpoint dict with random values, written by torch_checkpoint.save."""
    rng = np.random.default_rng(seed)
    shapes = json.loads(MANIFESTS.read_text())[manifest]
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(123, np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            state[key] = rng.standard_normal(shape, dtype=np.float32) * 0.05
    bank = rng.standard_normal((rows, 128), dtype=np.float32)
    for start in range(0, rows, 1 << 16):  # L2-normalised in place, chunk by chunk
        chunk = bank[start : start + (1 << 16)]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    neigh = rng.integers(0, rows, size=(rows, 4), dtype=np.int64)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0]}]}
    torch_checkpoint.save(
        {
            "epoch": 800,
            "state_dict": state,
            "optimizer": optimizer,
            "memory_banks": bank,
            "neigh": neigh,
        },
        path,
        file_format,
    )


def _sample_private_memory(pid, peak, interval=0.02):
    """Keeps peak["anon"] = the largest RssAnon (private memory, bytes) of process `pid` seen
    every `interval` seconds (RSS also counts file pages mapped from disk: TensorFlow's shared
    libraries, the memory-mapped checkpoint, which the kernel can drop and processes share),
    and peak["hwm"] = its VmHWM, the peak RSS of its own process image. (The child's
    ru_maxrss would also carry this process's RSS across the fork and exec that started it.)"""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(("RssAnon:", "VmHWM:")):
                        key = "anon" if line.startswith("RssAnon:") else "hwm"
                        peak[key] = max(peak.get(key, 0), int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return
        if peak.get("done"):
            return
        time.sleep(interval)


def _measured(command):
    """(wall seconds, CPU seconds, peak RSS bytes, sampled peak private bytes, output) of a
    child process."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {}
    sampler = threading.Thread(target=_sample_private_memory, args=(process.pid, peak))
    sampler.start()
    output = process.stdout.read()
    peak["done"] = True
    sampler.join()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"{command} failed:\n{output[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, peak["hwm"], peak["anon"], output


def main(argv):
    del argv
    folder = pathlib.Path(tempfile.mkdtemp(prefix="invp_import_", dir=_DIRECTORY.value))
    try:
        path = folder / f"{_MANIFEST.value}.pth"
        start = time.perf_counter()
        write_checkpoint(path, _MANIFEST.value, _ROWS.value, _FORMAT.value)
        write_seconds = time.perf_counter() - start
        size = path.stat().st_size
        workdir = folder / "run"
        load_before = os.getloadavg()[0]
        wall, cpu, peak, private, output = _measured(
            [
                sys.executable,
                "-m",
                "invp_tf.import_checkpoint",
                f"--checkpoint={path}",
                f"--workdir={workdir}",
            ]
        )
        code = "import invp_tf.import_checkpoint, invp_tf.pretrained, tensorflow as tf; tf.zeros(1)"
        _, _, baseline, baseline_private, _ = _measured([sys.executable, "-c", code])
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        lines = [line for line in output.splitlines() if line.startswith(("imported", "bank"))]
        print("\n".join(lines))
        print(f"file written in {write_seconds:.1f} s")
        command = " ".join(["python -m benchmarks.import_checkpoint", *sys.argv[1:]])
        cpu_name = next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if "model name" in line
            ),
            "unknown CPU",
        )
        machine = (
            f"{os.cpu_count()} cores, {cpu_name}, no GPU, shared (load avg {load_before:.1f} "
            f"before / {os.getloadavg()[0]:.1f} after)"
        )
        contents = (
            f"{_FORMAT.value} format: {_MANIFEST.value} weights, bank {_ROWS.value} x 128 "
            f"float32, graph {_ROWS.value} x 4 int64"
        )
        memory = (
            f"peak RSS {peak / 1e6:.0f} MB ({peak / size:.2f}x the file; the same modules alone "
            f"{baseline / 1e6:.0f} MB), peak private memory {private / 1e6:.0f} MB "
            f"({private / size:.2f}x; modules alone {baseline_private / 1e6:.0f} MB)"
        )
        result = (
            f"file {size / 1e6:.0f} MB ({contents}), written in {write_seconds:.0f} s: import "
            f"{wall:.1f} s wall, {cpu:.1f} s CPU; {memory}"
        )
        what = f"invp-import, full-size ResNet-50 (at {commit})"
        print(f"| {datetime.date.today()} | {what} | `{command}` | {machine} | {result} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
