"""THE Keras fit path: every backend that trains with `model.fit` (single, mirrored, each spark_barrier worker,
each ensemble member) calls `fit`, which builds and compiles the model from the job, wires the callbacks (early
stopping, learning-rate schedule, snapshots, resume checkpoint, epoch timer, live MLflow metrics), fits and returns
a TrainResult (with train.snapshots, its model is the snapshots' soft vote: backends/snapshots.py).

What differs between strategies is what the backend passes in: the datasets (a whole split, a worker's shard, a
bootstrap sample), the batch size, the distribution strategy whose scope holds the model, the seed and model
overrides of an ensemble member, and how loud this worker is. Loss and metrics are decided in `compile_model`,
from the job, and nowhere else (the Elephas backends compile through it too).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

from . import schedule, snapshots
from .api import TrainJob, TrainResult

log = logging.getLogger(__name__)
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}  # train.optimizer -> keras


def loss_and_metrics(job: TrainJob) -> tuple[Any, list]:
    """The job's task decides: integer class labels and a softmax (sparse categorical cross-entropy, accuracy), or
    multi-hot findings and one sigmoid each (binary cross-entropy, positives weighted per finding with
    train.class_weight=balanced; binary accuracy as `accuracy`, and the mean ROC-AUC over findings as `auc`).
    train.label_smoothing softens the targets of either (losses.SmoothedSparseCE for class labels); with
    train.mixup class labels come as one-hot rows (categorical cross-entropy)."""
    import keras

    smooth = job.train.label_smoothing
    if not job.data.multilabel:
        if job.train.mixup:  # its targets are one-hot rows (TrainJob.dataset), mixed in training batches
            return keras.losses.CategoricalCrossentropy(label_smoothing=smooth), ["accuracy"]
        if not smooth:
            return "sparse_categorical_crossentropy", ["accuracy"]
        from .losses import SmoothedSparseCE

        return SmoothedSparseCE(smooth), ["accuracy"]
    pos = job.positive_weights()
    if pos is None:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=smooth)
    else:
        from .losses import PositiveWeightedBCE

        loss = PositiveWeightedBCE(pos, label_smoothing=smooth)
    return loss, [keras.metrics.BinaryAccuracy(name="accuracy"),
                  keras.metrics.AUC(multi_label=True, num_labels=len(job.data.classes), name="auc")]


def compile_model(model, job: TrainJob) -> None:
    """The optimizer of `train`, and the loss and metrics of the job's targets (`loss_and_metrics`)."""
    import keras

    t = job.train
    kwargs: dict[str, Any] = {"learning_rate": t.lr}
    if t.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    if t.optimizer == "adamw":
        kwargs["weight_decay"] = t.weight_decay
    if t.ema:  # the weights fit() ends with are the moving average (Keras swaps them in at the end of fit)
        kwargs.update(use_ema=True, ema_momentum=t.ema)
    optimizer = getattr(keras.optimizers, OPTIMIZERS[t.optimizer])(**kwargs)
    loss, metrics = loss_and_metrics(job)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


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


_live: "LiveMetrics | None" = None  # the LiveMetrics in effect in this process (train.py's fit of the run)


