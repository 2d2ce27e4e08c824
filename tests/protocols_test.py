"""Tests of invp_tf.protocols that need no trained run (the protocols themselves: evaluate_test)."""

import numpy as np
import pytest

from invp_tf import protocols


def test_best_block_is_chosen_on_held_out_never_on_test():
    # stage3 has the higher test top-1, stage4 the higher held-out top-1 at its chosen C.
    results = {
        "stage3": {"top1": 0.90, "C": 1.0, "held_out_top1": {"0.1": 0.80, "1.0": 0.85}},
        "stage4": {"top1": 0.88, "C": 0.1, "held_out_top1": {"0.1": 0.87, "1.0": 0.86}},
    }
    best = protocols._best(results)
    assert best["block"] == "stage4"
    assert best["chosen_on"] == "held-out"
    assert best["held_out_score"] == 0.87
    assert best["top1"] == 0.88  # reported, not used to choose


def test_no_best_block_without_a_held_out_score():
    # kNN and the SGD probes score no held-out part: nothing is chosen.
    results = {"stage4": {"top1": 0.9}, "embedding": {"top1": 0.8, "held_out_top1": {"1": 0.7}}}
    assert protocols._best(results) is None


def test_tuning_rows_avoid_the_labelled_and_the_evaluated_rows(tiny_idx_dir):
    held_out_split = protocols.Splits(
        "fashion_mnist", str(tiny_idx_dir), train_examples=0, label_fraction=0.25, held_out=0.2,
        seed=0,
    )  # fmt: skip
    held_out_split.test = held_out_split.train  # as for a dataset without a test split
    held_out_split.test_rows = np.arange(0, 64, 5)
    rows = held_out_split.tuning_rows(0.2, seed=0)
    assert len(rows) > 0
    assert not set(rows) & set(held_out_split.train_rows)
    assert not set(rows) & set(held_out_split.test_rows)


def test_learning_rates_are_checked_before_any_work():
    with pytest.raises(protocols.EvaluationError, match="applies to semi and finetune"):
        protocols.make_settings("/tmp/run", "linear", learning_rates="0.1,1").validate()
    with pytest.raises(protocols.EvaluationError, match="not a comma-separated list"):
        protocols.make_settings("/tmp/run", "semi", learning_rates="0.1,x").validate()
    with pytest.raises(protocols.EvaluationError, match="must list learning rates > 0"):
        protocols.make_settings("/tmp/run", "semi", learning_rates="0.1,-1").validate()
