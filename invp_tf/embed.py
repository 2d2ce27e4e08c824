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

import dataclasses
import json

from invp_tf import command
from invp_tf import data
from invp_tf import embeddings
from invp_tf import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class EmbedFlags:
    """The flags of invp_tf.embed: the arguments of `embeddings.embed`."""

    model: str | None = command.field(None, "Export version folder BASE/NAME/VERSION.")
    output: str | None = command.field(None, "FILE.npy or FILE.tfrecord.")
    images: str | None = command.field(None, "Folder: embed every image below it.")
    dataset: str | None = command.field(None, f"Or a dataset: {data.DATASET_FORMS}.")
    split: str = command.field("train", "Split of --dataset.")
    data_dir: str = command.field("", "data_dir of --dataset (IDX, tfds).")
    output_key: str = command.field("embedding", "Which output of the model to save.")
    batch_size: int = command.field(256, "Images per model call.")
    with_knn_index: bool = command.field(
        False, "Also write a ScaNN index FILE.scann/ over the rows."
    )
    index_neighbors: int = command.field(10, "Default neighbours per query of the ScaNN index.")


_COMMAND = command.Flags(
    lambda flag_values: command.define_fields(
        EmbedFlags, {"output_key": embeddings.OUTPUT_KEYS}, flag_values
    )
)


def main(argv):
    """Runs the embed of the command line `argv` (see `command.parsed`)."""
    settings = EmbedFlags(**_COMMAND.values(argv))
    errors = (ValueError, FileNotFoundError, ImportError, embeddings.EmbedError)
    with command.exits_on("invp_tf.embed", *errors):
        if not settings.model or not settings.output:
            raise ValueError("--model and --output are required")
        workdir_lib.check_output("output", settings.output, "file")
        values = dataclasses.asdict(settings)
        summary = embeddings.embed(values.pop("model"), values.pop("output"), **values)
    print(json.dumps(summary))


def run():
    """The `invp-embed` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
