"""`single`: one process trains in the driver. The baseline every other strategy is measured against."""
from __future__ import annotations

import logging
import math
import time

from .base import EpochTimer, TrainJob, TrainResult, callbacks, compile_model, history_dict

log = logging.getLogger(__name__)


class Single:
    name = "single"
    supports_resume = True  # model.fit with base.Checkpoint: train.resume=true continues a killed run

    def __init__(self, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 reader_pool: str = "dummy", reader_workers: int = 4):
        self.intra, self.inter = intra_op_threads, inter_op_threads
        self.reader_pool, self.reader_workers = reader_pool, reader_workers

    def _threads(self):
        import tensorflow as tf

        try:  # only possible before TensorFlow's runtime starts; later calls keep what is set
            if self.intra not in (None, "*"):
                tf.config.threading.set_intra_op_parallelism_threads(int(self.intra))
            if self.inter:
                tf.config.threading.set_inter_op_parallelism_threads(int(self.inter))
        except RuntimeError:
            log.info("TensorFlow already initialized: thread pools left as they are")

    def fit(self, job: TrainJob) -> TrainResult:
        import keras

        self._threads()
        keras.utils.set_random_seed(job.seed)
        t, d = job.train, job.data
        bs = int(t.batch_size)
        ds = lambda split, training: job.dataset(split, training, bs, pool=self.reader_pool,  # noqa: E731
                                                 workers=self.reader_workers)
        model = job.build_model()
        compile_model(model, t)
        timer = EpochTimer()
        steps = math.ceil(d.sizes["train"] / bs)
        start = time.perf_counter()
        hist = model.fit(ds("train", True), validation_data=ds("val", False) if d.sizes["val"] else None,
                         epochs=int(t.epochs), callbacks=[timer, *callbacks(t, steps, job.checkpoint)],
                         class_weight=job.class_weight(), shuffle=False,  # the loader shuffles
                         verbose=t.get("verbose", 2))
        seconds = time.perf_counter() - start
        epochs_run = len(timer.seconds)
        ckpt = job.checkpoint  # resumed: its history also holds the epochs trained before the interruption
        return TrainResult(model, ckpt.history if ckpt else history_dict(hist), timer.seconds, seconds,
                           d.sizes["train"] * epochs_run, workers=1, global_batch_size=bs,
                           resumed_epochs=ckpt.resumed_epochs if ckpt else 0)
