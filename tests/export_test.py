"""Export round trips against the in-memory encoder: the TF1 loader of saved_model_cli and TF
Serving, TF-Hub under tf-keras (fine-tuning, in a subprocess), Keras 3 TFSMLayer; bad input."""

import base64
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from invp_tf import augment
from invp_tf import embeddings
from invp_tf import export
from invp_tf import saved_model
from invp_tf import training
from invp_tf import workdir as workdir_lib
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
SIZE = 12  # tiny_config's image_size


@dataclasses.dataclass
class Exported:
    path: str  # BASE/invp/1
    base: str  # BASE
    run: workdir_lib.Run  # the trained run, encoder restored from its checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run (BatchNorm in backbone and head, weight decay 5e-4), exported once."""
    root = tmp_path_factory.mktemp("export")
    data_dir = root / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=64, num_test=24, height=SIZE, width=SIZE)
    config = tiny_config(data_dir, root / "run", epochs=1, head="mlp_bn")
    training.train_and_evaluate(config, config.workdir)
    base = str(root / "models")
    path = saved_model.export_run(config.workdir, base, "invp")
    return Exported(path, base, workdir_lib.load_run(config.workdir))


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported.path)


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def _encode(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _expected(encoder, images):
    out = encoder(np.asarray(images, np.float32), training=False)
    return {key: out[key].numpy() for key in ("embedding", "features")}


def _assert_close(got, want):
    """Outputs of an exported signature equal the in-memory encoder's (features are ~100 in
    size: float32 round-off of another kernel order, up to 4e-5 relative seen)."""
    np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["features"], want["features"], rtol=1e-4, atol=1e-4)


def test_layout_metadata_and_versions(exported):
    assert exported.path == os.path.join(exported.base, "invp", "1")
    assert tf.saved_model.contains_saved_model(exported.path)
    # Nothing but numeric version folders: TF Serving would try to load anything else.
    assert os.listdir(os.path.join(exported.base, "invp")) == ["1"]
    with open(os.path.join(exported.path, "assets", saved_model.METADATA_FILE)) as f:
        metadata = json.load(f)
    config = exported.run.config
    assert metadata["image_size"] == SIZE
    assert metadata["embedding_dim"] == config.embedding_dim
    assert metadata["feature_dim"] == exported.run.encoder.feature_dim
    assert metadata["epoch"] == 1
    assert metadata["l2_regularization"] == pytest.approx(config.weight_decay / 2)
    with open(os.path.join(exported.path, "assets", "flags.txt")) as f:
        assert f"--image_size={SIZE}" in f.read()
    with pytest.raises(ValueError, match="already exists"):
        saved_model.export_run(config.workdir, exported.base, "invp", version=1)
    assert saved_model.next_version(os.path.join(exported.base, "invp")) == 2
    assert saved_model.next_version(os.path.join(exported.base, "absent")) == 1


