"""Petastorm Parquet -> tf.data: static shapes, shuffling, augmentation, prefetch, exact epochs.

A model trains on a row's `label` (class index, sparse softmax) or, for a multilabel dataset, its multi-hot
`targets` (one sigmoid per finding): `multilabel=`/`num_classes=` below choose, nothing else differs.

Each pass over the dataset opens a fresh Petastorm reader (num_epochs=1) inside a generator, so Keras
sees a finite dataset that it can iterate once per epoch (no steps_per_epoch guessing, no `.repeat()`,
which Petastorm datasets cannot do), row groups are reshuffled every epoch with a new seed, and a
worker of a distributed backend reads only its own shard of row groups.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..config import Augment  # train.augment, typed (re-exported here for the loader's callers)


def target_column(multilabel: bool) -> str:
    """What a model trains on: the class index (`label`, sparse softmax), or the multi-hot `targets` (sigmoids)."""
    return "targets" if multilabel else "label"


def read_columns(url: str, columns, shuffle: bool = False, seed: int | None = None, shard: int | None = None,
                 num_shards: int | None = None, workers: int = 4, pool: str = "dummy"):
    """Rows (tuples of `columns`) of one Petastorm split, read once. pool="dummy" reads row groups synchronously in
    the calling thread (tf.data's prefetch overlaps it with training; ~5k rows/s at 128 px); "thread" decodes row
    groups in parallel but its end-of-data detection once ended an epoch early under load."""
    from petastorm import make_reader

    columns = list(columns)
    reader = make_reader(url, schema_fields=columns, num_epochs=1, shuffle_row_groups=shuffle, seed=seed,
                         cur_shard=shard, shard_count=num_shards, workers_count=workers, reader_pool_type=pool)
    try:
        for row in reader:
            yield tuple(getattr(row, c) for c in columns)
    finally:  # not `with`: its exit prints "Cache cleanup complete." every epoch; we use no cache to clean
        reader.stop()
        reader.join()


def read_rows(url: str, shuffle: bool, seed: int | None = None, shard: int | None = None, num_shards: int | None = None,
              workers: int = 4, pool: str = "dummy", multilabel: bool = False):
    """(image uint8 HWC, target) pairs from one Petastorm split, read once: the target is the int class index, or
    for multilabel the float32 multi-hot findings vector."""
    rows = read_columns(url, ["image", target_column(multilabel)], shuffle, seed, shard, num_shards, workers, pool)
    if not multilabel:
        yield from rows
    else:
        for image, targets in rows:
            yield image, targets.astype(np.float32)


def read_split(url: str, columns=("image", "label", "targets", "path", "patient", "source"),
               limit: int | None = None) -> dict[str, np.ndarray]:
    """Columns of a whole (small) split in memory, in file order, as arrays (images stacked (N, H, W, C), targets
    (N, K)): for evaluation (per source, per patient), audits and tests."""
    rows = list(itertools.islice(read_columns(url, columns), limit))
    out = {}
    for i, c in enumerate(columns):
        values = [r[i] for r in rows]
        out[c] = np.stack(values) if values and isinstance(values[0], np.ndarray) else np.asarray(values)
    return out


def read_arrays(url: str, limit: int | None = None, multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A whole (small) split in memory, in file order: (images, labels (N,) int32 or multi-hot (N, K) float32)."""
    pairs = list(itertools.islice(read_rows(url, shuffle=False, multilabel=multilabel), limit))
    if not pairs:
        return np.zeros((0,), np.uint8), np.zeros((0,), np.float32 if multilabel else np.int32)
    images, labels = zip(*pairs)
    return np.stack(images), (np.stack(labels) if multilabel else np.asarray(labels, np.int32))


def spark_rows(spark, url: str, shape: tuple[int, int, int], partitions: int | None = None, num_classes: int = 2,
               multilabel: bool = False):
    """A split as an RDD of (float32 image HWC, target: int label or float32 multi-hot vector), decoded on the
    executors that read the Parquet files: for backends that train on Spark partitions (Elephas). Pixels never pass
    through the driver. partitions: spread the rows evenly over this many partitions (one per worker)."""
    from .schema import image_schema

    schema = image_schema(shape, num_classes)
    image, targets = schema.image, schema.targets

    def decode(rows):
        for r in rows:
            x = image.codec.decode(image, r.image).astype(np.float32)
            yield x, (targets.codec.decode(targets, r.targets).astype(np.float32) if multilabel else int(r.label))

    rdd = spark.read.parquet(url).select("image", target_column(multilabel)).rdd.mapPartitions(decode)
    return rdd.repartition(partitions) if partitions else rdd


def augment_layer(aug: Augment, seed: int):
    """Keras preprocessing layers applied to training batches only (never to val/test)."""
    import keras

    layers = []
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(aug.rotation, fill_mode="constant", seed=seed))
    if aug.zoom:  # negative factors zoom in: a random crop, resized back to the input size
        layers.append(keras.layers.RandomZoom((-aug.zoom, aug.zoom), fill_mode="constant", seed=seed))
    if aug.translate:
        layers.append(keras.layers.RandomTranslation(aug.translate, aug.translate, fill_mode="constant", seed=seed))
    if aug.brightness:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed))
    if aug.contrast:
        layers.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augment")


