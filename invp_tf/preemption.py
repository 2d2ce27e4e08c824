"""Stopping a training cleanly: SIGTERM (a preemption) and Ctrl-C (SIGINT).

During training TF's PreemptionCheckpointHandler (`training._preemption_callbacks`) takes
SIGTERM over: after the signal every worker saves the same step's state and stops, and
`training.Preempted` names the checkpoint. Ctrl-C joins it (`save_on_ctrl_c`): the same save,
then `training.Interrupted`; a second Ctrl-C stops at once, keeping the last checkpoint
(`stopped_at_once`). Both signals get their previous handlers back when training ends
(`handlers_restored`). The resumed run is the uninterrupted one, bit for bit.
"""

import contextlib
import signal
import threading

import keras
from absl import logging

from invp_tf import workdir as workdir_lib


class SaveIfPreempted(keras.callbacks.Callback):
    """After every step, lets TF's PreemptionCheckpointHandler save and stop all workers."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def on_train_batch_end(self, batch, logs=None):
        self.handler.save_checkpoint_if_preempted()


def _main_thread():
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handlers_restored():
    """Gives SIGTERM and SIGINT their handlers of before the block back when it ends."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if _main_thread():  # signal handlers belong to the main thread
            for number, handler in previous.items():
                if handler is not None:  # None: not set from Python, nothing to give back
                    signal.signal(number, handler)


def save_on_ctrl_c(on_sigterm, interrupted):
    """Makes Ctrl-C (SIGINT) call `on_sigterm`, the preemption handler's SIGTERM handler: the
    state is saved after the next steps and training stops. Appends the signal to the list
    `interrupted`; a second Ctrl-C raises KeyboardInterrupt at once."""
    if not _main_thread():
        return

    def on_sigint(number, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(number)
        logging.info(
            "Ctrl-C: saving after the next steps, then stopping (Ctrl-C again stops at once, "
            "keeping the last checkpoint)."
        )
        on_sigterm(signal.SIGTERM, frame)

    signal.signal(signal.SIGINT, on_sigint)


def stopped_at_once(workdir):
    """The line of a Ctrl-C that stopped training without a save: what is kept."""
    try:
        kept = workdir_lib.checkpoint_paths(workdir)[:1]
    except Exception:  # noqa: BLE001 (the line must not fail: the next run names the problem)
        kept = []
    if not kept:
        return "interrupted (Ctrl-C) before the first checkpoint; rerun the same command to start"
    return (
        f"interrupted (Ctrl-C) without a save; {kept[0]} is kept; rerun the same command to "
        "resume from it"
    )
