"""Spark's Python daemon for medspark's executors (`spark.python.daemon.module`, set by medspark.spark.quiet_conf):
PySpark's own daemon, whose forked Python workers import TensorFlow with its C++ start-up noise filtered exactly as
the driver does (medspark.cli.native_noise_filtered: cuDNN/cuFFT/cuBLAS "already registered", oneDNN, CPU
instruction lines, and on machines without a GPU the missing CUDA driver). Real errors still print.

Whatever a task imports first (keras, tensorflow, Elephas' worker, a backend's own code), the first
`import tensorflow` in a worker goes through the filter: a finder on `sys.meta_path` wraps TensorFlow's loader once.
Without the daemon (spark.python.use.daemon=false, Windows) workers import TensorFlow unfiltered; errors still
print either way. cluster.conf may set spark.python.daemon.module back to pyspark.daemon. spark_barrier's worker
processes (started by its tasks, not forked by the daemon) call `install()` themselves.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for `tensorflow`, it returns TensorFlow's own spec with a loader that runs the real
    one inside the filter (and then looks for GPUs there, where CUDA initializes), and removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        from .cli import native_noise_filtered, quiet_native_logs

        quiet_native_logs()
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps TensorFlow's own loader
        with native_noise_filtered():
            self.loader.exec_module(module)
            module.config.list_physical_devices("GPU")


def install() -> None:
    """Filter this process's first TensorFlow import (and that of every process forked from it)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlow())


if __name__ == "__main__":
    install()
    from pyspark.daemon import manager

    manager()