def dataset(url: str, shape: tuple[int, int, int], batch_size: int, training: bool, seed: int = 0,
            augment: Augment | None = None, shuffle_buffer: int = 0, shard: int | None = None,
            num_shards: int | None = None, workers: int = 4, pool: str = "dummy", rows: int | None = None,
            num_classes: int | None = None, one_hot: int | None = None, mixup: float = 0.0):
    """A tf.data.Dataset of (float32 images in [0, 255], targets) batches from a Petastorm split: int32 class
    labels, or with `num_classes` (multilabel) float32 multi-hot rows of that many findings; `one_hot`: class labels
    as float32 one-hot rows of that many classes (the soft targets mixup needs, on every split alike); `mixup`:
    training batches mixed (`batches`).
    rows: the split's row count when the whole split is read (gives Keras its progress totals)."""
    import tensorflow as tf

    epoch = itertools.count()  # a new row-group order every pass

    multilabel = num_classes is not None

    def gen():
        yield from read_rows(url, shuffle=training, seed=seed + next(epoch) if training else None, shard=shard,
                             num_shards=num_shards, workers=workers, pool=pool, multilabel=multilabel)

    target = tf.TensorSpec((num_classes,), tf.float32) if multilabel else tf.TensorSpec((), tf.int32)
    ds = tf.data.Dataset.from_generator(gen, output_signature=(tf.TensorSpec(shape, tf.uint8), target))
    if rows is not None and num_shards is None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(rows))
    if training and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return batches(ds, batch_size, augment if training else None, seed, one_hot, mixup if training else 0.0)


def batches(ds, batch_size: int, augment: Augment | None, seed: int, one_hot: int | None = None,
            mixup: float = 0.0):
    """The tail every training input shares: (uint8 image, label) rows -> float32 batches (labels one-hot rows of
    `one_hot` classes if given), augmented when `augment` is given and active, mixed when `mixup` > 0 (`mix`),
    prefetched."""
    import tensorflow as tf

    def cast(x, y):
        return tf.cast(x, tf.float32), (tf.one_hot(y, one_hot) if one_hot else y)

    ds = ds.batch(batch_size).map(cast, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None and augment.active:
        layer = augment_layer(augment, seed)
        ds = ds.map(lambda x, y: (layer(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    if mixup:
        ds = ds.map(lambda x, y: mix(x, y, mixup, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def mix(x, y, alpha: float, seed: int):
    """mixup (Zhang et al. 2018) of one batch: every image blended with another of the batch (a random pairing) by
    one weight lam ~ Beta(alpha, alpha), its float targets (one-hot or multi-hot) by the same lam."""
    import tensorflow as tf

    g = tf.random.gamma([2], alpha, seed=seed)  # Beta(a, a) = G1 / (G1 + G2)
    lam = g[0] / (g[0] + g[1])
    pair = tf.random.shuffle(tf.range(tf.shape(x)[0]), seed=seed)
    y = tf.cast(y, tf.float32)
    return lam * x + (1 - lam) * tf.gather(x, pair), lam * y + (1 - lam) * tf.gather(y, pair)
