"""`elephas_sync`: Elephas `SparkModel`, synchronous data parallelism over the partitions of the train split.

Every epoch each worker (one Spark task per partition, decoded on the executor that reads the Parquet)
starts from the driver's weights, makes one pass over its partition, and the driver averages the workers'
updates (model averaging). As in Elephas, each worker's optimizer restarts every epoch. The epoch loop is
ours, one `SparkModel.fit(epochs=1)` per epoch (exactly the loop Elephas runs inside), so that every epoch
is timed and validated and early stopping and the learning-rate schedule work as they do for `single`.
Not applied here: augmentation (Elephas workers fit on in-memory arrays) and class weights are passed on.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..data import loader
from .api import BackendError, TrainJob, TrainResult
from .keras_fit import compile_model
from .placement import task_slots
from .schedule import EarlyStop, LrSchedule

log = logging.getLogger(__name__)


def partitions_for(job: TrainJob, workers: int | None, backend: str) -> int:
    """One partition per worker (default: every task slot); each must hold more rows than a batch, because
    Elephas silently skips training on a smaller partition yet still averages its (zero) update."""
    n = int(workers or task_slots(job.spark))
    if n < 1:
        raise BackendError(f"backend.workers={workers} must be >= 1 (backend={backend})")
    rows, bs = job.data.sizes["train"], job.train.batch_size
    if rows // n <= bs:
        raise BackendError(f"backend={backend}: {rows} training rows over {n} workers is {rows // n} per worker, not "
                           f"more than train.batch_size={bs}; lower backend.workers or train.batch_size")
    if n > task_slots(job.spark):
        log.warning("%s: %d workers but %d task slots: partitions will queue", backend, n, task_slots(job.spark))
    return n


class ElephasSync:
    supports_resume = False  # Spark workers keep no checkpoints

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def fit(self, job: TrainJob) -> TrainResult:
        import keras
        from elephas.spark_model import SparkModel
        from pyspark import StorageLevel

        keras.utils.set_random_seed(job.seed)
        t, d = job.train, job.data
        n, bs = partitions_for(job, self.workers, self.name), t.batch_size
        rdd = loader.spark_rows(job.spark, d.split_url("train"), d.shape, n, len(d.classes), d.multilabel).persist(
            StorageLevel.MEMORY_AND_DISK)
        model = job.build_model()
        compile_model(model, job)
        spark_model = SparkModel(model, num_workers=None, batch_size=bs)  # partitioned above: no second shuffle
        val = job.dataset("val", False, bs)
        rates, stop, history, epoch_seconds = LrSchedule(t), EarlyStop(t), {}, []  # the rules model.fit follows
        start = time.perf_counter()
        try:
            for epoch in range(t.epochs):
                t0 = time.perf_counter()
                model.optimizer.learning_rate.assign(rates.lr_for(epoch))  # serialized to the workers
                seen = len(spark_model.training_histories)
                spark_model.fit(rdd, epochs=1, batch_size=bs, verbose=0, shuffle=True, class_weight=job.class_weight())
                worker_logs = [h for h in spark_model.training_histories[seen:] if h]
                logs = {k: float(np.mean([h[k][-1] for h in worker_logs])) for k in worker_logs[0]
                        if not k.startswith("val_")}  # loss, accuracy (and auc, multilabel)
                logs |= {f"val_{k}": float(v) for k, v in model.evaluate(val, verbose=0, return_dict=True).items()}
                logs["learning_rate"] = rates.lr
                epoch_seconds.append(time.perf_counter() - t0)
                for k, v in logs.items():
                    history.setdefault(k, []).append(v)
                if t.verbose:
                    print(f"elephas_sync epoch {epoch + 1}/{t.epochs} - {epoch_seconds[-1]:.0f}s - {len(worker_logs)} "
                          f"workers - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
                rates.end_epoch(logs)
                if stop.end_epoch(epoch, logs, model.get_weights()):
                    log.info("early stopping after epoch %d: best %s at epoch %d", epoch + 1, stop.monitor,
                             stop.best_epoch + 1)
                    break
        finally:
            rdd.unpersist()
        seconds = time.perf_counter() - start
        if stop.best_weights is not None:
            model.set_weights(stop.best_weights)  # as EarlyStopping(restore_best_weights=True)
        return TrainResult(model, history, epoch_seconds, seconds, d.sizes["train"] * len(epoch_seconds), workers=n,
                           global_batch_size=bs * n,
                           params={"mode": "synchronous", "averaging": "per epoch", "augmentation": "not applied"},
                           metrics={"best_epoch": stop.best_epoch})
