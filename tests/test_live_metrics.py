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


def test_mixed_precision_builds_and_trains_through_the_fit_path():
    """train.mixed_precision=true: keras_fit.fit builds the model under mixed_float16 (float16 compute, float32
    weights and probabilities, loss scaling) and trains; the process's global policy is left as it was.
    On a CPU this only shows that it works (a GPU with tensor cores is where it is faster: docs/gpu.md)."""
    import keras
    import numpy as np
    import tensorflow as tf
    from omegaconf import OmegaConf

    from medspark.backends import keras_fit
    from medspark.backends.api import TrainJob
    from medspark.config import config_dir
    from medspark.data.materialize import Materialized
    from medspark.models import small_cnn

    train_cfg = OmegaConf.load(f"{config_dir()}/config.yaml").train
    train_cfg.update({"epochs": 1, "verbose": 0, "mixed_precision": True, "lr_schedule": "none"})
    train_cfg.early_stopping.patience = 0
    data = Materialized(url="file:///unused", fingerprint="0" * 16, classes=["a", "b"], shape=(32, 32, 1),
                        sizes={"train": 16, "val": 0, "test": 0}, per_class={}, listed=16, accepted=16, rejected=[],
                        duplicate_groups=0, duplicate_files=0, label_conflicts=0, moved_to_test=0, seconds={})
    job = TrainJob(data=data, build_model=lambda **kw: small_cnn.build((32, 32, 1), 2, **kw), train=train_cfg)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (16, 32, 32, 1)).astype("float32"), np.array([0, 1] * 8)
    result = keras_fit.fit(job, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), batch_size=8)
    model = result.model
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for everything after fit
    assert model.layers[1].dtype_policy.name == "mixed_float16" and model.layers[1].compute_dtype == "float16"
    assert model.get_layer("probs").compute_dtype == "float32" and model.predict(x, verbose=0).dtype == np.float32
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])
