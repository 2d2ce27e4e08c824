"""Export a trained encoder: one SavedModel for TF Serving, TF-Hub and Keras 3.

    python -m invp_tf.export --workdir=runs/demo --export_dir=exported --model_name=invp

reads the run --workdir and writes `EXPORT_DIR/MODEL_NAME/<version>/` (here
`exported/invp/<version>/`; the next free version unless --version is given; there is no
--output): the signatures `serving_default` (images) and `serving_bytes` (encoded images),
the TF-Hub reusable SavedModel API and assets/invp_export.json; `saved_model` (the library,
`saved_model.export_run`) says what each holds. The export is checked through TF Serving's
loader, then published atomically; the command prints its folder.
"""

from absl import flags

from invp_tf import command
from invp_tf import saved_model

# The library's names, reachable here as before the SavedModel code moved to `saved_model`.
SIGNATURES = saved_model.SIGNATURES
METADATA_FILE = saved_model.METADATA_FILE
PIXEL_RANGE = saved_model.PIXEL_RANGE
DEFAULT_MAX_IMAGE_PIXELS = saved_model.DEFAULT_MAX_IMAGE_PIXELS
ExportError = saved_model.ExportError
EncoderModule = saved_model.EncoderModule
check_images = saved_model.check_images
decode_images = saved_model.decode_images
_header_pixels = saved_model._header_pixels
save = saved_model.save
run_signatures_tf1 = saved_model.run_signatures_tf1
verify = saved_model.verify
next_version = saved_model.next_version
export_run = saved_model.export_run


def _define_flags(flag_values):
    where = dict(flag_values=flag_values)
    return {
        "workdir": flags.DEFINE_string(
            "workdir", None, "Training run to export (latest checkpoint).", **where
        ),
        "export_dir": flags.DEFINE_string(
            "export_dir",
            None,
            "Base folder of the exports; the model goes to <it>/<model_name>/.",
            **where,
        ),
        "model_name": flags.DEFINE_string(
            "model_name", "invp", "Model name: folder under export_dir.", **where
        ),
        "version": flags.DEFINE_integer(
            "version", 0, "Version number; 0 = the next free one.", **where
        ),
        "max_image_pixels": flags.DEFINE_integer(
            "max_image_pixels",
            DEFAULT_MAX_IMAGE_PIXELS,
            "Largest width x height serving_bytes decodes; larger images fail before decoding "
            "(read from the file header). Stored in assets/invp_export.json.",
            **where,
        ),
        "checkpoint": flags.DEFINE_string(
            "checkpoint",
            None,
            "Checkpoint to export (ckpt-N in the run's checkpoints/, or a path); default: the "
            "newest readable one.",
            **where,
        ),
        "l2_regularization": flags.DEFINE_float(
            "l2_regularization",
            None,
            "Coefficient of the L2 penalty on kernels exported as regularization_losses (added to "
            "the loss by hub.KerasLayer(trainable=True)); default: half the run's --weight_decay "
            "(what SGD's decoupled decay pulled in training); 0: none.",
            **where,
        ),
    }


_COMMAND = command.Flags(_define_flags)


def main(argv):
    """Runs the export of the command line `argv` (see `command.parsed`)."""
    values = _COMMAND.values(argv)
    with command.exits_on("invp_tf.export", ValueError, FileNotFoundError, ExportError):
        if not values["workdir"] or not values["export_dir"]:
            raise ValueError("--workdir and --export_dir are required")
        path = export_run(**values)
    print(path)


def run():
    """The `invp-export` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
