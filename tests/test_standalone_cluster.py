"""The distributed backends on a REAL Spark standalone cluster (a master and two 1-core workers on 127.0.0.1,
started by the `standalone_cluster` fixture): executors are separate JVMs with their own Python workers, as on
a real cluster, and the run goes through the real entrypoint as a subprocess (this pytest process already has
a local SparkContext, and a Python process can hold only one)."""
import subprocess
import sys

import mlflow
import pytest

from standalone import standalone_cluster  # noqa: F401  (the session fixture)

BACKENDS = ["spark_barrier", "elephas_sync"]
SMALL = ["dataset.generate.per_class=100", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.epochs=8", "train.batch_size=16", "materialize.row_group_size_mb=1",
         "train.early_stopping.patience=0"]  # 8 epochs of ~280 images: a noisy val_loss must not restore epoch 1
# Flat keys with dots (spark.executor.cores) cannot be addressed as cluster.conf.spark.executor.cores on the
# command line: `++cluster.conf={...}` merges them into the cluster's conf dict instead.
CLUSTER_CONF = ("++cluster.conf={spark.executor.cores:1,spark.executor.memory:1g,spark.driver.host:127.0.0.1,"
                "spark.driver.bindAddress:127.0.0.1,spark.ui.enabled:false,spark.ui.showConsoleProgress:false}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_trains_on_a_real_standalone_cluster(standalone_cluster, tmp_path, backend):  # noqa: F811
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    res = subprocess.run([sys.executable, "-m", "medspark.train", *SMALL, "cluster=standalone",
                          f"cluster.master={standalone_cluster}", CLUSTER_CONF, f"backend={backend}",
                          "backend.workers=2", f"paths.work_dir={tmp_path}/work", f"tracking.uri={uri}",
                          f"tracking.artifact_location={tmp_path}/artifacts"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert run.data.tags["medspark.cluster"] == "standalone" and run.data.tags["medspark.backend"] == backend
    assert p["workers"] == "2" and int(p["global_batch_size"]) > 0
    if backend == "spark_barrier":  # per-worker batch 16 x 2 workers, every step
        assert p["global_batch_size"] == "32" and p["backend_validation"] in ("sharded", "full")
    assert m["test_accuracy"] >= 0.5, f"4 classes (chance 0.25): got {m['test_accuracy']}"
