"""`spark_barrier`: synchronous data parallelism over Spark barrier tasks (MultiWorkerMirroredStrategy), on the
session's real `local[2]` Spark: it must learn, log what it did, register a model that loads back, survive a
second run in the same (reused) Python workers, and fail early and clearly when it cannot work."""
import json
import math
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from medspark.backends import build
from medspark.backends.api import BackendError, TrainJob
from medspark.backends.spark_barrier import BarrierTrainingError, explain, row_groups
from medspark.train import train
from conftest import make_cfg

SMALL = ["backend=spark_barrier", "backend.workers=2", "dataset.generate.per_class=100", "dataset.generate.size=64",
         "preprocess.image_size=64", "train.epochs=10", "train.batch_size=16",
         "materialize.row_group_size_mb=1",  # 1 MB row groups: the ~1 MB train split has several to shard
         "train.early_stopping.patience=0"]  # 10 epochs of ~280 images: a noisy val_loss must not restore epoch 1


def write_parquet(path, rows: int, row_group_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"label": np.arange(rows, dtype=np.int32)}), path / "part-0.parquet",
                   row_group_size=row_group_rows)
    (path / "_SUCCESS").write_text("")
    (path / ".part-0.parquet.crc").write_text("not parquet")


def fake_job(spark, cfg, root, sizes=None, build_model=None):
    data = SimpleNamespace(split_url=lambda split: f"file://{root}/{split}", shape=(8, 8, 1), classes=["a", "b"],
                           sizes=sizes or {"train": 100, "val": 0, "test": 0}, per_class={}, task="binary",
                           multilabel=False)
    return TrainJob(data=data, build_model=build_model, train=cfg.train, spark=spark, seed=0)


# ---------------------------------------------------------------- fast: checks before any task starts

def test_more_workers_than_task_slots_fails_early_naming_the_key(spark, tmp_path):
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.workers=3"])
    backend = build(cfg.backend)
    with pytest.raises(BackendError, match=r"backend\.workers=3 .*only 2 task slots"):
        backend.fit(fake_job(spark, cfg, tmp_path / "data"))


def test_fewer_row_groups_than_workers_fails_early_naming_the_key(spark, tmp_path):
    write_parquet(tmp_path / "data" / "train", rows=100, row_group_rows=100)  # one row group
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.workers=2"])
    with pytest.raises(BackendError, match=r"only 1 Parquet row group.*materialize\.row_group_size_mb"):
        build(cfg.backend).fit(fake_job(spark, cfg, tmp_path / "data"))


def test_row_groups_are_counted_in_data_files_only(tmp_path):
    write_parquet(tmp_path / "train", rows=100, row_group_rows=30)
    assert row_groups(f"file://{tmp_path}/train") == 4


