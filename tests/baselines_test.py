"""invp_tf.baselines: the cache key follows every input, entries round-trip, and an
evaluation with its baselines cached computes none of them yet reports the same numbers."""

import dataclasses
import json
import logging
import os

import numpy as np

from invp_tf import baselines
from invp_tf import data
from invp_tf import identity
from invp_tf import protocols
from tests import conftest


def _folder(root, sizes):
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * size)
    return data.load_source(f"folder:{root}", "train")


def test_fingerprint_of_idx_follows_the_files_bytes_and_the_slice(tmp_path):
    conftest.write_idx_dataset(tmp_path, num_train=20, num_test=5, height=4, width=4)
    first = identity.fingerprint(data.load_source("fashion_mnist", "train", str(tmp_path)))
    again = identity.fingerprint(data.load_source("fashion_mnist", "train", str(tmp_path)))
    sliced = identity.fingerprint(data.load_source("fashion_mnist", "train", str(tmp_path), 10))
    test = identity.fingerprint(data.load_source("fashion_mnist", "test", str(tmp_path)))
    assert first == again and len({first, sliced, test}) == 3
    # One pixel changed: same shape and size, another fingerprint.
    conftest.write_idx_dataset(tmp_path, num_train=20, num_test=5, height=4, width=4, seed=1)
    assert identity.fingerprint(data.load_source("fashion_mnist", "train", str(tmp_path))) != first


def test_fingerprint_of_a_folder_follows_names_and_sizes(tmp_path):
    base = {"a/1.png": 10, "a/2.png": 10, "b/3.png": 10}
    first = identity.fingerprint(_folder(tmp_path / "x", base))
    # The same listing elsewhere: the same examples.
    assert identity.fingerprint(_folder(tmp_path / "y", base)) == first
    renamed = {"a/1.png": 10, "a/2.png": 10, "b/4.png": 10}  # one removed, one added: same N
    assert identity.fingerprint(_folder(tmp_path / "z", renamed)) != first
    resized = {"a/1.png": 10, "a/2.png": 11, "b/3.png": 10}
    assert identity.fingerprint(_folder(tmp_path / "w", resized)) != first


def _inputs(tiny_run, **changes):
    settings = protocols.make_settings(tiny_run.workdir, "linear", **changes.pop("s", {}))
    config = dataclasses.replace(tiny_run, **changes.pop("config", {}))
    splits = protocols.Splits(
        "fashion_mnist",
        tiny_run.data_dir,
        train_examples=0,
        label_fraction=settings.label_fraction,
        held_out=settings.held_out_fraction,
        seed=settings.seed,
    )
    return baselines.inputs(settings, config, splits, "fashion_mnist")


def test_key_follows_every_input_but_training_only_flags(tiny_run):
    base = baselines.key(_inputs(tiny_run))
    assert baselines.key(_inputs(tiny_run)) == base
    # The loss and the optimiser never shape a random-initialised encoder.
    assert baselines.key(_inputs(tiny_run, config={"lambda_inv": 0.0, "epochs": 9})) == base
    changed = [
        _inputs(tiny_run, s={"knn_k": 7}),
        _inputs(tiny_run, s={"seed": 1}),
        _inputs(tiny_run, s={"label_fraction": 0.5}),
        _inputs(tiny_run, config={"width_multiplier": 0.125}),
        _inputs(tiny_run, config={"image_size": 16}),
    ]
    keys = {baselines.key(i) for i in changed}
    assert base not in keys and len(keys) == len(changed)


