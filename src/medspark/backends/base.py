"""The one interface every parallel strategy implements, plus the Keras pieces they all share.

A backend gets a TrainJob (where the Petastorm splits are, how to build the model, the `train` config)
and returns a TrainResult (a Keras model in the driver, per-epoch history and timings). It never knows
which dataset it trains on, and the entrypoint never knows how the backend parallelizes.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..config import ConfigError
from ..data import loader
from ..data.loader import Augment
from ..data.materialize import Materialized

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    data: Materialized
    build_model: Callable[..., Any]  # (**model overrides, e.g. name=, dropout=) -> an uncompiled keras.Model
    train: Any  # the `train` config group (DictConfig or dict)
    spark: Any = None  # the SparkSession, for backends that train on executors
    seed: int = 0

    @property
    def augment(self) -> Augment:
        return Augment(**dict(self.train.get("augment") or {}))

    def dataset(self, split: str, training: bool, batch_size: int, shard: int | None = None,
                num_shards: int | None = None, seed: int | None = None, pool: str = "dummy", workers: int = 4):
        """The tf.data pipeline of one split (or of one worker's shard of its row groups), from config."""
        d = self.data
        return loader.dataset(d.split_url(split), d.shape, batch_size, training=training,
                              seed=self.seed if seed is None else seed, augment=self.augment,
                              shuffle_buffer=int(self.train.get("shuffle_buffer", 1024)), shard=shard,
                              num_shards=num_shards, pool=pool, workers=workers,
                              rows=None if num_shards else d.sizes[split])

    def class_weight(self) -> dict[int, float] | None:
        """'balanced' weights classes by inverse frequency (chest X-ray is 1:2.9); null leaves them equal."""
        if self.train.get("class_weight") != "balanced":
            return None
        counts = [self.data.per_class["train"][c] for c in self.data.classes]
        total = sum(counts)
        return {i: total / (len(counts) * n) for i, n in enumerate(counts) if n}


@dataclass
class TrainResult:
    model: Any  # keras.Model with the weights to evaluate and ship
    history: dict[str, list[float]]  # Keras-style, per epoch (combined across workers where there are several)
    epoch_seconds: list[float]
    train_seconds: float
    images_seen: int
    workers: int = 1
    global_batch_size: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # backend-specific, logged as MLflow params
    metrics: dict[str, float] = field(default_factory=dict)  # backend-specific, logged as MLflow metrics

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds else 0.0


class Backend(Protocol):
    name: str

    def fit(self, job: TrainJob) -> TrainResult: ...


# ---------------------------------------------------------------- shared Keras pieces

def compile_model(model, train) -> None:
    import keras

    opt = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD,
           "rmsprop": keras.optimizers.RMSprop}
    name = train.get("optimizer", "adam")
    if name not in opt:
        raise ValueError(f"train.optimizer={name!r} must be one of {', '.join(opt)}")
    kwargs = {"learning_rate": float(train.lr)}
    if name == "sgd":
        kwargs["momentum"] = 0.9
    if name == "adamw":
        kwargs["weight_decay"] = float(train.get("weight_decay", 1e-4))
    model.compile(optimizer=opt[name](**kwargs), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class EpochTimer:
    """Wall time of every epoch (Keras callback, built lazily so this module stays import-light)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._t)

        return _Timer()


def callbacks(train, steps_per_epoch: int) -> list:
    """Early stopping that restores the best weights, and the learning-rate schedule from config."""
    import keras

    out = []
    es = train.get("early_stopping") or {}
    if es.get("patience"):
        out.append(keras.callbacks.EarlyStopping(monitor=es.get("monitor", "val_loss"), patience=int(es.patience),
                                                 restore_best_weights=True, verbose=1))
    schedule = train.get("lr_schedule", "none")
    if schedule == "plateau":
        out.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6,
                                                     verbose=1))
    elif schedule == "cosine":
        epochs, lr = int(train.epochs), float(train.lr)
        out.append(keras.callbacks.LearningRateScheduler(
            lambda e: 0.5 * lr * (1 + math.cos(math.pi * e / max(1, epochs)))))
    elif schedule != "none":
        raise ValueError(f"train.lr_schedule={schedule!r} must be one of none, plateau, cosine")
    return out


def recalibrate_batchnorm(model, dataset, batches: int = 50) -> int:
    """Re-estimate BatchNorm moving statistics as the plain average of up to `batches` training batches'
    statistics (forward passes in training mode; weights untouched; whatever the old statistics were).
    For asynchronous training, where summed updates from workers that started from the same weights
    overshoot the moving statistics (the moving variance can even go negative). Returns batches used."""
    import keras

    layers = [layer for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for x, _ in dataset.take(batches):
            for layer in layers:  # moving = moving * m + batch * (1 - m), m = i / (i + 1): the running mean
                layer.momentum = used / (used + 1)
            model(x, training=True)  # Keras 3 BatchNormalization assigns its moving stats in call()
            used += 1
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m
    return used


def history_dict(history) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def combine_histories(histories: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-worker Keras histories -> one: the mean of every metric at every epoch all workers reached."""
    histories = [h for h in histories if h]
    if not histories:
        return {}
    keys = set.intersection(*(set(h) for h in histories))
    out = {}
    for k in sorted(keys):
        n = min(len(h[k]) for h in histories)
        out[k] = [float(sum(h[k][i] for h in histories) / len(histories)) for i in range(n)]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def task_slots(spark) -> int:
    """How many Spark tasks can run at once: local[N] -> N; a cluster -> its executors' cores (as registered)."""
    return int(spark.sparkContext.defaultParallelism)


def require_slots(spark, wanted: int, key: str, backend: str) -> None:
    """Fail early, in one line, when a backend needs more simultaneous tasks than the cluster can run."""
    slots = task_slots(spark)
    if wanted > slots:
        raise BackendError(f"backend={backend} asks for {key}={wanted} workers but the cluster has only {slots} task "
                           f"slots (cores); lower {key} or give the cluster more cores (cluster.cores in local mode, "
                          "spark.executor.instances/spark.executor.cores/spark.cores.max under cluster.conf)")


class BackendError(ConfigError):
    """A backend setting that cannot work on this cluster or machine; the message says which key to change."""
