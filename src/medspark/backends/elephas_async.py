"""`elephas_async` and `elephas_hogwild`: Elephas `AsynchronousSparkModel` with a parameter server on the driver.

Workers (one Spark task per partition of the train split) pull the server's weights, train (a pass over
their partition with frequency=epoch, one batch with frequency=batch) and push their update, without waiting
for each other: `asynchronous` applies updates under a lock, `hogwild` without. (`SparkModel(mode=...)`
silently trains synchronously; only `AsynchronousSparkModel` does this.) What we fix around Elephas:
- the server and client are ours (`param_server`): Elephas' lock stays taken after a failing update (one bad
  request hangs training), its client has no timeout, and anyone who reaches the driver can read the weights and
  push updates. Ours: a per-run secret on every request, bodies parsed as raw arrays of the model's exact layout,
  refusals counted (`ps_rejected_requests`), timeouts and a bounded retry;
- the server binds `bind_host` (loopback in local mode, the driver's address on a cluster) on a free port, or on
  `backend.port`, which fails in one line before training when another program holds it;
- executors reach the server at `spark.driver.host` (or `advertise_host`), not at Elephas' own guess;
- updates the server accepted are counted (a Spark accumulator in the client), and the server is stopped
  even when training fails.
- BatchNorm moving statistics are re-estimated on the server's final weights (forward passes over up to 50
  training batches): summed asynchronous updates overshoot them, and the moving variance can go negative.
Elephas reports no history in this mode: the final model is validated once, and each epoch's time is the mean.
"""
from __future__ import annotations

import logging
import re
import time

import numpy as np

from ..data import loader
from .api import BackendError, TrainJob, TrainResult
from .keras_fit import compile_model, recalibrate_batchnorm
from .param_server import ParamClient, ParameterServerError, ParamServer
from .placement import driver_host
from .elephas_sync import partitions_for

log = logging.getLogger(__name__)
MODES = ("asynchronous", "hogwild")
FREQUENCIES = ("epoch", "batch")


def spark_model(model, server: ParamServer, client: ParamClient, batch_size: int, mode: str, frequency: str):
    """Elephas' AsynchronousSparkModel driving our server and client (its own constructor would make Elephas')."""
    from elephas.parameter.client import BaseParameterClient
    from elephas.spark_model import AsynchronousSparkModel, SparkModel

    BaseParameterClient.register(ParamClient)  # AsynchronousSparkWorker takes a client only if it is one
    sm = AsynchronousSparkModel.__new__(AsynchronousSparkModel)
    SparkModel.__init__(sm, model, batch_size=batch_size)
    sm.mode, sm.frequency, sm.parameter_server_mode = mode, frequency, "http"
    sm.parameter_server, sm.client = server, client  # _fit: start(), the workers' calls, stop()
    return sm


class ElephasAsync:
    supports_resume = False  # Spark workers keep no checkpoints

    def __init__(self, mode: str = "asynchronous", frequency: str = "epoch", workers: int | None = None,
                 bind_host: str | None = None, advertise_host: str | None = None, port: int | None = None,
                 timeout_s: float = 60, retries: int = 3):
        if mode not in MODES:
            raise BackendError(f"backend.mode={mode!r} must be one of {', '.join(MODES)}")
        if frequency not in FREQUENCIES:
            raise BackendError(f"backend.frequency={frequency!r} must be one of {', '.join(FREQUENCIES)}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise BackendError(f"backend.timeout_s={timeout_s!r} must be a number of seconds above 0")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise BackendError(f"backend.retries={retries!r} must be an integer from 0 to 10")
        self.mode, self.frequency, self.workers = mode, frequency, workers
        self.bind_host, self.advertise_host, self.port = bind_host, advertise_host, port
        self.timeout_s, self.retries = timeout_s, retries

    def hosts(self, spark) -> tuple[str, str]:
        """(address the server binds, address executors connect to)."""
        return driver_host(spark, self.bind_host), driver_host(spark, self.advertise_host)

    def fit(self, job: TrainJob) -> TrainResult:
        import keras
        from pyspark import StorageLevel

        keras.utils.set_random_seed(job.seed)
        t, d, sc = job.train, job.data, job.spark.sparkContext
        n, bs, epochs = partitions_for(job, self.workers, self.name), t.batch_size, t.epochs
        bind, advertise = self.hosts(job.spark)
        model = job.build_model()
        compile_model(model, job)
        initial = model.get_weights()
        updates = sc.accumulator(0)
        # binds now: a forced port another program holds fails here, in one line, before Spark reads anything
        with ParamServer(initial, self.mode, bind, self.port or 0, self.timeout_s) as server:
            sm = spark_model(model, server, server.client(advertise, updates, self.retries), bs, self.mode,
                             self.frequency)
            rdd = loader.spark_rows(job.spark, d.split_url("train"), d.shape, n, len(d.classes),
                                    d.multilabel).persist(StorageLevel.MEMORY_AND_DISK)
            log.info("%s: parameter server on %s:%d (executors use %s:%d), %d workers, frequency=%s", self.name,
                     bind, server.port, advertise, server.port, n, self.frequency)
            start = time.perf_counter()
            try:
                server.start()
                sm.fit(rdd, epochs=epochs, batch_size=bs, verbose=0, shuffle=True, class_weight=job.class_weight())
            except Exception as e:  # a worker's ParameterServerError arrives inside Spark's Java error: its line
                line = re.search(r"ParameterServerError: (.+)", str(e))
                if line:
                    raise ParameterServerError(line.group(1).strip()) from e
                raise
            finally:
                rdd.unpersist()
        seconds = time.perf_counter() - start
        ps = server.stats()
        if ps["rejected"]:
            log.warning("%s: the parameter server refused %d request(s), by HTTP status: %s", self.name,
                        ps["rejected"], ps["by_status"])
        if updates.value == 0:
            raise BackendError(f"{self.name}: the parameter server received no update; check that executors can "
                               f"reach {advertise}:{server.port} (backend.advertise_host, backend.bind_host)")
        moved = float(np.mean([np.abs(a - b).mean() for a, b in zip(model.get_weights(), initial)]))
        bn_batches = recalibrate_batchnorm(model, job.dataset("train", False, bs), batches=50)
        val = model.evaluate(job.dataset("val", False, bs), verbose=0, return_dict=True)
        if t.verbose:
            print(f"{self.name}: {epochs} epochs in {seconds:.0f}s, {updates.value} updates from {n} workers, val "
                  + " - ".join(f"{k}: {v:.4f}" for k, v in val.items()), flush=True)
        history = {f"val_{k}": [float(v)] for k, v in val.items()}
        return TrainResult(model, history, [seconds / epochs] * epochs, seconds, d.sizes["train"] * epochs, workers=n,
                           global_batch_size=bs * n,
                           params={"mode": self.mode, "frequency": self.frequency, "server": f"{bind}:{server.port}",
                                   "epoch_seconds": "mean (Elephas async reports no per-epoch times)",
                                   "augmentation": "not applied"},
                           metrics={"ps_updates": updates.value, "ps_mean_abs_weight_change": moved,
                                    "ps_rejected_requests": ps["rejected"],
                                    "ps_unauthorized_requests": ps["unauthorized"],
                                    "bn_recalibration_batches": bn_batches})

