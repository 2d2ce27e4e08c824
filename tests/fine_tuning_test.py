"""invp_tf.fine_tuning: the learning rate is chosen on held-out rows, never on the test split.

(The fine-tuning protocols end to end: evaluate_test.)"""

from invp_tf import fine_tuning
from invp_tf import protocols


class _FakeModel:
    def __init__(self, test_top1):
        self.test_top1 = test_top1

    def evaluate(self, dataset, verbose=0, return_dict=True):
        assert dataset == "test"
        return {"top1": self.test_top1, "top5": 1.0}


def test_tuned_fine_tune_chooses_the_learning_rate_on_held_out_rows_never_on_test():
    # Held-out top-1 peaks at 0.1; the test split would have chosen 0.01.
    held = {0.01: 0.70, 0.1: 0.80, 1.0: 0.75}
    test = {0.01: 0.95, 0.1: 0.85, 1.0: 0.60}
    starts = []

    def tune(encoder, *, test_dataset, learning_rate, callbacks):
        assert test_dataset == "held" and encoder == "fresh"
        return {"top1": held[learning_rate], "train_loss": 0.5}, _FakeModel(test[learning_rate])

    result = fine_tuning.tuned_fine_tune(
        tune,
        lambda: starts.append(1) or "fresh",
        learning_rates=[0.01, 0.1, 1.0],
        held_ds="held",
        test_ds="test",
        seed=0,
        log_dir="/tmp/unused-tuning-board",
    )
    assert len(starts) == 3  # every learning rate starts from the same fresh weights
    assert result["learning_rate"] == 0.1
    assert result["top1"] == 0.85  # reported, not used to choose
    assert result["held_out_top1"] == {"0.01": 0.70, "0.1": 0.80, "1": 0.75}
    # The best block logic sees the fine-tuned network as chosen on held-out rows.
    assert protocols._best({"network": result})["held_out_score"] == 0.80