def test_cache_round_trip_and_damaged_entries(tmp_path, tiny_run):
    cache = baselines.Cache(tmp_path / "c")
    inputs = _inputs(tiny_run)
    assert cache.load(inputs) is None
    values = {"pixel_knn": {"top1": 0.5, "top5": 1.0}}
    path = cache.store(inputs, values, seconds=3.0)
    assert cache.load(inputs) == values
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700
    assert not [p for p in os.listdir(tmp_path / "c") if p.endswith(".tmp")]
    # An entry whose recorded inputs differ (a prefix collision) is not a hit.
    entry = json.loads(path.read_text())
    entry["inputs"]["seed"] = 99
    path.write_text(json.dumps(entry))
    assert cache.load(inputs) is None
    path.write_text('{"inputs": ')  # truncated
    assert cache.load(inputs) is None


def test_a_cache_folder_others_can_write_is_not_trusted(tmp_path, tiny_run, caplog):
    # An entry in a folder its group or others can write may have been planted: not read,
    # and nothing is stored there; one warning names the folder.
    folder = tmp_path / "shared"
    cache = baselines.Cache(folder)
    inputs = _inputs(tiny_run)
    planted = {"pixel_knn": {"top1": 0.99, "top5": 1.0}}
    path = cache.store(inputs, planted, seconds=1.0)
    assert cache.load(inputs) == planted  # private: trusted
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING):
        assert cache.load(inputs) is None
        assert cache.store(inputs, planted, seconds=1.0) is None
    warnings = [r.getMessage() for r in caplog.records if "baseline cache" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "mode 777" in warnings[0]
    os.remove(path)
    os.chmod(folder, 0o700)
    assert cache.load(inputs) is None and not os.listdir(folder)  # nothing was stored


def test_evaluate_reuses_cached_baselines_without_computing_them(tiny_run, tmp_path, monkeypatch):
    def settings(**extra):
        return protocols.make_settings(
            tiny_run.workdir, "linear", block="stage4", output=str(tmp_path / "l.json"), **extra
        )

    first = protocols.evaluate(settings())
    assert first["baseline_cache"]["hit"] is False
    assert set(first["baselines"]) == {
        "pixel_knn",
        "pixel_knn_tuned_k",
        "pixel_logistic_regression",
        "random_init_knn",
        "random_init_logistic_regression",
    }
    calls = []
    monkeypatch.setattr(baselines, "compute", lambda *a, **k: calls.append("compute") or {})
    monkeypatch.setattr(baselines, "with_features", lambda fn, *a: calls.append("feat") or fn)
    second = protocols.evaluate(settings())
    assert calls == [] and second["baseline_cache"]["hit"] is True
    assert second["baselines"] == json.loads(json.dumps(first["baselines"]))
    assert second["results"] == first["results"]
    # A changed input misses; --recompute_baselines ignores the hit and stores anew.
    assert protocols.evaluate(settings(knn_k=5))["baseline_cache"]["hit"] is False
    assert protocols.evaluate(settings(recompute_baselines=True))["baseline_cache"]["hit"] is False
    assert calls == ["feat", "compute", "feat", "compute"]
    # --baseline_cache=off: computed, nothing cached.
    off = protocols.evaluate(settings(baseline_cache="off"))
    assert off["baseline_cache"] is None and calls[-1] == "compute"


def test_semi_caches_the_scratch_network_but_not_the_frozen_run(tiny_run, tmp_path):
    def settings():
        return protocols.make_settings(
            tiny_run.workdir,
            "semi",
            label_fraction=0.25,
            epochs=1,
            batch_size=8,
            output=str(tmp_path / "s.json"),
        )

    first = protocols.evaluate(settings())
    second = protocols.evaluate(settings())
    assert (first["baseline_cache"]["hit"], second["baseline_cache"]["hit"]) == (False, True)
    entry = json.loads(open(second["baseline_cache"]["file"]).read())
    assert "random_init_network" in entry["baselines"]
    assert "frozen_embedding_knn" not in entry["baselines"]
    assert list(second["baselines"]) == list(first["baselines"])
    assert np.isclose(
        second["baselines"]["frozen_embedding_knn"]["top1"],
        first["baselines"]["frozen_embedding_knn"]["top1"],
    )
