"""The packaged classifier of a multilabel model (medspark.serving, issue 12): a probability per finding equal to
the in-process Keras model's on the training preprocessing, the findings at or over the thresholds it was logged
with, through MLflow's pyfunc loader and `medspark predict`; old classifiers without a task stay single-label.

A tiny untrained sigmoid network is logged into a temporary MLflow store once (module fixture): the packaging and
the thresholding are under test, not learning."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest

from medspark import predict, serving
from medspark.data.preprocess import PreprocessConfig, decode

FINDINGS = ["Atelectasis", "Effusion", "Pleural_Thickening"]
PRE = PreprocessConfig(image_size=16)


def images(n: int = 12, seed: int = 0) -> np.ndarray:
    """uint8 (n, 16, 16, 1) with different brightness and texture, so the network's outputs differ per image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 16, 16, 1))
    return np.clip(base * rng.uniform(0.2, 1.0, (n, 1, 1, 1)) + rng.uniform(0, 120, (n, 1, 1, 1)), 0, 255) \
        .astype(np.uint8)


def keras_probs(model, files: list[bytes]) -> np.ndarray:
    """What the in-process model gives on the training preprocessing of the files."""
    x = np.stack([decode(b, PRE) for b in files]).astype(np.float32)
    return np.asarray(model.predict(x, verbose=0), np.float64)


def expected_findings(p: np.ndarray, thresholds: np.ndarray) -> list[str]:
    return ["|".join(f for f, on in zip(FINDINGS, row >= thresholds) if on) or "No Finding" for row in p]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("serving_multilabel")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Rescaling(1 / 127.5, -1),
                              keras.layers.Flatten(), keras.layers.Dense(len(FINDINGS), "sigmoid")])
    files = [serving.png_bytes(im) for im in images()]
    p = keras_probs(model, files)
    thresholds = np.median(p, axis=0)  # between the images' scores: some rows have none, some several findings
    uri = f"sqlite:///{tmp}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-multilabel")
    with mlflow.start_run() as run:
        info = serving.log_model(model, PRE, FINDINGS, images(1, seed=9), task="multilabel",
                                 thresholds=dict(zip(FINDINGS, thresholds)))
    return {"uri": uri, "model_uri": f"runs:/{run.info.run_id}/classifier", "info": info, "keras": model,
            "files": files, "probs": p, "thresholds": thresholds, "tmp": tmp}


@pytest.fixture(scope="module")
def loaded(packaged):
    mlflow.set_tracking_uri(packaged["uri"])
    return mlflow.pyfunc.load_model(packaged["model_uri"])


def test_probabilities_match_keras_and_findings_follow_the_thresholds(packaged, loaded):
    expected = expected_findings(packaged["probs"], packaged["thresholds"])
    assert "No Finding" in expected and any("|" in e for e in expected)  # the case is not vacuous
    out = loaded.predict(pd.DataFrame({"image": packaged["files"] + [b"not an image"]}))
    assert list(out.columns) == serving.output_columns(FINDINGS, "multilabel") \
        == ["findings", *(f"prob_{f}" for f in FINDINGS), "error"]
    got = out[[f"prob_{f}" for f in FINDINGS]].iloc[:-1].to_numpy(np.float64)
    np.testing.assert_allclose(got, packaged["probs"], rtol=1e-5, atol=1e-6)
    assert out["findings"].iloc[:-1].tolist() == expected
    assert out["error"].iloc[:-1].isna().all()
    bad = out.iloc[-1]
    assert bad["findings"] is None and bad["prob_Effusion"] is None and "not an image" in bad["error"]


def test_task_and_thresholds_travel_with_the_model(packaged, loaded):
    assert packaged["info"].signature.outputs.input_names() == serving.output_columns(FINDINGS, "multilabel")
    meta = loaded.metadata.metadata["medspark"]
    assert meta["task"] == "multilabel" and meta["classes"] == FINDINGS
    assert meta["thresholds"] == pytest.approx(dict(zip(FINDINGS, packaged["thresholds"])))
    clf = loaded.unwrap_python_model()
    assert clf.task == "multilabel" and np.allclose(clf.thresholds, packaged["thresholds"])


def test_medspark_predict_writes_findings(packaged, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, b in enumerate(packaged["files"]):
        (folder / f"scan{i:02d}.png").write_bytes(b)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions.csv"
    rc = predict.main([f"model={packaged['model_uri']}", f"input={folder}", f"output={out}",
                       f"tracking_uri={packaged['uri']}"])
    assert rc == 0, capsys.readouterr().err
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", *serving.output_columns(FINDINGS, "multilabel")]
    notes, scans = rows[0], rows[1:]  # sorted by path
    assert notes["path"].endswith("notes.txt") and not notes["findings"] and "not an image" in notes["error"]
    assert [r["findings"] for r in scans] == expected_findings(packaged["probs"], packaged["thresholds"])
    got = np.array([[float(r[f"prob_{f}"]) for f in FINDINGS] for r in scans])
    np.testing.assert_allclose(got, packaged["probs"], rtol=1e-5, atol=1e-6)


def test_a_classifier_logged_without_a_task_is_single_label(packaged, tmp_path):
    """What log_model wrote before tasks existed: no `task`, no `thresholds` -> argmax class, as before."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    model.save(tmp_path / "model.keras")
    meta = {"format": serving.FORMAT, "classes": ["NORMAL", "PNEUMONIA"], "preprocess": PRE.__dict__,
            "input_shape": list(PRE.shape)}
    (tmp_path / "preprocess.json").write_text(json.dumps(meta))
    clf = serving.ImageClassifier()
    clf.load_context(SimpleNamespace(artifacts={serving.KERAS_ARTIFACT: str(tmp_path / "model.keras"),
                                                serving.META_ARTIFACT: str(tmp_path / "preprocess.json")}))
    out = clf.predict(None, pd.DataFrame({"image": packaged["files"][:4]}))
    assert clf.task == "binary" and list(out.columns) == ["predicted_class", "prob_NORMAL", "prob_PNEUMONIA", "error"]
    p = keras_probs(model, packaged["files"][:4])
    assert out["predicted_class"].tolist() == [["NORMAL", "PNEUMONIA"][i] for i in p.argmax(1)]


@pytest.mark.parametrize("thresholds, match", [
    (None, "needs its per-finding thresholds"),
    ({"Atelectasis": 0.5, "Effusion": 0.5}, "exactly the findings"),
    ([0.5, 0.5], "exactly the findings"),
    ([0.5, 1.5, 0.5], r"in \[0, 1\]"),
    ([0.5, float("nan"), 0.5], r"in \[0, 1\]"),
])
def test_bad_thresholds_are_refused(thresholds, match):
    with pytest.raises(ValueError, match=match):
        serving.check_thresholds(thresholds, FINDINGS)


@pytest.mark.slow
def test_spark_batch_inference_gives_the_same_findings(packaged, spark, tmp_path):
    """`medspark predict spark=true`'s body: executors load the model and answer the same findings column."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, b in enumerate(packaged["files"]):
        (folder / f"scan{i:02d}.png").write_bytes(b)
    mlflow.set_tracking_uri(packaged["uri"])
    out = predict.predict_spark(spark, packaged["model_uri"], str(folder))
    assert list(out.columns) == ["path", *serving.output_columns(FINDINGS, "multilabel")]
    assert out["findings"].tolist() == expected_findings(packaged["probs"], packaged["thresholds"])
    np.testing.assert_allclose(out[[f"prob_{f}" for f in FINDINGS]].to_numpy(np.float64), packaged["probs"],
                               rtol=1e-5, atol=1e-6)
