"""Multi-label evaluation (medspark.evaluate, issue 12): numbers checked by hand and against sklearn, thresholds
chosen on validation and applied to test, no NaN and MLflow-safe keys, every promised file."""
from __future__ import annotations

import csv
import json
import math
import posixpath
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medspark.evaluate import (DEFAULT_THRESHOLD, choose_thresholds, cooccurrence_png, evaluate_multilabel,
                               multilabel_metrics)

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")
FINDINGS = ["Atelectasis", "Effusion", "Mass"]


def random_case(n=200, k=3, seed=0):
    """Scores that carry signal but are not perfect: positives shifted up."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < [0.3, 0.2, 0.1][:k]).astype(np.int64)
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 2.0 * y - 1.0)))
    return y, p


def test_perfect_predictor():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 1, 1]])
    m = multilabel_metrics(y, 0.1 + 0.8 * y, FINDINGS)
    for key in ("mean_auc", "micro_auc", "mean_ap", "micro_ap", "macro_f1", "micro_f1", "subset_accuracy"):
        assert m[f"test_{key}"] == 1.0, key
    assert m["test_hamming_loss"] == 0.0
    assert m["test_n_auc_findings"] == 3 and m["test_n"] == 6
    assert m["test_label_cardinality"] == m["test_predicted_label_cardinality"] == pytest.approx(8 / 6)  # 1+1+2+0+1+3
    assert m["test_no_finding_rate"] == pytest.approx(1 / 6)
    for f in FINDINGS:
        assert m[f"test_roc_auc_{f}"] == m[f"test_sensitivity_{f}"] == m[f"test_specificity_{f}"] == 1.0


def test_hand_computed_counts_at_the_default_threshold():
    # finding A: truth 1 1 0 0, scores .9 .4 .6 .1 -> at 0.5: TP 1, FN 1, FP 1, TN 1
    # finding B: truth 0 1 0 0, scores .2 .7 .3 .8 -> at 0.5: TP 1, FP 1, TN 2
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 0]])
    p = np.array([[.9, .2], [.4, .7], [.6, .3], [.1, .8]])
    m = multilabel_metrics(y, p, ["A", "B"])
    assert m["test_sensitivity_A"] == 0.5 and m["test_specificity_A"] == 0.5 and m["test_f1_A"] == 0.5
    assert m["test_sensitivity_B"] == 1.0 and m["test_specificity_B"] == pytest.approx(2 / 3)
    assert m["test_precision_B"] == 0.5 and m["test_f1_B"] == pytest.approx(2 / 3)
    assert m["test_roc_auc_A"] == 0.75 and m["test_roc_auc_B"] == pytest.approx(2 / 3)
    assert m["test_support_A"] == 2 and m["test_support_B"] == 1
    # predicted sets: {A}, {B}, {A}, {B} vs truth {A}, {A,B}, {}, {}: one row right, 3 of 8 cells wrong
    assert m["test_subset_accuracy"] == 0.25 and m["test_hamming_loss"] == 3 / 8
    assert m["test_label_cardinality"] == 0.75 and m["test_predicted_label_cardinality"] == 1.0
    assert m["test_micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # TP 2, FP 2, FN 1 over both findings


def test_aggregates_match_sklearn():
    y, p = random_case()
    m = multilabel_metrics(y, p, FINDINGS)
    assert m["test_mean_auc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert m["test_micro_auc"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert m["test_mean_ap"] == pytest.approx(average_precision_score(y, p, average="macro"))
    assert m["test_micro_ap"] == pytest.approx(average_precision_score(y, p, average="micro"))
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert m["test_log_loss"] == pytest.approx(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())
    assert 0.6 < m["test_mean_auc"] < 1.0


def test_a_finding_absent_from_test_is_skipped_not_nan(tmp_path):
    y, p = random_case(k=3)
    y[:, 2] = 0                      # Mass: no positive in test
    y[:, 1] = 1                      # Effusion: no negative in test
    m = multilabel_metrics(y, p, FINDINGS)
    assert all(math.isfinite(v) for v in m.values())
    assert "test_roc_auc_Mass" not in m and "test_ap_Mass" not in m and "test_sensitivity_Mass" not in m
    assert "test_f1_Mass" not in m and m["test_specificity_Mass"] >= 0 and m["test_support_Mass"] == 0
    assert "test_roc_auc_Effusion" not in m and "test_specificity_Effusion" not in m
    assert m["test_ap_Effusion"] == 1.0  # every image positive: any ranking is perfect precision
    assert m["test_n_auc_findings"] == 1 and m["test_mean_auc"] == m["test_roc_auc_Atelectasis"]
    assert m["test_n_ap_findings"] == 2 and m["test_mean_ap"] == pytest.approx(
        (m["test_ap_Atelectasis"] + 1.0) / 2)
    _, files, _ = evaluate_multilabel(y, p, FINDINGS, tmp_path)
    report = json.loads((tmp_path / "multilabel_report.json").read_text())
    notes = " ".join(report["notes"])
    assert "Mass: no positive" in notes and "Effusion: no negative" in notes and "no validation split" in notes
    rows = {r["finding"]: r for r in report["per_finding"]}
    assert rows["Mass"]["roc_auc"] is None and rows["Atelectasis"]["roc_auc"] == m["test_roc_auc_Atelectasis"]


def test_no_finding_with_both_classes_gives_no_mean_auc():
    y = np.zeros((4, 2), np.int64)
    m = multilabel_metrics(y, np.full((4, 2), 0.3), ["A", "B"])
    assert "test_mean_auc" not in m and "test_micro_auc" not in m and "test_micro_ap" not in m
    assert m["test_n_auc_findings"] == 0 and m["test_subset_accuracy"] == 1.0
    assert all(math.isfinite(v) for v in m.values())


def test_threshold_maximizes_val_f1_and_is_applied_to_test():
    # val, one finding, by score: .9 P, .7 P, .6 N, .35 P, .2 N, .1 N. F1 per cut (>= score):
    # .9: 2/5=.40  .7: 4/7=.57  .6: 4/8=.50  .35: 6/10=.60 (best)  .2: 6/11  .1: 6/12 -> halfway to .2: 0.275
    y_val = np.array([[1], [1], [0], [1], [0], [0]])
    p_val = np.array([[.9], [.7], [.6], [.35], [.2], [.1]])
    t, notes = choose_thresholds(y_val, p_val, ["A"])
    assert t[0] == pytest.approx(0.275) and notes == []
    y_test = np.array([[1], [0], [1], [0]])
    p_test = np.array([[.3], [.28], [.25], [.1]])  # at 0.275: TP, FP, FN, TN; at the default 0.5 nothing found
    m = multilabel_metrics(y_test, p_test, ["A"], t)
    assert m["test_sensitivity_A"] == 0.5 and m["test_specificity_A"] == 0.5 and m["test_precision_A"] == 0.5
    assert multilabel_metrics(y_test, p_test, ["A"])["test_sensitivity_A"] == 0.0


def test_thresholds_are_the_best_cut_on_random_val():
    """Property: no threshold on a fine grid gives a higher val F1 than the chosen one, per finding."""
    y, p = random_case(n=150, seed=3)
    t, _ = choose_thresholds(y, p, FINDINGS)

    def f1(j, th):
        pred = p[:, j] >= th
        tp = (pred & (y[:, j] == 1)).sum()
        return 2 * tp / (pred.sum() + y[:, j].sum())

    for j in range(3):
        assert f1(j, t[j]) >= max(f1(j, g) for g in np.linspace(0, 1, 2001)) - 1e-12
        assert p[:, j].min() <= t[j] <= p[:, j].max()


def test_val_without_positives_falls_back_to_default():
    y_val = np.array([[1, 0], [0, 0], [1, 0]])
    p_val = np.array([[.8, .9], [.2, .1], [.7, .3]])
    t, notes = choose_thresholds(y_val, p_val, ["A", "B"])
    assert t[1] == DEFAULT_THRESHOLD and 0.2 < t[0] < 0.7
    assert notes == [f"B: no positive in the validation split, threshold {DEFAULT_THRESHOLD}"]


def test_odd_finding_names_give_mlflow_valid_path_safe_keys():
    names = ["Pleural_Thickening", "a/b", "a//b", "ovr", "Émphysème", "x?y", "x!y", "../up", "No Finding "]
    y, p = random_case(n=120, k=3, seed=1)
    y, p = np.tile(y, 3), np.tile(p, 3)
    m = multilabel_metrics(y, p, names)
    per = [k for k in m if k.startswith("test_roc_auc_")]
    assert len(per) == len(names)  # one key each: no collision after sanitizing
    for key in m:
        assert MLFLOW_KEY.match(key) and posixpath.normpath(key) == key and len(key) <= 250, key
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("y, p, match", [
    ([[0, 2]], [[.1, .2]], "only 0 and 1"),
    ([[0, 1]], [[.1, 1.7]], "logits"),
    ([[0, 1]], [[.1, np.nan]], "NaN"),
    ([[0, 1]], [[.1, .2, .3]], "shape"),
    ([[0, 1, 0]], [[.1, .2, .3]], r"shape \(n, 2\)"),
    (np.zeros((0, 2)), np.zeros((0, 2)), "empty"),
])
def test_bad_inputs_raise_helpful_value_errors(y, p, match):
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(np.asarray(y), np.asarray(p), ["A", "B"])


def test_evaluate_multilabel_writes_report_thresholds_and_pngs(tmp_path):
    from PIL import Image

    y, p = random_case(seed=4)
    y_val, p_val = random_case(n=100, seed=5)
    m, files, thresholds = evaluate_multilabel(y, p, FINDINGS, tmp_path / "out", y_val=y_val, probs_val=p_val,
                                               history={"loss": [1.0, 0.7], "val_loss": [1.1, 0.8],
                                                        "auc": [0.6, 0.8], "val_auc": [0.6, 0.7]})
    assert {f.name for f in files} == {"multilabel_report.json", "multilabel_report.csv", "thresholds.json",
                                       "roc_curves.png", "cooccurrence.png", "training_curves.png"}
    assert list(thresholds) == FINDINGS
    assert np.allclose(list(thresholds.values()), choose_thresholds(y_val, p_val, FINDINGS)[0])
    assert json.loads((tmp_path / "out" / "thresholds.json").read_text()) == thresholds
    assert m == multilabel_metrics(y, p, FINDINGS, list(thresholds.values()))
    report = json.loads((tmp_path / "out" / "multilabel_report.json").read_text())
    assert report["task"] == "multilabel" and report["thresholds"] == thresholds and report["n"] == len(y)
    assert report["aggregates"]["mean_auc"] == m["test_mean_auc"] and "validation" in report["threshold_rule"]
    with open(tmp_path / "out" / "multilabel_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["finding"] for r in rows] == FINDINGS
    assert [int(r["positives"]) for r in rows] == y.sum(0).tolist()
    for f in files:
        if f.suffix == ".png":
            with Image.open(f) as im:
                assert im.format == "PNG" and min(im.size) >= 200
                assert np.asarray(im.convert("L")).std() > 5
    _, without, _ = evaluate_multilabel(y, p, FINDINGS, tmp_path / "nohist")
    assert "training_curves.png" not in {f.name for f in without}


def test_cooccurrence_png_counts_many_findings(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"finding {i}" for i in range(14)]
    y = (rng.random((300, 14)) < 0.1).astype(int)
    path = cooccurrence_png(y, names, tmp_path / "co.png")
    assert path.is_file() and path.stat().st_size > 5000


def test_the_default_objective_is_mean_auc_for_multilabel_and_accuracy_otherwise(tmp_path, capsys):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from medspark import compare
    from medspark.config import OBJECTIVE_TAG, compose_project_config, objective_metric, runs_objective

    assert compose_project_config().train.objective == "auto"
    assert objective_metric("auto", "multilabel") == "test_mean_auc"
    assert objective_metric("auto", "multiclass") == objective_metric("auto", "binary") == "test_accuracy"
    assert objective_metric("test_macro_f1", "multilabel") == "test_macro_f1"  # an explicit choice stays

    def run(tag):
        return SimpleNamespace(data=SimpleNamespace(tags={OBJECTIVE_TAG: tag} if tag else {}))
    assert runs_objective("auto", [run("test_mean_auc"), run("test_mean_auc"), run(None)]) == "test_mean_auc"
    assert runs_objective("auto", [run(None)]) == "test_accuracy"  # runs from before tasks: single-label
    assert runs_objective("test_log_loss", [run("test_mean_auc")]) == "test_log_loss"

    uri = f"sqlite:///{tmp_path}/mlruns.db"  # `medspark compare --sort auto` over multilabel runs
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("chest", artifact_location=(tmp_path / "a").as_uri())
    for name, auc in (("low", 0.7), ("high", 0.9), ("mid", 0.8)):
        r = client.create_run(exp, run_name=name, tags={OBJECTIVE_TAG: "test_mean_auc"})
        client.log_metric(r.info.run_id, "test_mean_auc", auc)
        client.set_terminated(r.info.run_id)
    assert compare.main(["--uri", uri, "--experiment", "chest", "--sort", "auto", "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["run_name"] for r in rows] == ["high", "mid", "low"] and "test_mean_auc" in rows[0]


# ---------------------------------------------------------------------------------------------------------
# the wiring, end to end: train() on a multilabel dataset -> evaluation, thresholds, classifier, objective

HAND = ["Effusion", "Mass", "Nodule"]


class HandMadeFindings:
    """A tiny multilabel dataset source (the real CSV source is another part of issue 12): 32 px images whose
    findings are visible, a bright left half (Effusion), a bright top half (Mass), a bright centre (Nodule, rare);
    about 40% of the images have no finding. Written under `root` on first listing."""

    has_test_split = False

    def __init__(self, root: str, n: int = 160):
        self.root, self.n = root, n

    def list(self):
        from pathlib import Path

        from PIL import Image

        from medspark.data import targets
        from medspark.data.sources import Listing, Record

        rng = np.random.default_rng(7)
        records = []
        for i in range(self.n):
            has = rng.random(3) < [0.35, 0.3, 0.15]
            img = rng.normal(60, 12, (32, 32))
            img[:, :16] += 90 * has[0]
            img[:16, :] += 90 * has[1]
            img[12:20, 12:20] += 120 * has[2]
            path = Path(self.root) / f"img{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            records.append(Record(str(path), targets.bits(np.flatnonzero(has)), None))
        return Listing(records, list(HAND), False, task="multilabel")


@pytest.mark.slow
def test_training_a_multilabel_dataset_evaluates_ships_thresholds_and_judges_on_mean_auc(spark, tmp_path):
    import mlflow
    import pandas as pd
    from omegaconf import open_dict

    from conftest import make_cfg
    from medspark import serving
    from medspark.calibration import apply_temperature
    from medspark.data import loader
    from medspark.train import train

    cfg = make_cfg(tmp_path, ["model=dense", "preprocess.image_size=32", "train.epochs=12", "train.batch_size=16",
                              "train.lr=0.003", "train.class_weight=balanced", "split.val=0.25", "split.test=0.25",
                              "tracking.registered_model=ml"])
    with open_dict(cfg):
        cfg.dataset = {"name": "handmade", "_target_": f"{__name__}.HandMadeFindings", "root": str(tmp_path / "img")}
    objective = train(cfg, spark=spark)

    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    m, tags = run.data.metrics, run.data.tags
    assert tags["medspark.objective"] == "test_mean_auc" and objective == m["test_mean_auc"] >= 0.9
    assert {"test_micro_auc", "test_mean_ap", "test_hamming_loss", "test_subset_accuracy"} <= set(m)
    assert "test_accuracy" not in m and all(math.isfinite(v) for v in m.values())
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    assert summary["objective"] == {"test_mean_auc": objective} and "test_mean_auc" in summary["test"]
    assert summary["champion"]  # the first run on this objective becomes the champion
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{f}" for f in ("thresholds.json", "multilabel_report.json", "roc_curves.png",
                                        "cooccurrence.png", "training_curves.png")} <= files
    thresholds = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/thresholds.json"))

    clf = mlflow.pyfunc.load_model(summary["classifier_uri"])
    assert clf.metadata.metadata["medspark"]["thresholds"] == thresholds
    keras_model = mlflow.tensorflow.load_model(summary["model_uri"])
    data = loader.read_split(f"{run.data.params['data_url']}/test", ["image", "targets"])
    files = [serving.png_bytes(im) for im in data["image"][:8]]
    out = clf.predict(pd.DataFrame({"image": files}))
    ref = np.asarray(keras_model.predict(data["image"][:8].astype(np.float32), verbose=0), np.float64)
    ref = apply_temperature(ref, m["temperature"], multilabel=True)  # the classifier's probabilities are calibrated
    assert clf.metadata.metadata["medspark"]["temperature"] == pytest.approx(m["temperature"], rel=1e-12)
    np.testing.assert_allclose(out[[f"prob_{f}" for f in HAND]].to_numpy(np.float64), ref, rtol=1e-4, atol=1e-5)
    t = np.array([thresholds[f] for f in HAND])
    assert out["findings"].tolist() == ["|".join(f for f, on in zip(HAND, r >= t) if on) or "No Finding" for r in ref]
