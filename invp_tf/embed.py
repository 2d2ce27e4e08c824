"""Batch embedding extraction with an exported model (see invp_tf.export).

    python -m invp_tf.embed --model=exported/invp/1 --images=photos/ --output=photos.npy
    python -m invp_tf.embed --model=exported/invp/1 --dataset=fashion_mnist --split=test \
        --output=fmnist_test.tfrecord --with_knn_index

Images are read, decoded and resized/cropped in a parallel tf.data pipeline with the eval view of
training (`augment.eval_view`, the same op `serving_bytes` applies) and embedded batch by batch
through the model's `serving_default` signature, so the file holds exactly what the served model
returns. Memory stays bounded by one batch: rows go straight to disk (`embeddings.embed`).

Outputs (--output names FILE; --model is an export, not a training --workdir), written
atomically (temporary name, then rename):
  FILE.npy        float32 [N, D] (D of --output_key), row i = the i-th image;
  FILE.tfrecord   one tf.train.Example per image: id (bytes), index, label (int64), embedding;
  FILE.ids.tsv    beside either: header "id<TAB>label", then one line per row (a path relative
                  to --images, or the dataset index; label -1 when unknown). It is also the
                  metadata format of TensorBoard's embedding projector.
  FILE.scann/     with --with_knn_index: a ScaNN index (dot product) over the rows, loaded with
                  scann.scann_ops_pybind.load_searcher(FILE.scann); a result r is row r
                  (built by neighbors.build_search_index).
"""

import json

from absl import flags

from invp_tf import command
from invp_tf import data
from invp_tf import embeddings

# The library's names, reachable here as before the code moved to `embeddings`.
OUTPUT_FORMATS = embeddings.OUTPUT_FORMATS
OUTPUT_KEYS = embeddings.OUTPUT_KEYS
EmbedError = embeddings.EmbedError
Inputs = embeddings.Inputs
folder_inputs = embeddings.folder_inputs
dataset_inputs = embeddings.dataset_inputs
load_model = embeddings.load_model
embed = embeddings.embed


def _define_flags(flag_values):
    where = dict(flag_values=flag_values)
    return {
        "model": flags.DEFINE_string(
            "model", None, "Export version folder BASE/NAME/VERSION.", **where
        ),
        "images": flags.DEFINE_string(
            "images", None, "Folder: embed every image below it.", **where
        ),
        "dataset": flags.DEFINE_string(
            "dataset", None, f"Or a dataset: {data.DATASET_FORMS}.", **where
        ),
        "split": flags.DEFINE_string("split", "train", "Split of --dataset.", **where),
        "data_dir": flags.DEFINE_string(
            "data_dir", "", "data_dir of --dataset (IDX, tfds).", **where
        ),
        "output": flags.DEFINE_string("output", None, "FILE.npy or FILE.tfrecord.", **where),
        "output_key": flags.DEFINE_enum(
            "output_key", "embedding", OUTPUT_KEYS, "Which output of the model to save.", **where
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 256, "Images per model call.", **where),
        "with_knn_index": flags.DEFINE_bool(
            "with_knn_index", False, "Also write a ScaNN index FILE.scann/ over the rows.", **where
        ),
        "index_neighbors": flags.DEFINE_integer(
            "index_neighbors", 10, "Default neighbours per query of the ScaNN index.", **where
        ),
    }


_COMMAND = command.Flags(_define_flags)


def main(argv):
    """Runs the embed of the command line `argv` (see `command.parsed`)."""
    values = _COMMAND.values(argv)
    errors = (ValueError, FileNotFoundError, ImportError, EmbedError)
    with command.exits_on("invp_tf.embed", *errors):
        if not values["model"] or not values["output"]:
            raise ValueError("--model and --output are required")
        summary = embed(values.pop("model"), values.pop("output"), **values)
    print(json.dumps(summary))


def run():
    """The `invp-embed` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
