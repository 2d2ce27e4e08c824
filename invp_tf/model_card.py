"""The model card of an export: where the weights came from, the architecture, the input contract.

`saved_model.export_run` writes it three times: `README.md` in the version folder, the asset
`assets/MODEL_CARD.md` (it travels with the SavedModel through TF-Hub and TF Serving) and,
for Kaggle Models, `model-metadata.json` beside the SavedModel (the card is its description).
A run imported from PyTorch (`pretrained`, its imported.json) names the file, its SHA-256 and
the torch format read; a run trained here names its run folder and checkpoint.
"""

import json

from invp_tf import encoder as encoder_lib

CARD_FILE = "README.md"
CARD_ASSET = "MODEL_CARD.md"
KAGGLE_FILE = "model-metadata.json"


def _origin(metadata, record):
    if record is None:
        return [
            f"- Trained with invp-tf (Invariance Propagation) in the run `{metadata['workdir']}`, "
            f"checkpoint `{metadata['checkpoint']}` after {metadata['epoch']} epochs.",
        ]
    unmapped = record["unmapped"]
    named = ", ".join(unmapped[:5]) + (", ..." if len(unmapped) > 5 else "")
    lines = [
        f"- Imported from the PyTorch checkpoint `{record['file']}`",
        f"  - SHA-256: `{record['sha256']}` ({record['bytes']} bytes)",
        f"  - format read: {record['format']}; keys under `{record['key_prefix']}`; saved after "
        f"epoch {record['epoch']}",
        f"  - {len(record['variables'])} variables mapped, {len(record['dropped'])} "
        f"num_batches_tracked keys dropped, {len(unmapped)} keys unmapped"
        + (f" ({named})" if unmapped else ""),
        f"  - memory bank: {record['bank']}",
        "- Read by invp-tf's own reader of torch.save files (no torch; the file's pickle may "
        "only name tensors, storages and plain containers).",
        "- Verified: the importer reproduces the authors' forward pass (pooled features, stage-4 "
        "map and head output within 1e-4 relative) on the authors' checkpoints of its test "
        "data. No accuracy is claimed for these weights by this export.",
    ]
    return lines


def text(metadata, record=None):
    """The model card (Markdown) of an export's metadata (invp_export.json) and import record."""
    mean, std = encoder_lib.NORMALIZATIONS[metadata["normalization"]]
    size, dim, features = metadata["image_size"], metadata["embedding_dim"], metadata["feature_dim"]
    architecture = (
        record["description"]
        if record
        else (
            f"{metadata['encoder']} (width multiplier {metadata['width_multiplier']}), "
            f"{metadata['head']} head"
        )
    )
    lines = [
        f"# {metadata['encoder']} image encoder (Invariance Propagation, invp-tf)",
        "",
        "## Weights",
        *_origin(metadata, record),
        "",
        "## Architecture",
        f"- {architecture}",
        f"- Embedding: {dim} dimensions, L2-normalised; pooled backbone features: {features}.",
        "",
        "## Input contract",
        f"- `serving_default`: `images` float32 [batch, {size}, {size}, 3], RGB in [0, 1] "
        "(divide uint8 pixels by 255); `serving_bytes`: `image_bytes`, encoded JPEG/PNG/GIF/BMP, "
        f"resized and centre-cropped to {size} px.",
        f"- Normalisation ({metadata['normalization']}) happens inside the model: "
        f"(images - mean) / std with mean {list(mean)} and std {list(std)}. Do not normalise "
        "before calling it.",
        "",
        "## Outputs",
        f"- `embedding` [batch, {dim}]: the head's output, L2-normalised (what the memory bank "
        "holds).",
        f"- `projection` [batch, {dim}]: the head's output before the normalisation.",
        f"- `features` [batch, {features}]: the global-average-pooled backbone (for transfer; "
        "what `hub.KerasLayer` returns).",
        "",
        "## Use",
        "- TF Serving: this version folder; TF-Hub: "
        "`hub.KerasLayer(path, trainable=True)` (tf-keras); Keras 3: "
        "`keras.layers.TFSMLayer(path)`.",
    ]
    return "\n".join(lines) + "\n"


def kaggle_metadata(metadata, model_name, card, record=None):
    """Kaggle Models' model-metadata.json (the template of `kaggle models init`), filled in."""
    provenance = (
        f"PyTorch checkpoint {record['file']} (sha256 {record['sha256']})"
        if record
        else f"invp-tf run {metadata['workdir']}, {metadata['checkpoint']}"
    )
    return json.dumps(
        {
            "ownerSlug": "INSERT_OWNER_SLUG_HERE",
            "title": f"Invariance Propagation {metadata['encoder']}",
            "slug": model_name,
            "subtitle": "Self-supervised image encoder (Invariance Propagation, NeurIPS 2020)",
            "isPrivate": True,
            "description": card,
            "publishTime": "",
            "provenanceSources": provenance,
        },
        indent=2,
    )
