"""What the pipeline relies on from medspark.evaluate: right numbers, MLflow-safe keys, no NaN, every artifact."""
from __future__ import annotations

import json
import math
import posixpath
import re
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medspark.evaluate import (classification_metrics, confusion_matrix_png, evaluate, metric_key_names,
                               training_curves_png)

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")
NAMES3 = ["a", "b", "c"]


def probs_for(pred, k, hit=0.8):
    """Softmax-like rows whose argmax is `pred`."""
    p = np.full((len(pred), k), (1 - hit) / (k - 1))
    p[np.arange(len(pred)), pred] = hit
    return p


def assert_png(path, min_side=200):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, im.size
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_perfect_predictions():
    y = np.array([0, 1, 2, 2, 1, 0])
    m = classification_metrics(y, probs_for(y, 3), NAMES3)
    for key in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy", "roc_auc_ovr", "roc_auc_b"):
        assert m[f"test_{key}"] == pytest.approx(1.0), key
    assert m["test_n"] == 6.0 and m["test_support_c"] == 2.0


def test_hand_computed_example(tmp_path):
    # true 0 0 0 1 1 2 / pred 0 0 1 1 2 2 -> cm [[2,1,0],[0,1,1],[0,0,1]]
    y, pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    m, _ = evaluate(y, probs_for(pred, 3), NAMES3, tmp_path, prefix="val_")
    expect = {"a": (1.0, 2 / 3, 0.8), "b": (0.5, 0.5, 0.5), "c": (0.5, 1.0, 2 / 3)}
    for c, (p, r, f) in expect.items():
        assert (m[f"val_precision_{c}"], m[f"val_recall_{c}"], m[f"val_f1_{c}"]) == pytest.approx((p, r, f))
    assert m["val_accuracy"] == pytest.approx(4 / 6)
    assert m["val_macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["val_balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    rep = json.loads((tmp_path / "classification_report.json").read_text())
    assert rep["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert rep["class_names"] == NAMES3
    assert rep["a"]["recall"] == pytest.approx(2 / 3)
    assert rep["macro avg"]["f1-score"] == pytest.approx(m["val_macro_f1"])
    assert all(k.startswith("val_") for k in m)


def test_binary_auc_matches_sklearn_and_float32_rows_are_renormalized():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1).astype(np.float32) * np.float32(1.001)  # rows sum to 1.001
    m = classification_metrics(y, probs, ["NORMAL", "PNEUMONIA"])
    assert m["test_roc_auc_ovr"] == pytest.approx(roc_auc_score(y, p1))
    assert m["test_roc_auc_PNEUMONIA"] == pytest.approx(m["test_roc_auc_ovr"])
    assert math.isfinite(m["test_log_loss"])


def test_multiclass_macro_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet(np.ones(4), 300)
    m = classification_metrics(y, p, list("wxyz"))
    assert m["test_roc_auc_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


@pytest.mark.parametrize("y", [[0, 0, 1, 1], [0, 0, 0, 0]], ids=["class-absent", "single-class"])
def test_absent_classes_give_no_nan_no_crash_no_warning(y, tmp_path):
    y = np.array(y)
    p = probs_for(np.array([0, 1, 1, 2]), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, paths = evaluate(y, p, NAMES3, tmp_path, history={"loss": [1.0, 0.5]})
    assert all(math.isfinite(v) for v in m.values())
    assert "test_roc_auc_c" not in m and "test_support_c" in m
    if len(set(y)) == 1:
        assert "test_roc_auc_ovr" not in m
    else:
        assert m["test_roc_auc_ovr"] == pytest.approx(np.mean([m["test_roc_auc_a"], m["test_roc_auc_b"]]))
    assert len(paths) == 5


def test_odd_class_names_give_mlflow_valid_unique_keys():
    names = ["a/b c", "NORMAL", "non-tumour (ü)", "x?", "x!", "ovr", "a//b/", ""]
    k = len(names)
    m = classification_metrics(np.arange(k), probs_for(np.arange(k), k), names)
    assert len(m) == 9 + 5 * k  # no collisions: every class keeps its own keys
    for key in m:
        assert MLFLOW_KEY.match(key), key
        assert posixpath.normpath(key) == key, key  # MLflow rejects names that change as paths
    assert "test_f1_a/b c" in m and "test_f1_NORMAL" in m
    assert len(set(metric_key_names(names))) == k


@pytest.mark.parametrize("y, probs, names, match", [
    ([0, 1, 2], np.eye(3)[:2], NAMES3, "y_true has 3 rows but probs has 2"),
    ([0, 1], np.eye(2), NAMES3, "2 columns but there are 3 class_names"),
    ([0, 3, 1], np.eye(3), NAMES3, r"outside \[0, 2\]"),
    ([0, -1, 1], np.eye(3), NAMES3, r"outside \[0, 2\]"),
    (np.eye(3), np.eye(3), NAMES3, "one-hot"),
    ([0, 1, 2], np.eye(3) * 5 - 1, NAMES3, "logits"),
    ([0, 1, 2], np.full((3, 3), np.nan), NAMES3, "NaN"),
    ([0.5, 1, 2], np.eye(3), NAMES3, "integer"),
    ([0, 1, 2], np.eye(3), ["a", "a", "b"], "unique"),
    ([], np.zeros((0, 3)), NAMES3, "empty"),
])
def test_bad_inputs_raise_helpful_value_errors(y, probs, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(y), probs, names)


def test_evaluate_writes_every_promised_file(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    hist = {"loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95], "accuracy": [0.4, 0.6, 0.7],
            "val_accuracy": [0.4, 0.5, 0.5], "learning_rate": [1e-3, 1e-3, 1e-4]}
    m, paths = evaluate(y, p, ["NORMAL", "a/b c", "non-tumour (ü)"], tmp_path / "out", history=hist)
    names = {"confusion_matrix.png", "classification_report.txt", "classification_report.json",
             "training_curves.png", "roc_curves.png"}
    assert {q.name for q in paths} == names and all(q.parent == tmp_path / "out" for q in paths)
    for q in paths:
        assert q.is_file() and q.stat().st_size > 100
        if q.suffix == ".png":
            assert_png(q)
    assert "non-tumour (ü)" in (tmp_path / "out" / "classification_report.txt").read_text(encoding="utf-8")
    _, without = evaluate(y, p, NAMES3, tmp_path / "nohist")
    assert "training_curves.png" not in {q.name for q in without}


def test_training_curves_handle_empty_and_partial_history(tmp_path):
    assert_png(training_curves_png({}, tmp_path / "empty.png"), min_side=150)
    assert_png(training_curves_png({"loss": [], "val_loss": []}, tmp_path / "empties.png"), min_side=150)
    assert_png(training_curves_png({"val_loss": [0.9, 0.8], "auc": np.array([0.6, 0.7])}, tmp_path / "p.png"))


def test_confusion_matrix_png_validates_and_leaves_no_figures_alive(tmp_path):
    import gc

    from matplotlib.figure import Figure
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, Figure)}  # other tests' figures are not ours
    for i in range(3):
        confusion_matrix_png([0, 1, 1], [0, 1, 0], ["x", "y"], tmp_path / f"cm{i}.png")
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Figure) and id(o) not in before]  # no pyplot state
    assert_png(tmp_path / "cm0.png")
    with pytest.raises(ValueError, match="y_pred"):
        confusion_matrix_png([0, 1], [0, 2], ["x", "y"], tmp_path / "bad.png")
