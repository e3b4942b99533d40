"""`mirrored`: tf.distribute.MirroredStrategy, synchronous data parallelism inside one process.

One replica per local GPU (all-reduce every step). Without GPUs the CPU is split into `cpu_replicas`
logical devices so the same code path runs on CPU-only machines: a test of the strategy, not a speed-up,
since the replicas share the same cores. The global batch is per-replica batch x replicas; Keras splits
each global batch across the replicas.
"""
from __future__ import annotations

import logging

from . import keras_fit
from .api import BackendError, TrainJob, TrainResult

log = logging.getLogger(__name__)


def devices(gpus: int | None, cpu_replicas: int) -> list[str]:
    """The devices to mirror over: the first `gpus` GPUs (null = all), else `cpu_replicas` logical CPUs."""
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    if gpus is not None and int(gpus) > len(found):
        raise BackendError(f"backend.gpus={gpus} but {len(found)} GPU(s) are visible; set backend.gpus<={len(found)} "
                           "or null (all GPUs, or logical CPU replicas when there are none)")
    if found and gpus != 0:
        return [f"/gpu:{i}" for i in range(len(found) if gpus is None else int(gpus))]
    n = int(cpu_replicas)
    if n < 1:
        raise BackendError(f"backend.cpu_replicas={cpu_replicas} must be >= 1")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:  # TensorFlow already started in this process: use what it has
        pass
    have = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(have) < n:
        raise BackendError(f"backend.cpu_replicas={n} but TensorFlow already started in this process with "
                           f"{len(have)} CPU device(s); run the job in a fresh process (python -m medspark.train)")
    return have[:n]


class Mirrored:
    supports_resume = True  # keras_fit with the job's checkpoint: train.resume=true continues a killed run
    supports_snapshots = True  # the fitted model stays here: train.snapshots can vote (backends/snapshots.py)
    supports_mixup = True  # trains on TrainJob.dataset, whose batches train.mixup mixes

    def __init__(self, gpus: int | None = None, cpu_replicas: int = 2, per_replica_batch: int | None = None):
        self.gpus, self.cpu_replicas, self.per_replica_batch = gpus, cpu_replicas, per_replica_batch

    def fit(self, job: TrainJob) -> TrainResult:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(devices(self.gpus, self.cpu_replicas))
        replicas = strategy.num_replicas_in_sync
        bs = int(self.per_replica_batch or job.train.batch_size) * replicas
        log.info("mirrored: %d replicas on %s, global batch %d", replicas, strategy.extended.worker_devices, bs)
        result = keras_fit.fit(job, job.dataset("train", True, bs),
                               job.dataset("val", False, bs) if job.data.sizes["val"] else None, batch_size=bs,
                               strategy=strategy, workers=replicas,
                               params={"devices": ",".join(strategy.extended.worker_devices)})
        plain = job.build_model()  # the same weights outside the strategy: predicts, saves and loads like any model
        plain.set_weights(result.model.get_weights())
        result.model = plain
        return result
