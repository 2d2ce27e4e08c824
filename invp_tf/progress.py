"""The progress lines of a training: each epoch-boundary step with its seconds, each epoch
with an ETA (`training` logs them through one EpochProgress)."""

import time

from absl import logging


class EpochProgress:
    """Logs "epoch e/E" lines: each epoch-boundary step with its seconds, each epoch with an ETA.

    Epochs are counted from 1 here (metrics.jsonl and checkpoints count finished epochs).
    """

    def __init__(self, first_epoch, epochs):
        self.first_epoch, self.epochs = first_epoch, epochs
        self.start = time.perf_counter()

    def begin(self, epoch, what):
        logging.info("epoch %d/%d: %s ...", epoch + 1, self.epochs, what)
        return time.perf_counter()

    def end(self, epoch, what, start):
        seconds = time.perf_counter() - start
        logging.info("epoch %d/%d: %s took %.1f s", epoch + 1, self.epochs, what, seconds)
        return seconds

    def epoch_done(self, epoch, row):
        seconds_per_epoch = (time.perf_counter() - self.start) / (epoch + 1 - self.first_epoch)
        left = (self.epochs - epoch - 1) * seconds_per_epoch
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        knn = row.get("knn_top1")
        logging.info(
            "epoch %d/%d done: loss %s, kNN top-1 %s; %.0f s per epoch, ETA %s (%s left)",
            epoch + 1,
            self.epochs,
            "-" if row.get("loss") is None else f"{row['loss']:.4f}",
            "-" if knn is None else f"{knn:.4f}",
            seconds_per_epoch,
            finish,
            f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min",
        )