def test_saved_model_cli_runs_both_signatures_like_the_encoder(exported, tmp_path):
    """saved_model_cli goes through the TF1 session loader, the one TF Serving uses."""
    images = _images(5)
    np.save(tmp_path / "images.npy", images)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)  # Fashion-MNIST-like: resized
    rgba = rng.integers(0, 256, size=(9, 16, 4), dtype=np.uint8)  # alpha dropped
    big = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)  # resize + centre crop
    encoded = [_encode(grey, "PNG"), _encode(rgba, "PNG"), _encode(big, "JPEG")]
    np.save(tmp_path / "bytes.npy", np.array(encoded, dtype=object), allow_pickle=True)
    commands = {
        "serving_default": "images=" + str(tmp_path / "images.npy"),
        "serving_bytes": "image_bytes=" + str(tmp_path / "bytes.npy"),
    }
    processes = {
        name: subprocess.Popen(
            [
                SAVED_MODEL_CLI,
                "run",
                "--dir",
                exported.path,
                "--tag_set",
                "serve",
                "--signature_def",
                name,
                "--inputs",
                inputs,
                "--outdir",
                str(tmp_path / name),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, inputs in commands.items()
    }
    for process in processes.values():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]

    def outputs(name):
        return {k: np.load(tmp_path / name / f"{k}.npy") for k in ("embedding", "features")}

    encoder = exported.run.encoder
    served = outputs("serving_default")
    want = _expected(encoder, images)
    _assert_close(served, want)
    np.testing.assert_allclose(np.linalg.norm(served["embedding"], axis=1), 1.0, rtol=1e-5)
    # Bytes: the training eval view of the decoded image (grey tiled to RGB, as data.py does).
    decoded = [
        np.repeat(grey[:, :, None], 3, axis=2),
        rgba[:, :, :3],
        tf.io.decode_jpeg(encoded[2]).numpy(),  # libjpeg's own decoding
    ]
    views = np.stack([augment.eval_view(image, SIZE).numpy() for image in decoded])
    served = outputs("serving_bytes")
    want = _expected(encoder, views)
    _assert_close(served, want)


@pytest.mark.parametrize(
    "images, problem",
    [
        (np.zeros((2, SIZE, SIZE, 3), np.int32), "float"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), "float"),
        (np.zeros((SIZE, SIZE, 3), np.float32), "rank 4"),
        (np.zeros((1, 2, SIZE, SIZE, 3), np.float32), "rank 4"),
        (np.zeros((2, SIZE + 1, SIZE, 3), np.float32), f"size {SIZE}x{SIZE}"),
        (np.zeros((2, SIZE, 2 * SIZE, 3), np.float32), f"size {SIZE}x{SIZE}"),
        (np.zeros((2, SIZE, SIZE, 1), np.float32), "3 channels"),
        (np.full((2, SIZE, SIZE, 3), 255.0, np.float32), "in [0, 1]"),
    ],
    ids=["int32", "uint8", "rank3", "rank5", "height", "width", "channels", "range"],
)
def test_bad_images_raise_an_error_naming_the_problem(loaded, images, problem):
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match=re.escape(problem)):
        loaded.signatures["serving_default"](images=tf.constant(images))


def test_checks_survive_the_tf1_loader(exported):
    """The server's loader runs Grappler on the whole graph: the checks must not fold away."""
    bad = {
        "rank": np.zeros((SIZE, SIZE, 3), np.float32),
        f"size {SIZE}x{SIZE}": np.zeros((1, SIZE + 1, SIZE + 1, 3), np.float32),
        # A REST client sends JSON numbers: 0..255 pixels arrive as float32 and must not pass.
        "in [0, 1]": np.full((1, SIZE, SIZE, 3), 200, np.uint8),
    }
    for problem, images in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(problem)):
            saved_model.run_signatures_tf1(exported.path, {"serving_default": {"images": images}})


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"hello, world", r"image_bytes\[1\] is not an encoded JPEG, PNG, GIF or BMP image"),
        (b"", r"image_bytes\[1\] is not an encoded"),
        (_encode(np.zeros((8, 8, 3), np.uint8), "PNG")[:40], "PNG"),
        (_encode(np.zeros((64, 64, 3), np.uint8), "JPEG")[:200], "JPEG"),
    ],
    ids=["text", "empty", "truncated_png", "truncated_jpeg"],
)
def test_malformed_bytes_raise_an_error_naming_the_problem(loaded, data, problem):
    good = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match=problem):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([good, data]))


def test_rest_request_examples_run_and_agree(exported, loaded):
    """export/request_*.json: the bytes request runs on any export, and the images request is
    the same Fashion-MNIST image as the first bytes instance, as [0, 1] floats."""
    with open(os.path.join(REPO, "export", "request_bytes.json")) as f:
        request_bytes = json.load(f)
    with open(os.path.join(REPO, "export", "request_images.json")) as f:
        request_images = json.load(f)
    assert request_bytes["signature_name"] == "serving_bytes"
    assert request_images["signature_name"] == "serving_default"
    encoded = [base64.b64decode(instance["b64"]) for instance in request_bytes["instances"]]
    served = loaded.signatures["serving_bytes"](image_bytes=tf.constant(encoded))
    grey = [np.asarray(Image.open(io.BytesIO(data))) for data in encoded]  # [28, 28] uint8
    views = [augment.eval_view(np.repeat(x[:, :, None], 3, axis=2), SIZE) for x in grey]
    _assert_close(served, _expected(exported.run.encoder, np.stack(views)))
    images = np.array(request_images["instances"], np.float32)
    assert images.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(images[0, :, :, 0], grey[0] / 255, atol=1e-4)


def test_tfsm_layer_loads_it_in_keras3(exported):
    images = _images(4, seed=2)
    want = _expected(exported.run.encoder, images)
    default = keras.layers.TFSMLayer(exported.path)  # endpoint "serve"
    by_signature = keras.layers.TFSMLayer(exported.path, call_endpoint="serving_default")
    for layer in (default, by_signature):
        out = layer(images)
        _assert_close(out, want)
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, default(inputs)["embedding"])
    np.testing.assert_allclose(model.predict(images, verbose=0), want["embedding"], atol=1e-5)
    assert len(default.weights) == len(exported.run.encoder.weights)


