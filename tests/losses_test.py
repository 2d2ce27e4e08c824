"""invp_losses against a NumPy oracle written from the method (README, "The method, as
implemented"), and against the authors' reference case (tests/data/golden/, see its README)."""

import dataclasses
import inspect
import os

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import losses

# In the repository, so that every clone runs these tests (they never skip).
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", "authors_reference_case.npz")


def _logsumexp(x):
    x = np.asarray(x, np.float64)
    top = x.max()
    return top + np.log(np.exp(x - top).sum())


def _propagated_set(graph, i, layers):
    members, frontier = set(), {i}
    for _ in range(layers):
        frontier = set(graph[sorted(frontier)].reshape(-1).tolist())
        members |= frontier
    members.discard(i)
    return sorted(members)


def oracle(
    v,
    indices,
    bank,
    graph,
    *,
    temperature,
    num_background,
    num_layers,
    num_positives,
    background="approx",
    positive_mode="propagation",
    hard_positives=True,
    hard_negatives=True,
    num_knn_positives=None,
):
    """Literal per-anchor transcription of the method (README), float64."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = (v @ bank.T) / temperature  # [B, N]
    n = bank.shape[0]
    m = num_background if hard_negatives else n
    instance, invariance = [], []
    for b, i in enumerate(indices):
        order = np.argsort(-s[b], kind="stable")
        top = order[:m]
        union = sorted(set(top.tolist()) | {int(i)})
        instance.append(_logsumexp(s[b, union]) - s[b, i])
        if positive_mode == "propagation":
            members = _propagated_set(graph, int(i), num_layers)
        else:
            kk = num_knn_positives or sum(graph.shape[1] ** h for h in range(1, num_layers + 1))
            members = [j for j in order[: kk + 1] if j != i][:kk]
        members = np.array(members)
        if hard_positives and len(members) > num_positives:
            hard = members[np.argsort(s[b, members], kind="stable")[:num_positives]]
        else:
            hard = members
        if background == "approx":
            back = [j for j in top if j != i]
        else:
            back = sorted(
                (set(top.tolist()) - set(members.tolist()) - {int(i)}) | set(hard.tolist())
            )
        invariance.append(_logsumexp(s[b, back]) - _logsumexp(s[b, hard]))
    return np.array(instance), np.array(invariance)


def _random_case(seed=0, n=60, d=8, b=6, k=3):
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n, d))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    # Clustered so that propagated sets overlap and dedup matters.
    v = bank[rng.choice(n, b, replace=False)] + 0.3 * rng.standard_normal((b, d))
    indices = rng.choice(n, b, replace=False)
    sims = bank @ bank.T
    np.fill_diagonal(sims, -np.inf)
    graph = np.argsort(-sims, axis=1)[:, :k]
    return v, indices, bank, graph


OPTIONS = [
    dict(),
    dict(background="exact"),
    dict(hard_positives=False),
    dict(hard_negatives=False),
    dict(positive_mode="knn"),
    dict(positive_mode="knn", num_knn_positives=5, background="exact"),
    dict(num_layers=1),
    dict(num_layers=2, num_positives=100),
    dict(num_background=1),  # the exact search's edge cases: M = 1 and M close to N
    dict(num_background=59, background="exact"),
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_matches_numpy_oracle(options):
    v, indices, bank, graph = _random_case()
    kwargs = dict(temperature=0.2, num_background=20, num_layers=3, num_positives=7)
    kwargs.update(options)
    instance, invariance = losses.invp_losses(
        v.astype(np.float32), indices, bank.astype(np.float32), graph, **kwargs
    )
    want_instance, want_invariance = oracle(v, indices, bank, graph, **kwargs)
    np.testing.assert_allclose(instance.numpy(), want_instance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invariance.numpy(), want_invariance, rtol=1e-5, atol=1e-5)
    assert instance.dtype == tf.float32 and invariance.dtype == tf.float32


def test_exact_background_is_nonnegative_and_approx_can_be_negative():
    v, indices, bank, graph = _random_case(seed=3)
    # M = 2: one background row against up to 39 positives, so approx goes below 0.
    kwargs = dict(temperature=1.0, num_background=2, num_layers=3, num_positives=40)
    _, exact = losses.invp_losses(v, indices, bank, graph, background="exact", **kwargs)
    _, approx = losses.invp_losses(v, indices, bank, graph, background="approx", **kwargs)
    assert np.all(exact.numpy() >= -1e-6)
    assert np.any(approx.numpy() < 0)


def test_hand_worked_case():
    # Bank of 4 rows on a circle; anchor 0 with v = bank[0]; graph is a ring.
    angles = np.array([0.0, 0.5, 1.0, 2.0])
    bank = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    graph = np.array([[1], [2], [3], [0]], np.int32)
    v = bank[:1]
    instance, invariance = losses.invp_losses(
        v, [0], bank, graph, temperature=1.0, num_background=2, num_layers=2, num_positives=1
    )
    s = np.cos(angles)  # s_0j with tau = 1
    # TopM = {0, 1}; N(0) = {1, 2}; H = {2} (lowest s); B = TopM - {0} = {1}.
    assert instance.numpy()[0] == pytest.approx(np.log(np.exp(s[0]) + np.exp(s[1])) - s[0], 1e-6)
    assert invariance.numpy()[0] == pytest.approx(s[1] - s[2], 1e-6)


def test_float16_embeddings_do_not_overflow():
    v, indices, bank, graph = _random_case()
    instance, invariance = losses.invp_losses(
        tf.constant(v, tf.float16),
        indices,
        bank.astype(np.float32),
        graph,
        temperature=0.07,
        num_background=20,
        num_layers=3,
        num_positives=7,
    )
    assert np.all(np.isfinite(instance.numpy())) and np.all(np.isfinite(invariance.numpy()))


def test_gradient_is_finite_and_reaches_embeddings_only():
    v, indices, bank, graph = _random_case()
    v = tf.Variable(v.astype(np.float32))
    bank = tf.Variable(bank.astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        instance, invariance = losses.invp_losses(
            v,
            indices,
            bank,
            graph,
            temperature=0.07,
            num_background=20,
            num_layers=3,
            num_positives=7,
            background="exact",
        )
        total = tf.reduce_sum(instance + invariance)
    grad = tape.gradient(total, v)
    assert np.all(np.isfinite(grad.numpy())) and np.abs(grad.numpy()).sum() > 0
    assert tape.gradient(total, bank) is None


def test_runs_inside_tf_function_with_xla():
    v, indices, bank, graph = _random_case()
    fn = tf.function(
        lambda v: losses.invp_losses(
            v,
            indices,
            bank.astype(np.float32),
            graph,
            temperature=0.2,
            num_background=20,
            num_layers=3,
            num_positives=7,
        ),
        jit_compile=True,
    )
    instance, invariance = fn(v.astype(np.float32))
    want_instance, want_invariance = oracle(
        v, indices, bank, graph, temperature=0.2, num_background=20, num_layers=3, num_positives=7
    )
    np.testing.assert_allclose(instance.numpy(), want_instance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invariance.numpy(), want_invariance, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "option, value", [("background", "nope"), ("background_search", "approximate")]
)
def test_unknown_option_value_is_rejected(option, value):
    v, indices, bank, graph = _random_case()
    with pytest.raises(ValueError, match=option):
        losses.invp_losses(
            v,
            indices,
            bank,
            graph,
            temperature=0.2,
            num_background=20,
            num_layers=3,
            num_positives=7,
            **{option: value},
        )


def _clustered_case(n=6000, d=32, b=64, seed=0):
    """A bank of 60 clusters and a batch of noisy views of some of its rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, d))
    bank = centres[rng.integers(0, 60, n)] + 0.5 * rng.standard_normal((n, d))
    bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32)
    indices = rng.choice(n, b, replace=False)
    v = (bank[indices] + 0.1 * rng.standard_normal((b, d))).astype(np.float32)
    sims = bank @ bank.T
    np.fill_diagonal(sims, -np.inf)
    graph = np.argpartition(-sims, 4, axis=1)[:, :4]
    return v, indices, bank, graph


