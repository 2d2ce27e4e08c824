"""Tests of invp_tf.protocols that need no trained run (the protocols themselves: evaluate_test)."""

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
