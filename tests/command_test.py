"""Tests for invp_tf.command: how a command ends on a bad value or on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest
from absl import flags

from invp_tf import command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _define(flag_values):
    holder = flags.DEFINE_integer("command_test_n", 1, "A test flag.", flag_values=flag_values)
    return {"command_test_n": holder}


def test_ctrl_c_outside_training_ends_in_one_line(monkeypatch, capsys):
    def main(argv):
        del argv
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["invp-something", "--command_test_n=3"])
    with pytest.raises(SystemExit) as stop:
        command.Flags(_define).run(main)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{__name__}: interrupted (Ctrl-C)"]
    assert flags.FLAGS.command_test_n == 3  # the flags were parsed into absl's FLAGS


def test_exits_on_names_the_program_and_the_error(capsys):
    with pytest.raises(SystemExit) as stop, command.exits_on("invp_tf.x", ValueError):
        raise ValueError("--batch_size=0 must be positive")
    assert stop.value.code == 1
    assert capsys.readouterr().err == "invp_tf.x: error: --batch_size=0 must be positive\n"
    with pytest.raises(KeyError), command.exits_on("invp_tf.x", ValueError):
        raise KeyError("others pass through")


def _python(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_ctrl_c_while_a_command_imports_tensorflow_is_one_line():
    # One second in, `python -m invp_tf.evaluate` is importing TensorFlow (seconds); were it
    # already past that, the command's own handler gives the same line.
    proc = _python("-m", "invp_tf.evaluate", "--workdir=/nonexistent")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err  # a shell shows it as status 130
    assert err.strip().splitlines()[-1] == "invp_tf.evaluate: interrupted (Ctrl-C)", err
    assert "Traceback" not in err


def test_a_program_that_imports_the_package_keeps_pythons_traceback():
    proc = _python("-c", "import invp_tf; raise KeyboardInterrupt")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert "Traceback" in err and "interrupted (Ctrl-C)" not in err


def test_console_script_names_itself(monkeypatch):
    import invp_tf  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(sys, "argv", ["/venv/bin/invp-export", "--workdir=x"])
    assert invp_tf._program() == "invp-export"  # pylint: disable=protected-access
    monkeypatch.setattr(sys, "argv", ["/src/invp_tf/embed.py"])
    assert invp_tf._program() == "invp_tf.embed"  # pylint: disable=protected-access
