"""Fine-tuning the whole network on labels (the semi and finetune protocols).

`fine_tune` trains the encoder's backbone and a new linear classifier (`Classifier`) with the
paper's SGD protocol; `tuned_fine_tune` runs it once per candidate learning rate from the same
start and reports the one best on held-out train rows, never chosen on the test split.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from invp_tf import data
from invp_tf import input_pipeline


class Classifier(keras.Model):
    """The encoder's backbone with a new linear classifier on its pooled features.

    The projection head is not used (and frozen), as in the paper's fine-tuning.
    """

    def __init__(self, encoder, num_classes, **kwargs):
        kwargs.setdefault("name", "classifier")
        super().__init__(**kwargs)
        self.encoder = encoder
        self.encoder.head.trainable = False
        self.classifier = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=0),
            name="logits",
        )

    def call(self, images, training=False):
        return self.classifier(self.encoder.features(images, training=training))


def fine_tune(
    encoder,
    train_epoch,
    test_dataset,
    *,
    num_classes,
    epochs,
    steps_per_epoch,
    learning_rate=0.05,
    momentum=0.9,
    weight_decay=1e-4,
    callbacks=(),
    verbose=1,
):
    """Fine-tunes the whole backbone plus a new linear classifier (semi-supervised, transfer).

    SGD with Nesterov momentum, cosine learning rate decay over all steps, decoupled weight
    decay on every trainable variable.

    Args:
      encoder: an invp_tf Encoder (restored weights); it is trained in place.
      train_epoch: fn(epoch) -> batches (images, labels) of that epoch, at least
        steps_per_epoch long (one pipeline per epoch, so only one is alive at a time).
      test_dataset: batches (images, labels), the held-out split.
      num_classes: C.
      epochs, steps_per_epoch: the budget.
      learning_rate, momentum, weight_decay: the SGD protocol.
      callbacks: Keras callbacks (TensorBoard, ...).
      verbose: Keras fit verbosity (1 = progress bar).

    Returns:
      ({"top1", "top5", "train_loss"} on the test split, the trained Classifier).
    """
    model = Classifier(encoder, num_classes)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(epochs * steps_per_epoch, 1)
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            schedule, momentum=momentum, nesterov=True, weight_decay=weight_decay
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
    )
    history = None
    for epoch in range(epochs):
        history = model.fit(
            train_epoch(epoch),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=steps_per_epoch,
            shuffle=False,  # the pipeline shuffles, deterministically per epoch
            callbacks=list(callbacks),
            verbose=verbose,
        )
    scores = model.evaluate(test_dataset, verbose=verbose, return_dict=True)
    result = {"top1": float(scores["top1"]), "top5": float(scores["top5"])}
    result["train_loss"] = float(history.history["loss"][-1]) if history else float("nan")
    return result, model


def eval_batches(source, rows, image_size):
    """(images, labels) batches of the examples `rows` of `source`, eval view, known length."""
    if len(rows) < source.num_examples:
        source = data.subset_source(source, rows)
    ds = input_pipeline.eval_pipeline(source, batch_size=256, image_size=image_size).map(
        lambda images, index, labels: (images, labels)
    )
    # A filtered subset has unknown cardinality; Keras warns at its end unless it is known.
    return ds.apply(tf.data.experimental.assert_cardinality(-(-source.num_examples // 256)))


def tuned_fine_tune(tune, make_encoder, *, learning_rates, held_ds, test_ds, seed, log_dir):
    """Fine-tunes `make_encoder()` once per learning rate; the held-out rows choose.

    One learning rate: the test result as it is. Several: each run starts from the same
    weights and classifier init, is scored on `held_ds` and on the test split, and the one
    best on `held_ds` is reported with every held-out score (`held_out_top1`).
    """
    if len(learning_rates) == 1:
        keras.utils.set_random_seed(seed)  # the new classifier's initial weights
        board = keras.callbacks.TensorBoard(log_dir=log_dir)
        result, _ = tune(
            make_encoder(), test_dataset=test_ds, learning_rate=learning_rates[0], callbacks=[board]
        )
        return result
    held_out, best = {}, None
    for lr in learning_rates:
        encoder = make_encoder()
        keras.utils.set_random_seed(seed)
        board = keras.callbacks.TensorBoard(log_dir=os.path.join(log_dir, f"lr{lr:g}"))
        held, model = tune(encoder, test_dataset=held_ds, learning_rate=lr, callbacks=[board])
        scores = model.evaluate(test_ds, verbose=0, return_dict=True)
        held_out[f"{lr:g}"] = held["top1"]
        logging.info("learning rate %g: held-out top-1 %.4f", lr, held["top1"])
        if best is None or held["top1"] > held_out[f"{best['learning_rate']:g}"]:
            best = {
                "top1": float(scores["top1"]),
                "top5": float(scores["top5"]),
                "train_loss": held["train_loss"],
                "learning_rate": lr,
            }
    return {**best, "held_out_top1": held_out}