_HUB_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    import numpy as np
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    path, inputs_file = sys.argv[1], sys.argv[2]
    data = np.load(inputs_file)
    images, labels = data["images"], data["labels"]
    result = {}

    def build(trainable, keyed):
        # The TF-Hub image feature-vector usage: no output_key, one tensor out. `keyed` asks
        # for the dict and picks the embedding from it; "signature" does so through
        # serving_default (inference only: hub refuses trainable=True on signatures).
        options = {
            False: {},
            True: dict(arguments=dict(return_dict=True), output_key="embedding"),
            "signature": dict(signature="serving_default", output_key="embedding"),
        }[keyed]
        layer = hub.KerasLayer(path, trainable=trainable, **options)
        model = tf_keras.Sequential(
            [tf_keras.Input(images.shape[1:]), layer, tf_keras.layers.Dense(3)]
        )
        model.compile(
            tf_keras.optimizers.SGD(0.1),
            tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return layer, model

    for name, trainable, keyed in [
        ("trainable", True, False), ("frozen", False, False), ("keyed", True, True),
        ("signature", False, "signature"),
    ]:
        layer, model = build(trainable, keyed)
        output = layer(images, training=False).numpy()
        before = [w.numpy() for w in layer.weights]
        losses = [float(loss) for loss in model.losses]
        model.fit(images, labels, batch_size=len(images), epochs=1, verbose=0)
        changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, layer.weights)]
        result[name] = {
            "output": output.tolist(),
            "losses": losses,
            "num_trainable": len(layer.trainable_weights),
            "trainable_changed": sum(c for c, w in zip(changed, layer.weights) if w.trainable),
            "moving_changed": sum(
                c for c, w in zip(changed, layer.weights) if "moving_" in w.name
            ),
            "num_moving": sum("moving_" in w.name for w in layer.weights),
        }
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(
    not (importlib.util.find_spec("tensorflow_hub") and importlib.util.find_spec("tf_keras")),
    reason="needs the hub extra: pip install -e '.[hub]'",
)
def test_hub_keras_layer_fine_tunes_under_tf_keras(exported, tmp_path):
    """hub.KerasLayer(trainable=True) with no output_key in a tf-keras Sequential (TF-Hub's image
    feature-vector convention: one tensor, the pooled features): a fit step moves the weights
    and the BatchNorm moving statistics, and the exported L2 penalty is part of the model's
    losses. With arguments=dict(return_dict=True) the output_key picks from the dict."""
    images = _images(8, seed=3)
    np.savez(tmp_path / "inputs.npz", images=images, labels=np.arange(8) % 3)
    script = tmp_path / "hub_check.py"
    script.write_text(_HUB_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), exported.path, str(tmp_path / "inputs.npz")],
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    encoder = exported.run.encoder
    want = _expected(encoder, images)
    kernels = [v.numpy() for v in encoder.trainable_variables if v.name == "kernel"]
    penalty = exported.run.config.weight_decay / 2 * sum(float(np.sum(k**2)) for k in kernels)
    num_moving = sum("moving_" in v.name for v in encoder.variables)
    tuned, frozen, keyed = out["trainable"], out["frozen"], out["keyed"]
    for run in (tuned, frozen):
        np.testing.assert_allclose(np.array(run["output"]), want["features"], rtol=1e-4, atol=1e-4)
    for run in (keyed, out["signature"]):
        np.testing.assert_allclose(np.array(run["output"]), want["embedding"], atol=1e-4)
    for run in (tuned, frozen, keyed):
        assert run["num_moving"] == num_moving > 0
    # The features do not pass through the head: of its weights only the kernels move (the
    # exported L2 penalty); its BatchNorm still runs in training mode (the encoder computes both).
    num_backbone = sum("/backbone/" in v.path for v in encoder.trainable_variables)
    num_head_kernels = sum("/head/" in v.path and v.name == "kernel" for v in encoder.variables)
    assert 0 < num_backbone < len(encoder.trainable_variables) and num_head_kernels > 0
    for run, num_changed in [
        (tuned, num_backbone + num_head_kernels),
        (keyed, len(encoder.trainable_variables)),
    ]:
        assert run["losses"] == [pytest.approx(penalty, rel=1e-4)]
        assert run["num_trainable"] == len(encoder.trainable_variables)
        assert run["trainable_changed"] == num_changed
        assert run["moving_changed"] == num_moving  # BatchNorm ran in training mode
    assert frozen["num_trainable"] == 0
    assert frozen["trainable_changed"] == 0 and frozen["moving_changed"] == 0
    assert all(loss == 0 for loss in frozen["losses"])


