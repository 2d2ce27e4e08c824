"""Invariance Propagation (Wang et al., NeurIPS 2020) in TensorFlow/Keras."""

import os
import sys

__version__ = "0.1.0"


def _program():
    """The running command's name: invp-evaluate, or invp_tf.evaluate under `python -m`."""
    first = os.path.basename(sys.argv[0]) if sys.argv else ""
    if first.endswith(".py"):
        return f"{__name__}.{first[:-3]}"
    return first if first.startswith("invp-") else __name__


def _interrupted_in_one_line(exc_type, value, tb, previous=sys.excepthook):
    """Ctrl-C that no command handler caught (pressed while TensorFlow is still importing,
    which takes seconds): one line, not a traceback. Python still exits as interrupted
    (status 130); every other exception goes to the hook that was there before."""
    if issubclass(exc_type, KeyboardInterrupt):
        print(f"{_program()}: interrupted (Ctrl-C)", file=sys.stderr)
        return
    previous(exc_type, value, tb)


# Only when this package is the program (`python -m invp_tf.X`, whose package is imported
# while sys.argv[0] is still "-m", or an invp-* console script), never for a program that
# merely imports it.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]).startswith("invp-")):
    sys.excepthook = _interrupted_in_one_line
