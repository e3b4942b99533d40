"""The whole pipeline as a user runs it: the real entrypoint, real Spark, Petastorm, Keras and an MLflow store.
The model must learn, the run must be complete and traceable, and the registered model must load back and
reproduce the logged test metrics."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from medspark.train import train
from conftest import REPO

SMALL = ["dataset.generate.per_class=150", "dataset.generate.size=96", "preprocess.image_size=96",
         "train.epochs=10", "train.batch_size=16", "cluster.cores=2"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One real run through `python -m medspark.train`, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp}/mlruns.db"
    res = subprocess.run([sys.executable, "-m", "medspark.train", *SMALL, f"paths.work_dir={tmp}/work",
                          f"tracking.uri={uri}", f"tracking.artifact_location={tmp}/artifacts"],
                         cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    return {"stdout": res.stdout, "run": run, "uri": uri, "tmp": tmp}


@pytest.mark.slow
def test_model_learns_far_above_chance(e2e):
    m = e2e["run"].data.metrics
    assert e2e["run"].info.status == "FINISHED"
    assert m["test_accuracy"] >= 0.85, f"4 classes (chance 0.25): got {m['test_accuracy']}"
    assert m["test_macro_f1"] >= 0.8 and m["test_roc_auc_ovr"] >= 0.95


@pytest.mark.slow
def test_run_is_complete_and_traceable(e2e):
    run, client = e2e["run"], mlflow.MlflowClient()
    p, m = run.data.params, run.data.metrics
    assert p["model.name"] == "small_cnn" and p["preprocess.image_size"] == "96" and p["seed"] == "42"
    assert "train.epochs=10" in p["overrides"]
    for key in ("preprocess_seconds", "materialize_seconds", "train_seconds", "evaluate_seconds",
                "train_images_per_second", "data_n_train", "data_n_val", "data_n_test", "data_rejected",
                "data_duplicate_groups", "test_precision_glioma", "test_recall_pituitary", "test_f1_notumor"):
        assert key in m, key
    assert m["data_listed"] == 600 and m["data_accepted"] == 600 and m["data_rejected"] == 0
    epochs = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(epochs) == m["epochs_run"] >= 2 and [e.step for e in epochs] == list(range(len(epochs)))
    paths = {a.path for d in ("", "evaluation", "data", "config") for a in client.list_artifacts(run.info.run_id, d)}
    for f in ("evaluation/confusion_matrix.png", "evaluation/classification_report.json",
              "evaluation/classification_report.txt", "evaluation/training_curves.png", "data/rejected.csv",
              "config/resolved.yaml", "summary.json"):
        assert f in paths, f
    out = e2e["stdout"]
    assert run.info.run_id in out and "test_accuracy" in out and "mlflow ui --backend-store-uri" in out


@pytest.mark.slow
def test_registered_model_loads_and_reproduces_the_test_metrics(e2e):
    from medspark.data.loader import read_arrays

    run = e2e["run"]
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    assert summary["model_uri"] == "models:/medspark-synthetic/1"
    data_url = run.data.params["data_url"]
    images, labels = read_arrays(f"{data_url}/test")
    keras_model = mlflow.tensorflow.load_model(summary["model_uri"])
    pyfunc = mlflow.pyfunc.load_model(summary["model_uri"])
    k_probs = keras_model.predict(images.astype("float32"), verbose=0)
    p_probs = np.asarray(pyfunc.predict(images.astype("float32")))
    np.testing.assert_allclose(k_probs, p_probs, rtol=1e-5, atol=1e-6)
    acc = float((k_probs.argmax(1) == labels).mean())
    assert acc == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-9), "the registered model is the evaluated one"


@pytest.mark.slow
def test_a_run_that_raises_is_marked_failed_with_its_error(spark, tmp_path, cfg_factory):
    from PIL import Image

    root = tmp_path / "tiny"
    for cls, n in (("a", 8), ("b", 2)):  # class b cannot be stratified into train/val/test
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((24, 24), 10 * i + (cls == "b") * 100, np.uint8)).save(root / cls / f"{i}.png")
    cfg = cfg_factory("dataset=image_folder", f"dataset.root={root}")
    with pytest.raises(ValueError, match="class 'b' has 2 distinct image"):
        train(cfg, spark=spark)
    run = mlflow.search_runs(experiment_names=["medspark-image_folder"], output_format="list")[0]
    assert run.info.status == "FAILED"
    assert "class 'b' has 2 distinct image" in run.data.tags["error"]
    assert "Traceback" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error/traceback.txt")
