"""invp-import end to end: the authors' checkpoints become runs whose exports give their outputs."""

import collections
import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from invp_tf import embed
from invp_tf import evaluate
from invp_tf import export
from invp_tf import import_checkpoint
from invp_tf import pretrained
from invp_tf import resnet_keys
from invp_tf import saved_model
from invp_tf import torch_checkpoint as tc
from invp_tf import train
from invp_tf import workdir as workdir_lib
from tests import conftest

DATA = pathlib.Path(__file__).parent / "data" / "authors_checkpoints"
MANIFESTS = json.loads((DATA / "full_size_state_dict_shapes.json").read_text())
FIXTURES = ("resnet50_w0125_linear", "resnet50_w0125_mlp")  # zip, legacy
# The acceptance bound: max |difference| / max |expected|.
TOLERANCE = 1e-4


def _relative(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module", params=FIXTURES)
def exported(request, tmp_path_factory):
    """(fixture name, run folder, export version folder) after invp-import and invp-export."""
    name = request.param
    base = tmp_path_factory.mktemp(name)
    run = base / "run"
    import_checkpoint.main(["invp-import", f"--checkpoint={DATA / name}.pth", f"--workdir={run}"])
    export.main(["invp-export", f"--workdir={run}", f"--export_dir={base / 'exported'}"])
    return name, run, base / "exported" / "invp" / "1"


def test_export_matches_the_authors_forward_pass(exported):
    name, _, path = exported
    expected = np.load(DATA / f"{name}_expected.npz")
    images = expected["images_nhwc"]  # RGB in [0, 1]; the authors' net saw ImageNet-normalised
    loaded = tf.saved_model.load(str(path))
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    stage4 = loaded.stage_outputs(tf.constant(images))["stage4"]
    authors = expected["embedding"]  # the head's output before L2 normalisation
    assert _relative(outputs["features"], expected["pooled"]) <= TOLERANCE
    assert _relative(outputs["projection"], authors) <= TOLERANCE
    unit = authors / np.linalg.norm(authors, axis=1, keepdims=True)
    assert _relative(outputs["embedding"], unit) <= TOLERANCE
    assert _relative(stage4, expected["stage4_nhwc"]) <= TOLERANCE
    # The loader of TF Serving and saved_model_cli gives the same.
    tf1 = saved_model.run_signatures_tf1(str(path), {"serving_default": {"images": images}})
    assert _relative(tf1["serving_default"]["features"], expected["pooled"]) <= TOLERANCE
    assert _relative(tf1["serving_default"]["projection"], authors) <= TOLERANCE


def test_hub_keras_layer_gives_the_authors_pooled_features(exported):
    hub = pytest.importorskip("tensorflow_hub")
    name, _, path = exported
    expected = np.load(DATA / f"{name}_expected.npz")
    layer = hub.KerasLayer(str(path), trainable=False)
    assert _relative(layer(expected["images_nhwc"]), expected["pooled"]) <= TOLERANCE


def test_the_run_folder_holds_the_checkpoint(exported):
    name, run, _ = exported
    obj, _ = tc.load(DATA / f"{name}.pth")
    mapped = resnet_keys.resnet_state(obj, name)
    loaded = workdir_lib.load_run(str(run))
    config = loaded.config
    assert (config.encoder, config.width_multiplier, config.stem_width) == ("resnet50", 0.125, 64)
    assert config.head == mapped.architecture.head
    assert config.head_hidden_dim == (2048 if name.endswith("mlp") else 0)
    assert (config.normalization, config.image_size, config.num_neighbors) == ("imagenet", 224, 4)
    assert config.temperature == (0.2 if name.endswith("mlp") else 0.07)
    assert loaded.epoch == 7 and loaded.checkpoint.endswith("ckpt-7")
    np.testing.assert_array_equal(loaded.bank, obj["memory_banks"])
    np.testing.assert_array_equal(loaded.knn_graph, obj["neigh"])
    variables = {v.path.split("/", 1)[1]: v.numpy() for v in loaded.encoder.weights}
    assert set(variables) == set(mapped.weights)
    for path, value in mapped.weights.items():
        np.testing.assert_array_equal(variables[path], value, err_msg=path)
    record = pretrained.read_record(str(run))
    assert record["sha256"] == tc.sha256(DATA / f"{name}.pth")
    assert record["format"].startswith("zip" if name.endswith("linear") else "legacy")
    assert record["unmapped"] == [] and len(record["dropped"]) == 53
    assert workdir_lib.read_metrics(str(run)) == []


def test_the_export_carries_the_model_card(exported):
    name, _, path = exported
    digest = tc.sha256(DATA / f"{name}.pth")
    card = (path / "README.md").read_text()
    assert card == (path / "assets" / "MODEL_CARD.md").read_text()
    assert f"`{name}.pth`" in card and digest in card
    assert ("zip (torch >= 1.6)" if name.endswith("linear") else "legacy (torch < 1.6)") in card
    assert "mean [0.485, 0.456, 0.406]" in card and "RGB in [0, 1]" in card
    assert "No accuracy is claimed" in card
    kaggle = json.loads((path / "model-metadata.json").read_text())
    assert kaggle["description"] == card and digest in kaggle["provenanceSources"]
    metadata = json.loads((path / "assets" / saved_model.METADATA_FILE).read_text())
    assert metadata["normalization"] == "imagenet" and metadata["stem_width"] == 64
    assert metadata["origin"]["sha256"] == digest
    origin = json.loads((path / "assets" / pretrained.IMPORT_FILE).read_text())
    assert origin["file"] == f"{name}.pth"


def test_embed_reads_the_export(exported, tmp_path):
    _, _, path = exported
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    embed.main(
        ["invp-embed", f"--model={path}", f"--images={folder}", f"--output={tmp_path / 'e.npy'}"]
    )
    rows = np.load(tmp_path / "e.npy")
    assert rows.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


def _recipe(tmp_path, data_dir, **overrides):
    """A tiny training recipe over the 64 images of `data_dir` (the fixtures' bank has 64 rows)."""
    config = conftest.tiny_config(data_dir, "", image_size=32, num_neighbors=4, **overrides)
    path = tmp_path / "recipe.flags"
    lines = [line for line in config.flagfile_lines() if not line.startswith("--workdir")]
    path.write_text("\n".join(lines) + "\n")
    return path


def _import(tmp_path, name, *extra):
    run = tmp_path / "run"
    import_checkpoint.main(
        ["invp-import", f"--checkpoint={DATA / name}.pth", f"--workdir={run}", *extra]
    )
    return run


def test_evaluate_and_analyze_accept_an_imported_run(tmp_path, tiny_idx_dir):
    from invp_tf import analysis

    run = _import(tmp_path, "resnet50_w0125_linear", f"--recipe={_recipe(tmp_path, tiny_idx_dir)}")
    config = workdir_lib.read_flags(str(run))
    assert (config.dataset, config.image_size, config.batch_size) == ("fashion_mnist", 32, 16)
    assert config.encoder == "resnet50" and config.stem_width == 64  # the checkpoint's, not 0.0625
    evaluate.main(["invp-evaluate", f"--workdir={run}", "--protocol=knn", "--knn_k=5"])
    report = json.loads((run / "eval" / "knn.json").read_text())
    assert report["checkpoint_epoch"] == 7 and "embedding" in report["results"]
    paths = analysis.analyze(
        str(run), str(tmp_path / "analysis"), samples_per_class=3, num_anchors=2
    )
    assert all(pathlib.Path(p).exists() for p in paths)


@pytest.mark.slow
def test_train_continues_an_imported_run(tmp_path, tiny_idx_dir):
    recipe = _recipe(tmp_path, tiny_idx_dir, epochs=8, background_search="top_k")
    run = _import(tmp_path, "resnet50_w0125_mlp", f"--recipe={recipe}")
    before = workdir_lib.load_run(str(run))
    train.main(["invp-train", f"--flagfile={run}/flags.txt"])
    rows = workdir_lib.read_metrics(str(run))
    assert [row["epoch"] for row in rows] == [7]  # epochs 0-6 were the authors'
    assert np.isfinite(rows[0]["loss_ins"]) and np.isfinite(rows[0]["loss_inv"])
    after = workdir_lib.load_run(str(run))
    assert after.epoch == 8
    assert not np.array_equal(after.bank, before.bank)  # the bank moved on with the user's data


def test_bad_imports_are_one_line(tmp_path, capsys):
    run = _import(tmp_path, "resnet50_w0125_linear")
    capsys.readouterr()
    cases = [
        ([f"--checkpoint={DATA / 'resnet50_w0125_mlp.pth'}", f"--workdir={run}"], "already holds"),
        ([f"--checkpoint={DATA / 'cases.json'}", f"--workdir={tmp_path / 'b'}"], "not a PyTorch"),
        ([f"--checkpoint={tmp_path / 'absent.pth'}", f"--workdir={tmp_path / 'c'}"], "cannot read"),
    ]
    bare = tmp_path / "bare.pth"
    obj, _ = tc.load(DATA / "resnet50_w0125_linear.pth")
    tc.save(collections.OrderedDict(obj["state_dict"]), bare)
    cases.append(([f"--checkpoint={bare}", f"--workdir={tmp_path / 'd'}"], "--num_examples"))
    for flags, message in cases:
        with pytest.raises(SystemExit) as stopped:
            import_checkpoint.main(["invp-import", *flags])
        assert stopped.value.code == 1
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error
    assert not (tmp_path / "b").exists() and not (tmp_path / "d" / "flags.txt").exists()


def test_a_bare_state_dict_gets_a_bank_of_num_examples(tmp_path):
    obj, _ = tc.load(DATA / "resnet50_w0125_mlp.pth")
    bare = tmp_path / "bare.pth"
    tc.save(collections.OrderedDict(obj["state_dict"]), bare, "legacy")
    settings = pretrained.ImportConfig(
        checkpoint=str(bare), workdir=str(tmp_path / "run"), num_examples=20, image_size=32
    )
    record = pretrained.import_checkpoint(dataclasses.replace(settings))
    loaded = workdir_lib.load_run(str(tmp_path / "run"))
    assert (
        loaded.epoch == 0 and loaded.bank.shape == (20, 128) and loaded.knn_graph.shape == (20, 4)
    )
    np.testing.assert_allclose(np.linalg.norm(loaded.bank, axis=1), 1.0, rtol=1e-5)
    assert "random unit rows" in record["bank"]


def _full_size_round_trip(tmp_path, manifest, file_format):
    rng = np.random.default_rng(1)
    state = collections.OrderedDict(
        (
            key,
            np.array(1, np.int64)
            if key.endswith("tracked")
            else rng.standard_normal(shape).astype(np.float32),
        )
        for key, shape in MANIFESTS[manifest].items()
    )
    bank = rng.standard_normal((16, 128)).astype(np.float32)
    neigh = rng.integers(0, 16, size=(16, 4))
    path = tmp_path / f"{manifest}.pth"
    tc.save(
        {"epoch": 3, "state_dict": state, "memory_banks": bank, "neigh": neigh}, path, file_format
    )
    run = tmp_path / "run"
    settings = pretrained.ImportConfig(checkpoint=str(path), workdir=str(run), image_size=32)
    record = pretrained.import_checkpoint(settings)
    assert record["unmapped"] == []
    loaded = workdir_lib.load_run(str(run))
    variables = {v.path.split("/", 1)[1]: v.numpy() for v in loaded.encoder.weights}
    used = set(record["dropped"])
    for variable, key in record["variables"].items():
        value = state[key]
        if variable.endswith("conv/kernel"):
            value = value.transpose(2, 3, 1, 0)
        elif variable.endswith("kernel"):
            value = value.T
        np.testing.assert_array_equal(variables.pop(variable), value, err_msg=key)
        used.add(key)
    assert variables == {} and used == set(state)  # every variable, every key
    np.testing.assert_array_equal(loaded.bank, bank)
    np.testing.assert_array_equal(loaded.knn_graph, neigh)


def test_full_size_cifar_resnet18_round_trip(tmp_path):
    _full_size_round_trip(tmp_path, "resnet18_cifar_mlp", "legacy")


@pytest.mark.slow
@pytest.mark.parametrize(
    "manifest, file_format", [("resnet50_linear", "zip"), ("resnet50_mlp", "legacy")]
)
def test_full_size_resnet50_round_trip(tmp_path, manifest, file_format):
    _full_size_round_trip(tmp_path, manifest, file_format)