def test_call_returns_the_feature_vector_and_the_dict_on_request(exported, loaded):
    images = _images(3, seed=4)
    want = _expected(exported.run.encoder, images)
    features = loaded(tf.constant(images))
    assert isinstance(features, tf.Tensor)
    np.testing.assert_allclose(features.numpy(), want["features"], rtol=1e-4, atol=1e-4)
    _assert_close(loaded(tf.constant(images), training=False, return_dict=True), want)


def test_export_dir_on_another_file_system(exported, tmp_path):
    """export_dir goes through tf.io.gfile (gs://, s3://...); TF's in-memory ram:// file system
    stands in for them here."""
    base = f"ram://export_test/{tmp_path.name}"
    path = saved_model.export_run(exported.run.config.workdir, base, "invp")
    assert path == f"{base}/invp/1"
    assert tf.io.gfile.listdir(f"{base}/invp") == ["1"]  # the staging folder is gone
    assert saved_model.next_version(f"{base}/invp") == 2
    images = _images(2, seed=5)
    loaded = tf.saved_model.load(path)
    _assert_close(loaded.signatures["serving_default"](images=tf.constant(images)),
                  _expected(exported.run.encoder, images))  # fmt: skip
    with tf.io.gfile.GFile(f"{path}/assets/{saved_model.METADATA_FILE}") as f:
        assert json.load(f)["image_size"] == SIZE
    assert embeddings.load_model(path)[1]["image_size"] == SIZE  # invp_tf.embed --model=gs://...
    assert not os.path.exists("ram:")


def test_verify_catches_keras_variables_in_the_hub_lists(exported, tmp_path):
    """The trap: lists of Keras Variables load in TF2 but not in the TF1 loader."""
    encoder = exported.run.encoder
    module = saved_model.EncoderModule(encoder, SIZE)
    module.variables = list(encoder.variables)
    module.trainable_variables = list(encoder.trainable_variables)
    saved_model.save(module, str(tmp_path / "trap"))
    with pytest.raises(saved_model.ExportError, match="TF1"):
        saved_model.verify(str(tmp_path / "trap"), encoder, SIZE)


def test_failed_export_publishes_nothing(exported, monkeypatch):
    def fail(*args, **kwargs):
        raise saved_model.ExportError("simulated crash after writing")

    monkeypatch.setattr(saved_model, "verify", fail)  # where export_run looks it up
    with pytest.raises(saved_model.ExportError, match="simulated"):
        saved_model.export_run(exported.run.config.workdir, exported.base, "crashed")
    assert os.listdir(os.path.join(exported.base, "crashed")) == []  # no version, no staging


def test_export_refuses_a_workdir_without_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(FileNotFoundError, match="no flags.txt"):
        saved_model.export_run(str(workdir), str(tmp_path / "models"), "invp")
    (workdir / "flags.txt").write_text("\n".join(tiny_config(tmp_path, workdir).flagfile_lines()))
    with pytest.raises(SystemExit) as stopped:
        export.main(["invp-export", f"--workdir={workdir}", f"--export_dir={tmp_path / 'models'}"])
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    last_line = stderr.strip().splitlines()[-1]
    assert (
        last_line
        == f"invp_tf.export: error: {workdir} has no checkpoint yet (checkpoints/ is empty)"
    )
    assert "Traceback" not in stderr
    assert not (tmp_path / "models").exists()


def test_a_file_where_the_model_folder_goes_is_one_line(tmp_path, capsys):
    # EXPORT_DIR/MODEL_NAME is a file: refused before the run is read (this one has no
    # checkpoint, which would be named next).
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "flags.txt").write_text("\n".join(tiny_config(tmp_path, workdir).flagfile_lines()))
    models = tmp_path / "models"
    models.mkdir()
    (models / "invp").write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        export.main(["invp-export", f"--workdir={workdir}", f"--export_dir={models}"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"invp_tf.export: error: {models}/invp is a file, not a folder of versions: pick "
        "another --model_name or --export_dir"
    )
