"""Bootstrap intervals of the test metrics (medspark.uncertainty): the point estimates are evaluate.py's own, the
intervals contain them, shrink like 1/sqrt(n), widen when a patient's images move together, repeat with a seed,
and a resample where a metric is undefined costs that resample, never a NaN in MLflow."""
from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest

from medspark import uncertainty as u
from medspark.evaluate import classification_metrics, multilabel_metrics


def softmax_set(n: int, k: int, seed: int = 0, signal: float = 1.0):
    """Labels and softmax rows that are right well above chance but far from always."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def by_metric(rows):
    return {r.metric: r for r in rows}


@pytest.mark.parametrize("k", [2, 3])
def test_point_estimates_are_the_logged_metrics_and_intervals_contain_them(k):
    names = [f"c{i}" for i in range(k)]
    y, p = softmax_set(600, k)
    rows = by_metric(u.intervals(y, p, names, "binary" if k == 2 else "multiclass", resamples=500, seed=1))
    logged = classification_metrics(y, p, names, prefix="")
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "roc_auc_c0", "roc_auc_c1"):
        assert rows[m].value == pytest.approx(logged[m], abs=1e-12), m
    for c in names:  # sensitivity is evaluate.py's recall
        assert rows[f"sensitivity_{c}"].value == pytest.approx(logged[f"recall_{c}"], abs=1e-12)
        assert 0 < rows[f"specificity_{c}"].value < 1
    for r in rows.values():
        assert r.ci_low <= r.value <= r.ci_high and r.ci_low < r.ci_high, r
        assert r.resamples == 500 and r.unit == "images"  # stratified: every class in every resample


def test_resampled_weights_are_the_metrics_of_the_resampled_rows():
    """A weight row is a bootstrap sample: metrics on weights = evaluate.py's metrics on the repeated rows."""
    names = ["a", "b", "c"]
    y, p = softmax_set(300, 3, seed=4)
    idx = np.random.default_rng(5).integers(0, 300, 300)
    w = np.bincount(idx, minlength=300)[None].astype(float)
    got = u.single_label_stats(y, p, names, w)
    want = classification_metrics(y[idx], p[idx], names, prefix="")
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "roc_auc_b"):
        assert got[m][0] == pytest.approx(want[m], abs=1e-12), m


def test_intervals_shrink_like_one_over_sqrt_n():
    widths = {}
    for n in (200, 1800):
        y, p = softmax_set(n, 2, seed=n)
        r = by_metric(u.intervals(y, p, ["no", "yes"], "binary", resamples=1000, seed=0))
        widths[n] = {m: r[m].ci_high - r[m].ci_low for m in ("accuracy", "roc_auc_ovr", "macro_f1")}
    for m in widths[200]:
        ratio = widths[200][m] / widths[1800][m]
        assert 2.2 < ratio < 4.0, (m, ratio)  # sqrt(1800 / 200) = 3


def test_patient_resampling_is_wider_when_a_patients_images_agree():
    """40 patients x 10 images, each patient's images all right or all wrong: 40 units of evidence, not 400."""
    rng = np.random.default_rng(2)
    patients = np.repeat([f"p{i:02d}" for i in range(40)], 10)
    y = np.repeat(np.arange(40) % 2, 10)
    right = np.repeat(rng.random(40) < 0.75, 10)
    p1 = np.where(right == (y == 1), 0.8, 0.2) + rng.uniform(-0.05, 0.05, len(y))
    p = np.stack([1 - p1, p1], 1)
    img = by_metric(u.intervals(y, p, ["no", "yes"], "binary", resamples=1000, seed=0))
    pat = by_metric(u.intervals(y, p, ["no", "yes"], "binary", patients=patients, resamples=1000, seed=0))
    assert pat["accuracy"].unit == "patients" and img["accuracy"].unit == "images"
    assert pat["accuracy"].value == img["accuracy"].value
    for m in ("accuracy", "roc_auc_ovr"):
        w_img, w_pat = img[m].ci_high - img[m].ci_low, pat[m].ci_high - pat[m].ci_low
        assert w_pat > 2 * w_img, (m, w_img, w_pat)  # sqrt(10) ~ 3.2 in theory


def test_rows_without_a_patient_are_their_own_unit():
    units, unit = u.units_of(["a", "", "a", None, "b"], 5)
    assert unit == "patients" and units[0] == units[2] and len(set(units.tolist())) == 4
    assert u.units_of(["", None, ""], 3)[1] == "images"


def test_same_seed_same_intervals_other_seed_other_intervals():
    y, p = softmax_set(300, 3)
    a = u.intervals(y, p, ["a", "b", "c"], "multiclass", resamples=300, seed=7)
    assert a == u.intervals(y, p, ["a", "b", "c"], "multiclass", resamples=300, seed=7)
    assert a != u.intervals(y, p, ["a", "b", "c"], "multiclass", resamples=300, seed=8)


