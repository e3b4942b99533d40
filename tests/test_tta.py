"""Test-time augmentation (medspark.tta) and what the packaged classifier ships with from evaluation (temperature,
tta): the averaged prediction is the mean of the views' predictions, a mirror-symmetric image gains nothing from a
flip, the packaged classifier answers the calibrated, augmented probabilities, and a training run with tta=flip logs
its accuracy with and without the views. One tiny untrained Keras network (module fixture) serves the fast tests;
one small training run (slow) the end-to-end ones."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest

from medspark import calibration, serving, tta
from medspark.data.preprocess import PreprocessConfig, decode

PRE = PreprocessConfig(image_size=16)
CLASSES = ["a", "b", "c"]


def images(n: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def net():
    """An untrained convolutional softmax network: no symmetry of its own, so a flip changes its output."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Rescaling(1 / 127.5, -1),
                             keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                             keras.layers.Dense(len(CLASSES), "softmax")])


def test_views_are_the_image_its_mirror_and_edge_filled_shifts():
    x = np.arange(2 * 5 * 6 * 1, dtype=np.float32).reshape(2, 5, 6, 1)
    assert len(tta.views(x, "none")) == 1 and len(tta.views(x, "flip")) == 2
    v = tta.views(x, "flip_shift")
    assert len(v) == 6 and all(a.shape == x.shape for a in v)
    np.testing.assert_array_equal(v[0], x)
    np.testing.assert_array_equal(v[1], x[:, :, ::-1])
    right = v[2]  # moved 2 px right: the left columns repeat column 0
    np.testing.assert_array_equal(right[:, :, 2:], x[:, :, :-2])
    np.testing.assert_array_equal(right[:, :, :2], np.repeat(x[:, :, :1], 2, axis=2))
    np.testing.assert_array_equal(v[3][:, :, :-2], x[:, :, 2:])  # left
    np.testing.assert_array_equal(v[4][:, 2:], x[:, :-2])  # down
    np.testing.assert_array_equal(v[5][:, :-2], x[:, 2:])  # up
    with pytest.raises(ValueError, match="evaluate.tta='rot90'"):
        tta.views(x, "rot90")


def test_tta_output_is_the_mean_of_the_views_predictions(net):
    x = images().astype(np.float32)
    for mode in ("flip", "flip_shift"):
        got = tta.predict(net.predict_on_batch, x, mode)
        per_view = [np.asarray(net.predict_on_batch(v), np.float64) for v in tta.views(x, mode)]
        np.testing.assert_allclose(got, np.mean(per_view, axis=0), rtol=1e-12)
        np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-6)
        assert np.abs(got - per_view[0]).max() > 1e-4, "the views must change something on asymmetric images"
    np.testing.assert_array_equal(tta.predict(net.predict_on_batch, x, "none"), net.predict_on_batch(x))


def test_mirror_symmetric_images_give_identical_results_with_flip(net):
    half = images(6, seed=1)[:, :, :8]
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2).astype(np.float32)
    plain = np.asarray(net.predict_on_batch(symmetric), np.float64)
    np.testing.assert_array_equal(tta.predict(net.predict_on_batch, symmetric, "flip"), plain)


def _log(net, tmp, **shipped):
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlruns.db")
    mlflow.set_experiment("tta-serving")
    with mlflow.start_run() as run:
        serving.log_model(net, PRE, CLASSES, images(1, seed=9), **shipped)
    return mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/classifier")


def test_the_packaged_classifier_applies_its_views_and_temperature(net, tmp_path):
    files = [serving.png_bytes(im) for im in images(8, seed=2)]
    x = np.stack([decode(b, PRE) for b in files]).astype(np.float32)
    clf = _log(net, tmp_path, temperature=2.5, tta="flip_shift")
    assert clf.metadata.metadata["medspark"]["temperature"] == 2.5
    assert clf.metadata.metadata["medspark"]["tta"] == "flip_shift"
    out = clf.predict(pd.DataFrame({"image": files}))
    got = out[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64)
    expected = calibration.apply_temperature(tta.predict(net.predict_on_batch, x, "flip_shift"), 2.5)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert out["predicted_class"].tolist() == [CLASSES[i] for i in expected.argmax(1)]
    raw = np.asarray(net.predict_on_batch(x), np.float64)
    assert got.max(axis=1).mean() < raw.max(axis=1).mean(), "T > 1 softens the answers"


