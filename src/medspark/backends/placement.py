"""Where a backend's pieces run: Spark task slots, free ports, the address rule, TensorFlow thread limits."""
from __future__ import annotations

import logging
import os

from .api import BackendError

log = logging.getLogger(__name__)


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


def is_local(spark_or_master) -> bool:
    master = spark_or_master if isinstance(spark_or_master, str) else spark_or_master.sparkContext.master
    return master.startswith("local")


def host(configured: str | None, local: bool, cluster_address) -> str:
    """THE address rule for anything a backend listens on: the configured one, else loopback in local mode (nothing
    leaves the machine), else the machine's cluster address (`cluster_address()`: the driver's or an executor's)."""
    if configured:
        return configured
    return "127.0.0.1" if local else cluster_address()


def driver_host(spark, configured: str | None = None) -> str:
    """An address on the driver (for a server executors reach), by the rule of `host`."""
    return host(configured, is_local(spark), lambda: spark.conf.get("spark.driver.host", None) or "127.0.0.1")


def limit_threads(intra: int | None, inter: int | None = None) -> tuple[int | None, int | None]:
    """TensorFlow's thread pools (and OpenMP's) for this process: only possible before TensorFlow's runtime starts,
    so call it first; later the pools stay as they are (logged). None = leave a pool at TensorFlow's default
    (all cores). Returns the (intra, inter) in force."""
    for var, n in (("TF_NUM_INTRAOP_THREADS", intra), ("OMP_NUM_THREADS", intra), ("TF_NUM_INTEROP_THREADS", inter)):
        if n:
            os.environ[var] = str(int(n))
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    except RuntimeError:
        have = tf.config.threading.get_intra_op_parallelism_threads()
        if intra and have != int(intra):
            log.info("TensorFlow already started in this process with %s threads (wanted %s): pools left as they are",
                     have or "all", intra)
    return (tf.config.threading.get_intra_op_parallelism_threads() or None,
            tf.config.threading.get_inter_op_parallelism_threads() or None)