def test_multilabel_rare_and_absent_findings_give_no_nan():
    """A finding with 2 positives in 150 is missing from some resamples (its AUC undefined there: those resamples
    are left out and counted); a finding without positives has no AUC, so no row and no metric."""
    rng = np.random.default_rng(3)
    n = 150
    y = np.zeros((n, 3), np.int64)
    y[:, 0] = rng.random(n) < 0.4
    y[[5, 77], 1] = 1
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, (n, 3)), 0, 1)
    rows = by_metric(u.intervals(y, p, ["Effusion", "Mass", "Hernia"], "multilabel", resamples=1000, seed=0))
    logged = multilabel_metrics(y, p, ["Effusion", "Mass", "Hernia"], prefix="")
    assert set(rows) == {"roc_auc_Effusion", "roc_auc_Mass", "mean_auc"}
    assert rows["mean_auc"].value == pytest.approx(logged["mean_auc"]) and rows["mean_auc"].resamples == 1000
    assert rows["roc_auc_Effusion"].value == pytest.approx(logged["roc_auc_Effusion"])
    assert 700 < rows["roc_auc_Mass"].resamples < 1000  # P(no positive drawn) = (148/150)^150 ~ 13%
    metrics = u.as_metrics(rows.values())
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert set(metrics) == {f"test_{m}_ci_{s}" for m in rows for s in ("low", "high")}


def test_too_few_defined_resamples_is_a_row_without_interval(tmp_path):
    y = np.zeros((60, 1), np.int64)
    y[7, 0] = 1  # one positive: absent from ~37% of resamples, so the interval is still there
    p = np.linspace(0, 1, 60)[:, None]
    r = u.intervals(y, p, ["Mass"], "multilabel", resamples=400, seed=0)[0]
    assert r.ci_low is not None and r.resamples < 400
    rows = [u.Interval("roc_auc_Mass", 0.9, None, None, 120, "images"), r]
    assert "test_roc_auc_Mass_ci_low" not in u.as_metrics(rows[:1])
    path = u.write_csv(rows, tmp_path / "intervals.csv")
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(u.INTERVAL_COLUMNS)
    assert read[0]["ci_low"] == "" and read[0]["resamples"] == "120"
    assert float(read[1]["ci_low"]) == r.ci_low and read[1]["unit"] == "images"


def test_binary_operating_point_gets_intervals():
    y, p = softmax_set(400, 2)
    rows = by_metric(u.intervals(y, p, ["no", "yes"], "binary", resamples=300, operating_point=0.3))
    pred = p[:, 1] >= 0.3
    assert rows["op_sensitivity"].value == pytest.approx(pred[y == 1].mean())
    assert rows["op_npv"].value == pytest.approx((y[~pred] == 0).mean())
    assert rows["op_ppv"].ci_low <= rows["op_ppv"].value <= rows["op_ppv"].ci_high


def test_off_and_bad_options():
    y, p = softmax_set(50, 2)
    assert u.intervals(y, p, ["no", "yes"], "binary", resamples=0) == []
    assert u.check_options(None) == u.DEFAULTS
    for bad, key in (({"resamples": -1}, "resamples"), ({"level": 95}, "level"), ({"seed": "x"}, "seed"),
                     ({"samples": 10}, "samples"), (5, "bootstrap")):
        with pytest.raises(ValueError, match=key):
            u.check_options(bad)


def test_one_thousand_resamples_of_one_thousand_images_is_fast():
    y, p = softmax_set(1000, 4)
    u.intervals(y, p, list("abcd"), "multiclass", resamples=50)  # imports and first calls out of the timing
    t0 = time.perf_counter()
    rows = u.intervals(y, p, list("abcd"), "multiclass", resamples=1000)
    took = time.perf_counter() - t0
    assert len(rows) == 4 + 3 * 4 and took < 3.0, took  # measured ~0.3 s on one slow core


@pytest.mark.slow
def test_a_multilabel_run_with_patients_resamples_patients(spark, tmp_path):
    """A real tiny synthetic chest X-ray run (patients with follow-ups): intervals over patients, per finding
    operating points at the f1 thresholds multilabel has always shipped, test predictions without paths."""
    import json

    import mlflow
    import pandas as pd

    from conftest import make_cfg
    from medspark.train import train

    cfg = make_cfg(tmp_path, ["dataset=synthetic_cxr14", "dataset.generate.patients=80", "dataset.generate.size=48",
                              "preprocess.image_size=32", "model=dense", "train.epochs=2", "train.batch_size=16",
                              "tracking.register=never", "evaluate.bootstrap.resamples=200"])
    train(cfg, spark=spark)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    rid, m = run.info.run_id, run.data.metrics
    load = lambda name: mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=f"evaluation/{name}")  # noqa
    rows = pd.read_csv(load("intervals.csv"))
    assert set(rows["unit"]) == {"patients"} and "mean_auc" in set(rows["metric"])
    assert m["test_mean_auc_ci_low"] <= m["test_mean_auc"] <= m["test_mean_auc_ci_high"]
    assert all(math.isfinite(v) for v in m.values())
    thresholds = json.loads(open(load("thresholds.json")).read())
    ops = pd.read_csv(load("operating_points.csv"))
    from medspark.calibration import scale_thresholds  # chosen on the network's scale, shipped on the calibrated

    chosen = dict(zip(ops["class"], ops["threshold"]))
    assert set(ops["rule"]) == {"f1"} and scale_thresholds(chosen, m["temperature"], "multilabel", list(chosen)) == \
        pytest.approx(thresholds)
    assert dict(zip(ops["class"], ops["shipped_threshold"])) == pytest.approx(thresholds)  # what the model applies
    preds = pd.read_csv(load("test_predictions.csv"))
    findings = list(thresholds)
    assert list(preds.columns) == ["sha1", *(f"true_{f}" for f in findings), *(f"prob_{f}" for f in findings)]
    assert len(preds) == m["test_n"]
