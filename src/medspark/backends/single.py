"""`single`: one process trains in the driver. The baseline every other strategy is measured against."""
from __future__ import annotations

from . import keras_fit
from .api import TrainJob, TrainResult
from .placement import limit_threads


class Single:
    supports_resume = True  # keras_fit with the job's checkpoint: train.resume=true continues a killed run
    supports_snapshots = True  # the fitted model stays here: train.snapshots can vote (backends/snapshots.py)
    supports_mixup = True  # trains on TrainJob.dataset, whose batches train.mixup mixes

    def __init__(self, intra_op_threads: int | str | None = None, inter_op_threads: int | None = None,
                 reader_pool: str = "dummy", reader_workers: int = 4):
        self.intra = None if intra_op_threads in (None, "*") else int(intra_op_threads)  # "*": all cores
        self.inter = inter_op_threads
        self.reader_pool, self.reader_workers = reader_pool, reader_workers

    def fit(self, job: TrainJob) -> TrainResult:
        limit_threads(self.intra, self.inter)
        bs = job.train.batch_size

        def data(split: str, training: bool):
            return job.dataset(split, training, bs, pool=self.reader_pool, workers=self.reader_workers)

        return keras_fit.fit(job, data("train", True), data("val", False) if job.data.sizes["val"] else None,
                             batch_size=bs)