def test_a_classifier_logged_before_calibration_answers_the_network_outputs(net, tmp_path):
    net.save(tmp_path / "model.keras")
    meta = {"format": serving.FORMAT, "classes": CLASSES, "preprocess": PRE.__dict__, "input_shape": list(PRE.shape)}
    (tmp_path / "preprocess.json").write_text(json.dumps(meta))
    clf = serving.ImageClassifier()
    clf.load_context(SimpleNamespace(artifacts={serving.KERAS_ARTIFACT: str(tmp_path / "model.keras"),
                                                serving.META_ARTIFACT: str(tmp_path / "preprocess.json")}))
    assert clf.temperature == 1.0 and clf.tta == "none"
    x = images(4, seed=3)
    np.testing.assert_allclose(clf.predict_arrays(x), net.predict_on_batch(x.astype(np.float32)), rtol=1e-6)


def test_log_model_refuses_a_bad_temperature_or_mode(net):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        serving.log_model(net, PRE, CLASSES, temperature=0.0)  # refused before anything is saved or logged
    with pytest.raises(ValueError, match="evaluate.tta='blur'"):
        serving.log_model(net, PRE, CLASSES, tta="blur")


# -- one small training run ---------------------------------------------------------------------------------------

SMALL = ["dataset.generate.per_class=40", "dataset.generate.size=32", "preprocess.image_size=32", "train.epochs=3",
         "train.batch_size=16", "cluster.cores=2", "train.verbose=0", "evaluate.tta=flip",
         "tracking.registered_model=null"]


@pytest.fixture(scope="module")
def flip_run(spark, tmp_path_factory):
    """A run trained with evaluate.tta=flip (and the default temperature scaling)."""
    from conftest import make_cfg
    from medspark.train import train

    cfg = make_cfg(tmp_path_factory.mktemp("tta_run"), SMALL)
    train(cfg, spark=spark)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    return {"run": run, "summary": summary, "uri": cfg.tracking.uri}


@pytest.mark.slow
def test_a_run_with_tta_logs_accuracy_with_and_without_it_and_its_calibration(flip_run):
    from medspark.data.loader import read_arrays

    run, m = flip_run["run"], flip_run["run"].data.metrics
    mlflow.set_tracking_uri(flip_run["uri"])
    for key in ("test_accuracy", "test_accuracy_no_tta", "temperature", "test_ece", "test_ece_adaptive", "test_brier",
                "val_ece_before_temperature", "val_ece_after_temperature", "test_ece_before_temperature"):
        assert key in m, key
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/reliability.png", "evaluation/calibration.csv"} <= files
    images, labels = read_arrays(f"{run.data.params['data_url']}/test")
    keras_model = mlflow.tensorflow.load_model(flip_run["summary"]["model_uri"])
    x = images.astype(np.float32)
    plain = np.asarray(keras_model.predict(x, verbose=0))
    flipped = tta.predict(lambda v: keras_model.predict(v, verbose=0), x, "flip")
    assert float((plain.argmax(1) == labels).mean()) == pytest.approx(m["test_accuracy_no_tta"], abs=1e-9)
    assert float((flipped.argmax(1) == labels).mean()) == pytest.approx(m["test_accuracy"], abs=1e-9)

    # the packaged classifier ships the evaluated views and temperature: its probabilities are the evaluated ones
    clf = mlflow.pyfunc.load_model(flip_run["summary"]["classifier_uri"])
    meta = clf.metadata.metadata["medspark"]
    assert meta["tta"] == "flip" and meta["temperature"] == pytest.approx(m["temperature"], rel=1e-12)
    served = clf.unwrap_python_model().predict_arrays(images)
    np.testing.assert_allclose(served, calibration.apply_temperature(flipped, m["temperature"]), rtol=1e-5, atol=1e-7)
    assert float((served.argmax(1) == labels).mean()) == pytest.approx(m["test_accuracy"], abs=1e-9)
    assert calibration.ece(labels, served) == pytest.approx(m["test_ece"], abs=1e-6)
    assert calibration.brier(labels, served) == pytest.approx(m["test_brier"], abs=1e-6)
