"""`elephas_async` and `elephas_hogwild`: Elephas `AsynchronousSparkModel` with a parameter server on the driver.

Workers (one Spark task per partition of the train split) pull the server's weights, train (a pass over
their partition with frequency=epoch, one batch with frequency=batch) and push their update, without waiting
for each other: `asynchronous` applies updates under a lock, `hogwild` without. (`SparkModel(mode=...)`
silently trains synchronously; only `AsynchronousSparkModel` does this.) What we fix around Elephas:
- the server's port is a free one, it binds `bind_host` (loopback in local mode, the driver's address on a
  cluster) and runs with Flask's debug mode off (Elephas turns it on, an interactive debugger on the network);
- executors reach the server at `spark.driver.host` (or `advertise_host`), not at Elephas' own guess;
- updates the server accepted are counted (a Spark accumulator in the client), and the server is stopped
  even when training fails.
- BatchNorm moving statistics are re-estimated on the server's final weights (forward passes over up to 50
  training batches): summed asynchronous updates overshoot them, and the moving variance can go negative.
Elephas reports no history in this mode: the final model is validated once, and each epoch's time is the mean.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import numpy as np

from ..data import loader
from .api import BackendError, TrainJob, TrainResult
from .keras_fit import compile_model, recalibrate_batchnorm
from .placement import driver_host, free_port
from .elephas_sync import partitions_for

log = logging.getLogger(__name__)
MODES = ("asynchronous", "hogwild")
FREQUENCIES = ("epoch", "batch")


def counting_client(url: str, counter):
    """Elephas' HTTP client, pointed at `url` (host:port), counting the updates the server accepted."""
    from elephas.parameter.client import HttpClient

    class CountingHttpClient(HttpClient):
        def __init__(self):
            self.master_url, self.headers, self.counter = url, {"Content-Type": "application/elephas"}, counter

        def update_parameters(self, delta):
            reply = super().update_parameters(delta)  # raises unless the server answered 200
            self.counter.add(1)
            return reply

    return CountingHttpClient()


@contextmanager
def _local_ip(host: str):
    """Elephas' server binds (and waits for) the address in SPARK_LOCAL_IP, read in the driver process."""
    old = os.environ.get("SPARK_LOCAL_IP")
    os.environ["SPARK_LOCAL_IP"] = host
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARK_LOCAL_IP", None)
        else:
            os.environ["SPARK_LOCAL_IP"] = old


def _stop(server) -> None:
    proc = getattr(server, "server", None)
    try:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(10)
    except ValueError:  # already closed by Elephas' own stop()
        pass


class ElephasAsync:
    supports_resume = False  # Spark workers keep no checkpoints

    def __init__(self, mode: str = "asynchronous", frequency: str = "epoch", workers: int | None = None,
                 bind_host: str | None = None, advertise_host: str | None = None, port: int | None = None):
        if mode not in MODES:
            raise BackendError(f"backend.mode={mode!r} must be one of {', '.join(MODES)}")
        if frequency not in FREQUENCIES:
            raise BackendError(f"backend.frequency={frequency!r} must be one of {', '.join(FREQUENCIES)}")
        self.mode, self.frequency, self.workers = mode, frequency, workers
        self.bind_host, self.advertise_host, self.port = bind_host, advertise_host, port

    def hosts(self, spark) -> tuple[str, str]:
        """(address the server binds, address executors connect to)."""
        return driver_host(spark, self.bind_host), driver_host(spark, self.advertise_host)

    def fit(self, job: TrainJob) -> TrainResult:
        import keras
        from elephas.spark_model import AsynchronousSparkModel
        from pyspark import StorageLevel

        keras.utils.set_random_seed(job.seed)
        t, d, sc = job.train, job.data, job.spark.sparkContext
        n, bs, epochs = partitions_for(job, self.workers, self.name), t.batch_size, t.epochs
        bind, advertise = self.hosts(job.spark)
        port = int(self.port or free_port(bind))
        rdd = loader.spark_rows(job.spark, d.split_url("train"), d.shape, n).persist(StorageLevel.MEMORY_AND_DISK)
        model = job.build_model()
        compile_model(model, job)
        initial = model.get_weights()
        updates = sc.accumulator(0)
        with _local_ip(bind):
            spark_model = AsynchronousSparkModel(model, num_workers=None, batch_size=bs, mode=self.mode,
                                                 frequency=self.frequency, parameter_server_mode="http", port=port)
        spark_model.parameter_server.debug = False  # read when the server process starts, in fit()
        spark_model.client = counting_client(f"{advertise}:{port}", updates)
        log.info("%s: parameter server on %s:%d (executors use %s:%d), %d workers, frequency=%s", self.name, bind,
                 port, advertise, port, n, self.frequency)
        start = time.perf_counter()
        try:
            with _local_ip(bind):
                spark_model.fit(rdd, epochs=epochs, batch_size=bs, verbose=0, shuffle=True,
                                class_weight=job.class_weight())
        finally:
            _stop(spark_model.parameter_server)
            rdd.unpersist()
        seconds = time.perf_counter() - start
        if updates.value == 0:
            raise BackendError(f"{self.name}: the parameter server received no update; check that executors can "
                               f"reach {advertise}:{port} (backend.advertise_host, backend.bind_host)")
        moved = float(np.mean([np.abs(a - b).mean() for a, b in zip(model.get_weights(), initial)]))
        bn_batches = recalibrate_batchnorm(model, job.dataset("train", False, bs), batches=50)
        val = model.evaluate(job.dataset("val", False, bs), verbose=0, return_dict=True)
        if t.verbose:
            print(f"{self.name}: {epochs} epochs in {seconds:.0f}s, {updates.value} updates from {n} workers, val "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in val.items()), flush=True)
        history = {f"val_{k}": [float(v)] for k, v in val.items()}
        return TrainResult(model, history, [seconds / epochs] * epochs, seconds, d.sizes["train"] * epochs, workers=n,
                           global_batch_size=bs * n,
                           params={"mode": self.mode, "frequency": self.frequency, "server": f"{bind}:{port}",
                                   "epoch_seconds": "mean (Elephas async reports no per-epoch times)",
                                   "augmentation": "not applied"},
                           metrics={"ps_updates": updates.value, "ps_mean_abs_weight_change": moved,
                                    "bn_recalibration_batches": bn_batches})

