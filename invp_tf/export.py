"""Export a trained encoder: one SavedModel for TF Serving, TF-Hub and Keras 3.

    python -m invp_tf.export --workdir=runs/demo --export_dir=exported --model_name=invp

reads the run --workdir and writes `EXPORT_DIR/MODEL_NAME/<version>/` (here
`exported/invp/<version>/`; the next free version unless --version is given; there is no
--output): the signatures `serving_default` (images) and `serving_bytes` (encoded images),
the TF-Hub reusable SavedModel API and assets/invp_export.json; `saved_model` (the library,
`saved_model.export_run`) says what each holds. The export is checked through TF Serving's
loader, then published atomically; the command prints its folder.
"""

import dataclasses

from invp_tf import command
from invp_tf import image_headers
from invp_tf import saved_model
from invp_tf import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class ExportFlags:
    """The flags of invp_tf.export: the arguments of `saved_model.export_run`."""

    workdir: str | None = command.field(None, "Training run to export (latest checkpoint).")
    export_dir: str | None = command.field(
        None, "Base folder of the exports; the model goes to <it>/<model_name>/."
    )
    model_name: str = command.field("invp", "Model name: folder under export_dir.")
    version: int = command.field(0, "Version number; 0 = the next free one.")
    max_image_pixels: int = command.field(
        image_headers.DEFAULT_MAX_IMAGE_PIXELS,
        "Largest frames x width x height serving_bytes decodes (a GIF: every frame, at its "
        "largest frame's size); larger images fail before decoding (read from the headers). "
        "This and the next three limits are stored in assets/invp_export.json.",
    )
    max_image_frames: int = command.field(
        0, "Most frames of one image (GIF) serving_bytes accepts; 0: no limit but the pixels."
    )
    max_batch_size: int = command.field(
        image_headers.DEFAULT_MAX_BATCH_SIZE, "Most images in one request of either signature."
    )
    max_request_bytes: int = command.field(
        image_headers.DEFAULT_MAX_REQUEST_BYTES,
        "Most encoded bytes in one serving_bytes request, all images together.",
    )
    checkpoint: str | None = command.field(
        None,
        "Checkpoint to export (ckpt-N in the run's checkpoints/, or a path); default: the "
        "newest readable one.",
    )
    l2_regularization: float | None = command.field(
        None,
        "Coefficient of the L2 penalty on kernels exported as regularization_losses (added to "
        "the loss by hub.KerasLayer(trainable=True)); default: half the run's --weight_decay "
        "(what SGD's decoupled decay pulled in training); 0: none.",
    )


_COMMAND = command.Flags(lambda flag_values: command.define_fields(ExportFlags, {}, flag_values))


def main(argv):
    """Runs the export of the command line `argv` (see `command.parsed`)."""
    settings = ExportFlags(**_COMMAND.values(argv))
    errors = (ValueError, FileNotFoundError, saved_model.ExportError)
    with command.exits_on("invp_tf.export", *errors):
        if not settings.workdir or not settings.export_dir:
            raise ValueError("--workdir and --export_dir are required")
        workdir_lib.check_output("export_dir", settings.export_dir)
        path = saved_model.export_run(**dataclasses.asdict(settings))
    print(path)


def run():
    """The `invp-export` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