def _losses_and_gradient(v, indices, bank, graph, **kwargs):
    v = tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch(v)
        instance, invariance = losses.invp_losses(v, indices, bank, graph, **kwargs)
        total = tf.reduce_mean(instance) + 0.6 * tf.reduce_mean(invariance)
    return instance.numpy(), invariance.numpy(), tape.gradient(total, v).numpy()


# --- The authors' reference case -------------------------------------------


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def _golden_losses(golden, **options):
    kwargs = dict(
        temperature=float(golden["t"]),
        num_background=int(golden["M"]),
        num_layers=int(golden["l"]),
        num_positives=int(golden["P"]),
    )
    kwargs.update(options)
    instance, invariance = losses.invp_losses(
        golden["features"].astype(np.float32),
        golden["indices"],
        golden["bank"].astype(np.float32),
        golden["graph_neigh"],
        **kwargs,
    )
    return float(np.mean(instance)), float(np.mean(invariance))


@pytest.mark.parametrize(
    "suffix,options",
    [
        ("", {}),
        ("_P50", dict(num_positives=50)),
        ("_Mall", dict(hard_negatives=False)),
        ("_l1", dict(num_layers=1)),
        ("_l2", dict(num_layers=2)),
    ],
)
def test_golden_concatenation_mode(golden, suffix, options):
    instance, invariance = _golden_losses(golden, deduplicate=False, **options)
    assert instance == pytest.approx(golden["L_ins" + suffix], rel=2e-6)
    assert invariance == pytest.approx(golden["L_inv" + suffix], rel=2e-6)