def test_plan_gives_every_worker_the_same_steps(spark, tmp_path):
    write_parquet(tmp_path / "data" / "train", rows=280, row_group_rows=70)
    write_parquet(tmp_path / "data" / "val", rows=60, row_group_rows=60)  # 1 row group: full validation
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.workers=2", "train.batch_size=16"])
    spec = build(cfg.backend).plan(fake_job(spark, cfg, tmp_path / "data",
                                                  sizes={"train": 280, "val": 60, "test": 60}))
    assert (spec.workers, spec.steps_per_epoch, spec.local_mode) == (2, 280 // 32, True)
    assert not spec.validation_sharded and spec.validation_steps == math.ceil(60 / 16)


def test_bad_options_fail_naming_the_key(tmp_path):
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.validation=some"])
    with pytest.raises(BackendError, match=r"backend\.validation"):
        build(cfg.backend)


def test_a_worker_error_is_reported_in_one_readable_message():
    spark_text = ("An error occurred while calling o123.collect.\n: org.apache.spark.SparkException: Job aborted "
                  "due to stage failure: Could not recover from a failed barrier ResultStage.\n"
                  "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
                  '  File "x.py", line 1, in <module>\n'
                  "RuntimeError: medspark spark_barrier worker 1 of 2 (127.0.0.1:4242): the training process "
                  "exited with code 1 before finishing. Last lines:\nValueError: boom\n\n"
                  "\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(PythonRunner.scala:1)\n")
    msg = explain(RuntimeError(spark_text))
    assert msg.startswith("backend=spark_barrier failed on the executors: medspark spark_barrier worker 1 of 2")
    assert "ValueError: boom" in msg and "PythonRunner.scala" not in msg


# ---------------------------------------------------------------- slow: real training on local[2]

@pytest.fixture(scope="module")
def e2e(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("barrier")
    cfg = make_cfg(tmp, SMALL)
    train(cfg, spark=spark)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    return {"run": run, "cfg": cfg, "tmp": tmp, "uri": cfg.tracking.uri}


@pytest.mark.slow
def test_barrier_training_learns_far_above_chance(e2e):
    run = e2e["run"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] >= 0.6, f"4 classes (chance 0.25): {run.data.metrics['test_accuracy']}"


@pytest.mark.slow
def test_barrier_run_logs_workers_global_batch_and_steps(e2e):
    mlflow.set_tracking_uri(e2e["uri"])
    p, m = e2e["run"].data.params, e2e["run"].data.metrics
    assert p["workers"] == "2" and p["global_batch_size"] == "32" and p["backend_per_worker_batch_size"] == "16"
    steps = int(m["data_n_train"]) // 32
    assert p["backend_steps_per_epoch"] == str(steps) and p["backend_isolation"] == "subprocess per task"
    assert len(p["backend_worker_addresses"].split(",")) == 2
    assert m["epochs_run"] >= 2 and m["barrier_stage_seconds"] > m["train_seconds"] > 0
    history = mlflow.MlflowClient().get_metric_history(e2e["run"].info.run_id, "val_loss")
    assert len(history) == m["epochs_run"]


@pytest.mark.slow
def test_barrier_registered_model_loads_back_and_reproduces_the_test_accuracy(e2e):
    from medspark.data.loader import read_arrays

    run = e2e["run"]
    mlflow.set_tracking_uri(e2e["uri"])
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    assert summary["model_uri"].startswith("models:/medspark-synthetic/")
    images, labels = read_arrays(f"{run.data.params['data_url']}/test")
    model = mlflow.tensorflow.load_model(summary["model_uri"])
    acc = float((model.predict(images.astype("float32"), verbose=0).argmax(1) == labels).mean())
    assert acc == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_a_second_barrier_run_in_the_same_spark_session_works(e2e, spark):
    """Spark reuses its Python workers: a worker that already ran a TensorFlow cluster must run another.
    (Also the other paths: class weights, added per worker since Keras cannot add them to a distributed
    dataset, and validation on the whole val split by every worker.)"""
    cfg = make_cfg(e2e["tmp"], [*SMALL, "train.epochs=1", "train.class_weight=balanced", "backend.validation=full"])
    train(cfg, spark=spark)
    mlflow.set_tracking_uri(e2e["uri"])
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    assert run.info.run_id != e2e["run"].info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["epochs_run"] == 1 and run.data.metrics["data_reused"] == 1
    assert run.data.params["backend_validation"] == "full" and "val_loss" in run.data.metrics


@pytest.mark.slow
def test_a_failing_worker_fails_the_run_with_its_own_error(spark, tmp_path):
    def explode(**_):  # local, so cloudpickle ships it by value (executors cannot import test modules)
        raise ValueError("the model could not be built on this worker")

    write_parquet(tmp_path / "data" / "train", rows=100, row_group_rows=25)
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.workers=2", "train.batch_size=8"])
    job = fake_job(spark, cfg, tmp_path / "data", build_model=explode)
    with pytest.raises(BarrierTrainingError, match=r"worker \d of 2 .*before finishing: "
                       r"ValueError: the model could not be built on this worker\n"):
        build(cfg.backend).fit(job)


@pytest.mark.slow
def test_a_worker_past_its_timeout_is_killed_and_named(spark, tmp_path):
    write_parquet(tmp_path / "data" / "train", rows=100, row_group_rows=25)
    cfg = make_cfg(tmp_path, ["backend=spark_barrier", "backend.workers=2", "backend.timeout_s=1",
                              "train.batch_size=8"])  # TensorFlow alone takes longer than 1 s to start
    with pytest.raises(BarrierTrainingError, match=r"worker \d of 2 .*backend\.timeout_s=1 s, killed"):
        build(cfg.backend).fit(fake_job(spark, cfg, tmp_path / "data", build_model=lambda **_: None))
