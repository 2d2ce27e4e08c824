"""scripts/demo.sh: bfloat16 only where the CPU has bfloat16 units; the user's flags decide."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clone(tmp_path):
    """A copy of scripts/demo.sh with a setup.sh that does nothing and a .venv python that
    prints the arguments it gets."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "demo.sh"), tmp_path / "scripts")
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "ARGS $*"\n')
    python.chmod(0o755)
    return tmp_path


def _demo(clone, cpu_flags, *args):
    cpuinfo = clone / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {cpu_flags}\n")
    out = subprocess.run(
        ["bash", "scripts/demo.sh", *args],
        cwd=clone,
        env={**os.environ, "INVP_TF_CPUINFO": str(cpuinfo)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("ARGS "))
    return out, line.split()[1:]


@pytest.mark.parametrize("units", ["avx512_bf16", "amx_bf16 amx_tile"])
def test_bfloat16_where_the_cpu_has_units(clone, units):
    out, argv = _demo(clone, f"avx512f {units}")
    assert argv == [
        "-m",
        "invp_tf.train",
        "--flagfile=configs/fashion_mnist.flags",
        "--workdir=runs/demo",
        "--mixed_precision",
    ]
    assert "float32" not in out


def test_float32_without_units_and_the_users_flags_come_last(clone):
    out, argv = _demo(clone, "avx2 avx512f avx512bw", "runs/try", "--epochs=1", "--mixed_precision")
    assert "no bfloat16 units" in out
    assert argv[3:] == [
        "--workdir=runs/try",
        "--nomixed_precision",
        "--epochs=1",
        "--mixed_precision",
    ]
