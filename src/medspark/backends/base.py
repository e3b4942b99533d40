"""The one interface every parallel strategy implements, plus the Keras pieces they all share.

A backend gets a TrainJob (where the Petastorm splits are, how to build the model, the `train` config)
and returns a TrainResult (a Keras model in the driver, per-epoch history and timings). It never knows
which dataset it trains on, and the entrypoint never knows how the backend parallelizes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..config import ConfigError
from ..data import loader
from ..data.loader import Augment
from ..data.materialize import Materialized
from . import schedule

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    data: Materialized
    build_model: Callable[..., Any]  # (**model overrides, e.g. name=, dropout=) -> an uncompiled keras.Model
    train: Any  # the `train` config group (DictConfig or dict)
    spark: Any = None  # the SparkSession, for backends that train on executors
    seed: int = 0
    checkpoint: "Checkpoint | None" = None  # per-epoch backup for resuming (backends with supports_resume only)

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
    resumed_epochs: int = 0  # epochs restored from a checkpoint; `history` covers them, `epoch_seconds` does not

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


def callbacks(train, steps_per_epoch: int, checkpoint: "Checkpoint | None" = None) -> list:
    """Early stopping that restores the best weights, the learning-rate schedule from config, and with a
    checkpoint the per-epoch backup that lets a killed run resume (last: it records what the others logged)."""
    import keras

    out = []
    es = train.get("early_stopping") or {}
    if es.get("patience"):
        out.append(keras.callbacks.EarlyStopping(monitor=es.get("monitor", "val_loss"), patience=int(es.patience),
                                                 restore_best_weights=True, verbose=1))
    out += schedule.keras_callbacks(train)  # cosine / plateau, defined once in schedule.py (elephas_sync uses it too)
    if checkpoint is not None:
        out.append(checkpoint.callback(others=list(out)))
    return out


# ---------------------------------------------------------------- checkpoints (train.resume, see medspark.resume)

@dataclass
class Checkpoint:
    """Where a backend that trains with `model.fit` backs up its training at the end of every epoch, so that a
    killed run can go on from there (train.resume=true). Made by medspark.resume.prepare; `callbacks` adds it.

    `<directory>/backup/`: Keras BackupAndRestore (model weights, optimizer state, epoch), two generations, so
    a backup cut in half falls back to the one before. `<directory>/medspark.json`: the run and process that
    own it, and the per-epoch history so far (Keras keeps none). Both are written at every epoch's end as one
    step that a SIGTERM does not cut (medspark.interrupts.deferred), and removed when `fit` ends normally."""
    directory: str  # a local path, or a URL TensorFlow's file system knows (hdfs://, gs://)
    owner: dict[str, Any]  # recorded in medspark.json: run_id, process, key
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch, from the first (restored ones too)
    on_resumed: Callable[[int], None] | None = None  # called once, with the number of epochs restored (> 0)
    on_epoch: Callable[[int], None] | None = None  # called with the number of epochs completed
    resumed_epochs: int = 0  # epochs the backup restored (set when fit starts)

    STATE = "medspark.json"
    BACKUP = "backup"

    def callback(self, others: list):
        """The Keras callback (a BackupAndRestore). `others`: the fit's other callbacks, whose learning-rate
        schedule state is replayed from the history on resuming."""
        import keras

        from ..interrupts import deferred

        ckpt = self

        class _Backup(keras.callbacks.BackupAndRestore):
            def on_train_begin(self, logs=None):
                super().on_train_begin(logs)  # restores weights + optimizer, sets the epoch fit starts from
                ckpt._restored(int(getattr(self.model, "_initial_epoch", None) or 0), others)

            def on_epoch_end(self, epoch, logs=None):
                with deferred():  # history, backup and MLflow tag agree, whenever a SIGTERM comes
                    ckpt._record(epoch, logs or {})  # the history first: it may run ahead of the backup, never behind
                    super().on_epoch_end(epoch, logs)  # the Keras backup of this epoch
                    if ckpt.on_epoch:
                        ckpt.on_epoch(epoch + 1)
                    ckpt._save(epoch + 1)  # epochs_completed last: it never runs ahead of the backup

            def on_train_end(self, logs=None):
                super().on_train_end(logs)  # deletes the backup
                ckpt.remove()

        return _Backup(backup_dir=f"{self.directory}/{self.BACKUP}", double_checkpoint=True)

    def _restored(self, epochs: int, others: list) -> None:
        self.resumed_epochs = epochs
        self.history = {k: v[:epochs] for k, v in self.history.items()}
        if not epochs:
            self.history = {}
            return
        log.info("resuming from the checkpoint in %s: %d epoch(s) done, training from epoch %d", self.directory,
                 epochs, epochs + 1)
        for cb in others:  # e.g. lr_schedule=plateau: its best/wait/rate follow from the val_loss history
            state = getattr(cb, "schedule", None)
            if isinstance(state, schedule.LrSchedule):
                for i in range(epochs):
                    state.lr_for(i)
                    state.end_epoch({k: v[i] for k, v in self.history.items() if len(v) > i})
        if self.on_resumed:
            self.on_resumed(epochs)

    def _record(self, epoch: int, logs: dict) -> None:
        for k, v in logs.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            vals = self.history.setdefault(k, [])
            del vals[epoch:]
            vals.append(value)
        self._save(epoch)

    def _save(self, epochs_completed: int) -> None:
        write_checkpoint_state(self.directory, {**self.owner, "epochs_completed": epochs_completed,
                                                "history": self.history,
                                                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def remove(self) -> None:
        import tensorflow as tf

        if tf.io.gfile.exists(self.directory):
            tf.io.gfile.rmtree(self.directory)


def read_checkpoint_state(directory: str) -> dict | None:
    """The medspark.json of a checkpoint folder, or None (absent or unreadable)."""
    import json

    import tensorflow as tf

    path = f"{directory}/{Checkpoint.STATE}"
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "r") as f:
            return json.loads(f.read())
    except Exception as e:  # a torn or foreign file: treated as no checkpoint
        log.warning("ignoring unreadable checkpoint state %s: %s", path, e)
        return None


def write_checkpoint_state(directory: str, state: dict) -> None:
    """medspark.json, replaced whole (written beside it, then renamed over it)."""
    import json

    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    path = f"{directory}/{Checkpoint.STATE}"
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write(json.dumps(state))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


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
