"""Every parallel strategy trains the same small model on the same synthetic data through the real pipeline
(Spark local[2], Petastorm, Keras, an MLflow store shared by the module), learns, logs the same figures, a
speedup against the `single` run of the same data/model/epochs, and registers a model that loads back.
(`ensemble` and `spark_barrier` have their own modules.)"""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from medspark.backends.api import BackendError
from medspark.data.loader import read_arrays
from medspark.train import train
from conftest import make_cfg

# 100 images per class at 64 px: 280 train rows. Per-worker batch 8: two workers (global batch 16) still take
# ~17 optimizer steps per epoch; with batch 16 (9 steps) mirrored and elephas_sync sometimes ended at chance.
SMALL = ["dataset.generate.per_class=100", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.epochs=8", "train.batch_size=8", "cluster.cores=2", "train.verbose=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("backends")


def run_backend(store, spark, backend, *extra):
    """One in-process run on the shared store; returns the finished MLflow run."""
    cfg = make_cfg(store, [f"backend={backend}", *SMALL, *extra])
    train(cfg, overrides=[f"backend={backend}"], spark=spark)
    runs = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list",
                              filter_string=f"tags.`medspark.backend` = '{backend}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0]


def check_learned_and_loadable(run, chance=0.25):
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["test_accuracy"] >= chance + 0.35, f"{run.data.tags['medspark.backend']}: {m['test_accuracy']}"
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    images, labels = read_arrays(f"{run.data.params['data_url']}/test")
    probs = mlflow.tensorflow.load_model(summary["model_uri"]).predict(images.astype("float32"), verbose=0)
    assert float((probs.argmax(1) == labels).mean()) == pytest.approx(m["test_accuracy"], abs=1e-9)
    for key in ("train_seconds", "train_images_per_second", "epochs_run"):
        assert key in m, key
    assert int(run.data.params["workers"]) >= 1 and int(run.data.params["global_batch_size"]) >= 8
    return m


@pytest.fixture(scope="module")
def single_run(store, spark):
    return run_backend(store, spark, "single")


@pytest.mark.slow
def test_single_is_its_own_baseline(single_run):
    m = check_learned_and_loadable(single_run)
    assert m["speedup_vs_single"] == pytest.approx(1.0)


@pytest.mark.slow
def test_elephas_sync_averages_worker_updates_and_reports_speedup(store, spark, single_run):
    run = run_backend(store, spark, "elephas_sync")
    m = check_learned_and_loadable(run)
    assert run.data.params["workers"] == "2" and run.data.params["global_batch_size"] == "16"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) == m["epochs_run"]
    assert run.data.tags["medspark.baseline"] == single_run.info.run_id, "speedup against the matching single run"
    assert m["speedup_vs_single"] == pytest.approx(
        m["train_images_per_second"] / single_run.data.metrics["train_images_per_second"])
    assert m["parallel_efficiency"] == pytest.approx(m["speedup_vs_single"] / 2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["elephas_async", "elephas_hogwild"])
def test_async_backends_train_through_their_parameter_server(store, spark, single_run, backend):
    run = run_backend(store, spark, backend)
    m = check_learned_and_loadable(run)
    # frequency=epoch: each of the 2 workers pushes once per epoch. The driver's model never trains itself,
    # so an accuracy far above chance means its final weights are the server's.
    assert m["ps_updates"] == 2 * 8
    assert m["ps_mean_abs_weight_change"] > 0
    assert run.data.params["backend_mode"] == backend.removeprefix("elephas_").replace("async", "asynchronous")
    assert "speedup_vs_single" in m


@pytest.mark.slow
def test_mirrored_runs_on_logical_cpus_and_measures_its_baseline(tmp_path):
    """A fresh process: TensorFlow's CPU must be split into logical devices before it starts."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    res = subprocess.run([sys.executable, "-m", "medspark.train", "backend=mirrored", "backend.cpu_replicas=2",
                          "train.measure_baseline=true", *SMALL, f"paths.work_dir={tmp_path}/work",
                          f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/artifacts"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    m = check_learned_and_loadable(run)
    assert run.data.params["workers"] == "2" and run.data.params["global_batch_size"] == "16", "8 per replica x 2"
    assert "CPU:0" in run.data.params["backend_devices"] and "CPU:1" in run.data.params["backend_devices"]
    assert run.data.tags["medspark.baseline"] == "measured in this run" and m["baseline_train_seconds"] > 0


def test_impossible_settings_fail_early_with_the_key_to_change(spark, tmp_path):
    from medspark.backends import build
    from medspark.backends.api import TrainJob
    from medspark.backends.mirrored import devices

    with pytest.raises(BackendError, match=r"backend.gpus=4 but 0 GPU\(s\) are visible"):
        devices(4, 2)
    with pytest.raises(BackendError, match="backend.mode='lockfree' must be one of asynchronous, hogwild"):
        build(make_cfg(tmp_path, ["backend=elephas_async", "backend.mode=lockfree"]).backend)

    class Data:  # only the sizes matter before anything is read
        sizes = {"train": 40, "val": 10, "test": 10}

    job = TrainJob(data=Data(), build_model=None, train=make_cfg(tmp_path, ["train.batch_size=32"]).train, spark=spark)
    with pytest.raises(BackendError, match="20 per worker, not more than train.batch_size=32"):
        build(make_cfg(tmp_path, ["backend=elephas_sync"]).backend).fit(job)
