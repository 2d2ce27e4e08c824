"""The train and eval tf.data pipelines over a `data.Source`.

Sharding, shuffling, stateless views by (seed, epoch, index), batching. `train_pipeline` is
one epoch as a pure function of (seed, epoch), cut into the workers' parts before decoding;
`eval_pipeline` is every example in source order through the deterministic eval view.
"""

import os

import tensorflow as tf

from invp_tf import augment
from invp_tf import batch_views
from invp_tf import data

# Above this many examples the train shuffle uses a bounded buffer plus file shuffling.
_FULL_SHUFFLE_MAX_EXAMPLES = 100_000
_SHUFFLE_BUFFER = 10_000


def pipeline_options(ds):
    """Deterministic order, and tf.data's autotuner off.

    The autotuner's background thread made the end of `model.fit` wait 17-20 s for it in
    about one epoch in three on the 2-core CPU (py-spy: the iterator's destructor waiting
    in `UnboundedThreadPool`), halving the demo's images/s; without it the AUTOTUNE
    parallelism falls back to the number of cores and the pipeline alone is no slower
    (BENCHMARKS.md, "Training loop").
    """
    options = tf.data.Options()
    options.deterministic = True  # also covers tfds' parallel interleave of shard files
    options.autotune.enabled = False
    return ds.with_options(options)


def host_cores():
    """The CPU cores this process may run on: the parallel calls of the view maps.

    Given explicitly: with the autotuner off, `AUTOTUNE` parallel calls stop at
    min(16, cores), which would cap a large host's input pipeline near 16 views at a time.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _view_seed_base(seed, epoch):
    # One int64 per (seed, epoch); the element seed is [base, index].
    return (seed * 1_000_003 + epoch) % (2**63)


def train_pipeline(
    source: data.Source,
    *,
    batch_size: int,
    image_size: int,
    view,
    seed: int,
    epoch: int,
    shuffle_buffer: int | None = None,
    global_batch_size: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    skip_steps: int = 0,
) -> tf.data.Dataset:
    """One epoch of shuffled, augmented training batches; a pure function of (seed, epoch).

    The shuffle order depends only on (seed, epoch); the view of example `index` is drawn with
    the stateless seed [seed * 1_000_003 + epoch, index] (int64), so a resumed run sees the
    same batches. Build one pipeline per epoch.

    Long (about 50 lines of code): shuffle, shard and resume cut the same epoch, so they stay
    in one place where their order (shuffle, whole steps, skip, shard, decode) can be read.

    Args:
      source: the Source to read.
      batch_size: B; the last partial batch is dropped.
      image_size: S, output side of the views.
      view: fn(image, seed, image_size) from `augment.RECIPES`, or its name.
      seed: global seed (Python int).
      epoch: epoch number (Python int).
      shuffle_buffer: None: exact shuffle (example list for in-memory/folder sources, a
        buffer of all N examples for tfds when N <= 100k, else file shuffle plus a
        10,000 buffer); an int forces a buffer of that size.
      global_batch_size: G, the examples of one step over all workers (default
        batch_size). With num_shards workers each holding G / num_shards of every
        step, the union of the workers' batches of step s is exactly the batch of
        step s of a one-device run with batch G (same examples, same views, same
        order of replicas). Shards are cut before decoding and augmentation.
      shard_index: this worker's part of every global batch, in [0, num_shards).
      num_shards: workers (input pipelines) sharing each global batch.
      skip_steps: global steps already done this epoch (a run resumed mid-epoch).

    Returns:
      tf.data.Dataset of (images float32 [B, S, S, 3] in [0, 1], indices int32 [B],
      labels int32 [B]).
    """
    if isinstance(view, str):
        view = augment.get_view(view)
    if batch_size > source.num_examples:
        raise ValueError(f"batch_size {batch_size} > {source.num_examples} examples")
    epoch_seed = _view_seed_base(seed, epoch) % (2**31 - 1)
    n = source.num_examples
    # Undecoded until this worker's examples are picked (the buffer holds encoded images).
    if shuffle_buffer is None and source.exact_shuffle:
        ds = source.dataset(shuffle_files=True, seed=epoch_seed, decoded=False)
    else:
        if shuffle_buffer is None:
            shuffle_buffer = n if n <= _FULL_SHUFFLE_MAX_EXAMPLES else _SHUFFLE_BUFFER
        # Large sharded data: a bounded buffer only mixes locally, so shuffle files too.
        ds = source.dataset(
            shuffle_files=n > _FULL_SHUFFLE_MAX_EXAMPLES, seed=epoch_seed, decoded=False
        )
        ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    global_batch = global_batch_size or batch_size
    if global_batch % num_shards or (global_batch // num_shards) % batch_size:
        raise ValueError(
            f"global batch {global_batch} does not split into {num_shards} worker(s) "
            f"of whole batches of {batch_size}"
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    steps = n // global_batch
    if not 0 <= skip_steps <= steps:
        raise ValueError(f"skip_steps {skip_steps} is not in [0, {steps}]")
    # The whole steps only (the last partial global batch is dropped on every worker alike).
    ds = ds.take(steps * global_batch).skip(skip_steps * global_batch)
    if num_shards > 1:
        part = global_batch // num_shards
        ds = ds.enumerate().filter(lambda p, ex: (p % global_batch) // part == shard_index)
        ds = ds.map(lambda p, ex: ex)
    base = tf.constant(_view_seed_base(seed, epoch), tf.int64)
    # After the shard filter: each worker reads and decodes its own examples only. A view
    # that crops an encoded file decodes only the crop window of a JPEG.
    encoded = source.read is not None and augment.takes_encoded(view)
    decode = (source.read if encoded else source.decode) or (lambda ex: ex)
    # Colour recipes: crop and draws per image, the colour ops per batch (same views).
    stages = batch_views.two_stage(view)
    per_image = stages.element if stages else view

    def to_view(ex):
        ex = decode(ex)
        view_seed = tf.stack([base, tf.cast(ex["index"], tf.int64)])  # [2]
        return per_image(ex["image"], view_seed, image_size), ex["index"], ex["label"]

    cores = host_cores()
    ds = ds.map(to_view, num_parallel_calls=cores, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if stages:
        # A batch in flight holds B views: a quarter of the cores keep pace with the crops.
        ds = ds.map(
            lambda out, index, label: (stages.batch(*out), index, label),
            num_parallel_calls=max(2, cores // 4),
            deterministic=True,
        )
    return pipeline_options(ds.prefetch(tf.data.AUTOTUNE))


def eval_pipeline(source: data.Source, *, batch_size: int, image_size: int) -> tf.data.Dataset:
    """All examples in source order with the deterministic `augment.eval_view`.

    Args:
      source: the Source to read.
      batch_size: B; the final partial batch is kept.
      image_size: S.

    Returns:
      tf.data.Dataset of (images float32 [B, S, S, 3] in [0, 1], indices int32 [B],
      labels int32 [B]).
    """

    def to_view(ex):
        return augment.eval_view(ex["image"], image_size), ex["index"], ex["label"]

    ds = source.dataset(shuffle_files=False)
    ds = ds.map(to_view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline_options(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))
