"""Tests for invp_tf.command: how a command ends on a bad value or on Ctrl-C."""

import sys

import pytest
from absl import flags

from invp_tf import command


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