def test_golden_set_mode(golden):
    # tests/data/golden/README.md: de-duplicated sets give these on the same case.
    instance, invariance = _golden_losses(golden)
    assert instance == pytest.approx(3.371938, abs=2e-6)
    assert invariance == pytest.approx(3.864284, abs=2e-6)
    _, exact = _golden_losses(golden, background="exact")
    assert exact == pytest.approx(3.695905, abs=2e-6)


def test_bank_of_unknown_size_keeps_hard_negatives():
    v, indices, bank, graph = _random_case()
    kwargs = dict(temperature=0.2, num_background=20, num_layers=3, num_positives=7)
    fn = tf.function(
        lambda bank: losses.invp_losses(v.astype(np.float32), indices, bank, graph, **kwargs),
        input_signature=[tf.TensorSpec([None, bank.shape[1]], tf.float32)],
    )
    instance, invariance = fn(tf.constant(bank, tf.float32))
    want_instance, want_invariance = oracle(v, indices, bank, graph, **kwargs)
    np.testing.assert_allclose(instance.numpy(), want_instance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invariance.numpy(), want_invariance, rtol=1e-5, atol=1e-5)


def test_loss_config_fields_are_the_keyword_arguments_of_invp_losses():
    keywords = {
        name
        for name, parameter in inspect.signature(losses.invp_losses).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    fields = {field.name for field in dataclasses.fields(losses.LossConfig)}
    assert fields == keywords - {"deduplicate"}  # the authors' mode: tests only, not a flag


def test_loss_config_computes_invp_losses_with_its_settings():
    v, indices, bank, graph = _random_case()
    settings = dict(
        temperature=0.2,
        num_background=20,
        num_layers=2,
        num_positives=7,
        background="exact",
        positive_mode="knn",
        num_knn_positives=0,  # 0: the default K, as invp_losses' None
    )
    config = losses.LossConfig(**settings)
    got = config.losses(v.astype(np.float32), indices, bank.astype(np.float32), graph)
    settings["num_knn_positives"] = None
    want = oracle(v, indices, bank, graph, **settings)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 0.1
