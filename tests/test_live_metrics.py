"""What a training run shows in MLflow while it trains: each epoch's metrics as the epoch ends (not all at once after
fit, and never twice), and MLflow's system metrics (CPU, memory) on by default, off with tracking.system_metrics=false.
One tiny real run (Spark, Petastorm, Keras, an MLflow store) shared by the module."""
import time

import mlflow
import pytest

from medspark import tracking
from medspark.train import train
from conftest import make_cfg

TINY = ["dataset.generate.per_class=16", "dataset.generate.size=32", "preprocess.image_size=32", "train.epochs=3",
        "train.batch_size=8", "train.verbose=0", "train.early_stopping.patience=0", "tracking.register=never"]


def finished_run(store, spark, *extra):
    started = int(time.time() * 1000)
    train(make_cfg(store, [*TINY, *extra]), spark=spark)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list",
                             order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED" and run.info.start_time >= started
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("live")


@pytest.fixture(scope="module")
def run(store, spark):
    return finished_run(store, spark)


@pytest.mark.slow
def test_each_epoch_is_logged_once_as_it_ends(run):
    client = mlflow.MlflowClient()
    ended = run.info.end_time
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1, 2], (key, history)  # one entry per epoch, none logged twice
        stamps = [m.timestamp for m in history]
        assert stamps == sorted(stamps) and len(set(stamps)) == 3, (key, stamps)  # logged at each epoch's end
    # the live values are the history the curves and `compare` read: the last epoch's loss is the run's loss
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert run.data.metrics["loss"] == loss[-1].value and loss[-1].timestamp < ended
    seconds = client.get_metric_history(run.info.run_id, "epoch_seconds")
    assert loss[1].timestamp - loss[0].timestamp >= 1000 * seconds[1].value * 0.5  # an epoch apart, not a batch


@pytest.mark.slow
def test_system_metrics_are_on_by_default(run):
    metrics = run.data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_system_metrics_switch(tmp_path, monkeypatch):
    """tracking.system_metrics decides for the runs this process starts (no training needed)."""
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # restored after the test
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = make_cfg(tmp_path, ["tracking.system_metrics=false"])
    tracking.configure(cfg.tracking)
    with tracking.run("off") as off:
        time.sleep(0.6)
    cfg.tracking.system_metrics = True
    tracking.configure(cfg.tracking)
    with tracking.run("on") as on:
        time.sleep(0.6)
    assert not any(k.startswith("system/") for k in mlflow.get_run(off.info.run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in mlflow.get_run(on.info.run_id).data.metrics