class LiveMetrics:
    """Each epoch's metrics (loss, accuracy, val_*, epoch_learning_rate, epoch_seconds; step = epoch) logged to the
    MLflow run as the epoch ends, so the UI shows the curves while training runs. A context manager: train.py wraps
    the backend's fit of the run in it; every `fit` in this process meanwhile logs live (single, mirrored: their
    fit runs in the driver). Backends whose fit runs in Spark executors (spark_barrier, ensemble, elephas) have no
    MLflow run there: their history is logged when fit returns. `logged` holds the (metric, step) pairs sent, which
    tracking.log_training then does not log again. A failed log never stops training: live logging stops (with one
    warning) and the rest is logged after fit."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self.logged: set[tuple[str, int]] = set()

    def __enter__(self) -> "LiveMetrics":
        global _live
        if self.run_id is None:
            import mlflow

            run = mlflow.active_run()
            self.run_id = run.info.run_id if run else None
        _live = self if self.run_id else None
        return self

    def __exit__(self, *exc) -> None:
        global _live
        _live = None

    def log(self, metrics: list) -> bool:
        """Send `metrics` (mlflow Metric) to the run; False (and live logging off, one warning) if the store fails."""
        from mlflow import MlflowClient

        if self.run_id is None:
            return False
        from ..interrupts import deferred

        try:
            with deferred():  # a SIGTERM mid-write would leave the store's session half done: raised after it
                for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
                    MlflowClient().log_batch(self.run_id, metrics=metrics[i:i + 1000])
        except Exception as e:  # the tracking store hiccuped: train on, log the rest at the end
            log.warning("live metrics stopped (%s); the rest is logged after training", e)
            self.run_id = None
            return False
        self.logged.update((m.key, m.step) for m in metrics)
        return True

    def callback(self, timer, checkpoint=None):
        """The Keras callback; `timer` (EpochTimer, which runs first) gives epoch_seconds. A training resumed from
        `checkpoint` logs the epochs it restored as it starts (their curves first, then the new epochs')."""
        import keras
        from mlflow.entities import Metric

        from ..tracking import history_metric

        live = self

        class _Live(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):  # after the checkpoint's: it has restored the history by now
                restored = checkpoint.resumed_epochs if checkpoint is not None else 0
                if restored:
                    now = int(time.time() * 1000)
                    live.log([Metric(history_metric(k), float(v), now, step)
                              for k, vals in checkpoint.history.items() for step, v in enumerate(vals[:restored])])

            def on_epoch_end(self, epoch, logs=None):
                now = int(time.time() * 1000)
                values = {history_metric(k): float(v) for k, v in (logs or {}).items()}
                if timer.seconds:
                    values["epoch_seconds"] = timer.seconds[-1]
                live.log([Metric(k, v, now, epoch) for k, v in values.items()])

        return _Live()


def callbacks(job: TrainJob, keeper=None) -> list:
    """Early stopping that restores the best weights and the learning-rate schedule (both from schedule.py), the
    snapshot keeper (snapshots.py) if any, and with a checkpoint the per-epoch backup that lets a killed run resume
    (last: it records what the others logged, and backs up an epoch only after its snapshot is written)."""
    out = schedule.keras_callbacks(job.train) + ([keeper] if keeper is not None else [])
    if job.checkpoint is not None:
        out.append(job.checkpoint.callback(others=list(out)))
    return out


@contextlib.contextmanager
def precision(mixed: bool):
    """train.mixed_precision: the model is built and compiled under Keras' `mixed_float16` policy (float16 compute,
    float32 weights; compile wraps the optimizer in a LossScaleOptimizer; the output layer, models._common.head, is
    float32), then the global policy is restored: the layers keep theirs, nothing else in the process changes."""
    if not mixed:
        yield
        return
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def history_dict(history) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def fit(job: TrainJob, train_data, val_data=None, *, batch_size: int, images_per_epoch: int | None = None,
        steps_per_epoch: int | None = None, validation_steps: int | None = None, validation_batch_size=None,
        strategy=None, seed: int | None = None, model_overrides: dict | None = None, class_weight: bool = True,
        prepare: Callable[[Any], None] | None = None, extra_callbacks: tuple = (), verbose: int | None = None,
        workers: int = 1, params: dict | None = None) -> TrainResult:
    """Build (inside `strategy`'s scope, if any) and compile the job's model, fit it on `train_data` (validated on
    `val_data`), and return the result. `images_per_epoch` defaults to the train split's size; `class_weight=False`
    when the dataset carries its own sample weights; `prepare(model)` runs after compiling (strategy fixes)."""
    import keras

    keras.utils.set_random_seed(job.seed if seed is None else seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext(), \
            precision(bool(getattr(job.train, "mixed_precision", False))):
        model = job.build_model(**(model_overrides or {}))
        compile_model(model, job)
    if prepare is not None:
        prepare(model)
    timer = EpochTimer()
    keeper = snapshots.keeper(job)
    live = [_live.callback(timer, job.checkpoint)] if _live is not None else []  # last: it sees what the others put in the logs
    start = time.perf_counter()
    hist = model.fit(train_data, validation_data=val_data, epochs=job.train.epochs, steps_per_epoch=steps_per_epoch,
                     validation_steps=validation_steps, validation_batch_size=validation_batch_size,
                     callbacks=[timer, *callbacks(job, keeper), *extra_callbacks, *live],
                     class_weight=job.class_weight() if class_weight else None,
                     shuffle=False,  # the loader shuffles (row groups, then a buffer)
                     verbose=job.train.verbose if verbose is None else verbose)
    seconds = time.perf_counter() - start
    if keeper is not None:
        model = keeper.vote(model, job.build_model)
    ckpt = job.checkpoint  # resumed: its history also holds the epochs trained before the interruption
    per_epoch = job.data.sizes["train"] if images_per_epoch is None else images_per_epoch
    return TrainResult(model, ckpt.history if ckpt else history_dict(hist), list(timer.seconds), seconds,
                       per_epoch * len(timer.seconds), workers=workers, global_batch_size=batch_size,
                       params=dict(params or {}), resumed_epochs=ckpt.resumed_epochs if ckpt else 0)


def recalibrate_batchnorm(model, dataset, batches: int = 50) -> int:
    """Re-estimate BatchNorm moving statistics as the plain average of up to `batches` training batches'
    statistics (forward passes in training mode; weights untouched; whatever the old statistics were).
    For strategies whose workers keep their own statistics: asynchronous training, where summed updates from
    workers that started from the same weights overshoot them (the moving variance can even go negative), and
    spark_barrier, where each worker's statistics follow only its own shard. Returns batches used."""
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
