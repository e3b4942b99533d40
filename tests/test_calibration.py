"""medspark.calibration: the ECE and Brier numbers are right, temperature scaling fixes an over-confident model
using the validation split only, and the evaluation's files say so. Pure numpy (no training): fast."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import brier_score_loss

from medspark import calibration
from medspark.calibration import Options, apply_temperature, brier, calibrate, ece, fit_temperature, reliability


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sample(n, k=4, seed=0, scale=1.5):
    """True logits and labels drawn from their softmax: those probabilities are calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    p = softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, p, y


def multilabel_sample(n, k=3, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2 - 1
    p = 1 / (1 + np.exp(-z))
    return z, p, (rng.random((n, k)) < p).astype(int)


def test_a_calibrated_sample_has_ece_near_zero_and_an_over_confident_one_does_not():
    z, p, y = sample(40_000)
    assert ece(y, p) < 0.01 and ece(y, p, adaptive=True) < 0.01
    sharp = softmax(3 * z)  # the same ranking, over-confident
    assert ece(y, sharp) > 0.15 and ece(y, sharp, adaptive=True) > 0.15
    _, q, t = multilabel_sample(40_000)
    assert ece(t, q, multilabel=True) < 0.01
    assert ece(t, q ** 0.3, multilabel=True) > 0.15  # every finding said too often


def test_ece_and_bins_by_hand():
    # confidences 0.9 0.9 0.6 0.6 (top class), correct 1 0 1 1
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 0, 0, 1])
    rows = reliability(*calibration.outcomes(y, p), bins=10)
    got = [r[c] for r in rows for c in ("count", "confidence", "accuracy", "lower", "upper")]
    assert got == pytest.approx([2, 0.6, 1.0, 0.5, 0.6, 2, 0.9, 0.5, 0.8, 0.9])  # bins are (lower, upper]
    assert ece(y, p, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    adaptive = reliability(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.array([0, 0, 1, 1, 1]), bins=2, adaptive=True)
    assert [r["count"] for r in adaptive] == [3, 2] and adaptive[0]["lower"] == 0.1 and adaptive[1]["upper"] == 0.5


def test_brier_per_task():
    _, p, y = sample(500, k=2, seed=1)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p[:, 1]))  # binary: the usual one, of the positive class
    y3 = np.array([0, 1, 2])
    assert brier(y3, np.eye(3)[y3]) == 0
    assert brier(y3, np.full((3, 3), 1 / 3)) == pytest.approx(2 / 3)  # multiclass: sum over classes, 1 - 1/k
    assert brier(y3, np.eye(3)[[1, 2, 0]]) == pytest.approx(2.0)
    _, q, t = multilabel_sample(300, k=3, seed=2)
    per_finding = [brier_score_loss(t[:, j], q[:, j]) for j in range(3)]
    assert brier(t, q, multilabel=True) == pytest.approx(np.mean(per_finding))


def test_temperature_scaling_softens_an_over_confident_model_and_lowers_validation_ece():
    z, _, y = sample(5_000, seed=3)
    over = softmax(2.5 * z)  # probabilities sharpened by a power: p**2.5, renormalized
    t = fit_temperature(y, over)
    assert t > 1 and t == pytest.approx(2.5, rel=0.1) and not calibration.at_bound(y, over, t)
    after = apply_temperature(over, t)
    assert ece(y, after) < ece(y, over) / 3
    np.testing.assert_array_equal(after.argmax(1), over.argmax(1))  # accuracy cannot change
    zm, _, ym = multilabel_sample(5_000, seed=4)
    over_m = 1 / (1 + np.exp(-2 * zm))
    tm = fit_temperature(ym, over_m, multilabel=True)
    assert tm == pytest.approx(2.0, rel=0.1)
    assert ece(ym, apply_temperature(over_m, tm, True), multilabel=True) < ece(ym, over_m, multilabel=True) / 3
    under = softmax(0.5 * z)
    assert fit_temperature(y, under) < 1  # an under-confident model is sharpened


def test_temperature_is_fitted_on_the_validation_split_only(tmp_path):
    z_val, _, y_val = sample(3_000, seed=5)
    z_test, p_test, y_test = sample(3_000, seed=6)
    p_val = softmax(3 * z_val)  # validation over-confident; test already calibrated
    cal = calibrate(y_test, p_test, y_val, p_val, False, Options(), tmp_path)
    assert cal.temperature == pytest.approx(fit_temperature(y_val, p_val))
    assert cal.temperature > 2 and fit_temperature(y_test, p_test) == pytest.approx(1, abs=0.1)
    shuffled = calibrate(np.random.default_rng(0).permutation(y_test), p_test, y_val, p_val, False, Options(),
                         tmp_path / "b")
    assert shuffled.temperature == cal.temperature, "the test labels play no part in the temperature"
    np.testing.assert_allclose(cal.test, apply_temperature(p_test, cal.temperature))
    np.testing.assert_allclose(cal.val, apply_temperature(p_val, cal.temperature))
    m = cal.metrics
    assert m["temperature"] == cal.temperature
    assert m["val_ece_after_temperature"] < m["val_ece_before_temperature"] / 3
    assert m["test_ece"] > m["test_ece_before_temperature"], "a temperature from another split makes test worse"
    assert m["test_brier"] == pytest.approx(brier(y_test, cal.test))
    assert m["test_ece_adaptive"] == pytest.approx(ece(y_test, cal.test, adaptive=True))


def test_a_validation_split_that_drives_the_temperature_to_its_bound_gets_none_and_says_so(tmp_path, caplog):
    y = np.array([0, 1, 2] * 20)
    p = softmax(np.eye(3)[y] * 2.0)  # every validation image right: sharper is always likelier
    t = calibration.fit_temperature(y, p)
    assert t < 0.1 and calibration.at_bound(y, p, t)
    cal = calibrate(y, p, y, p, False, Options(), tmp_path)
    assert cal.temperature == 1.0 and np.array_equal(cal.test, p), "a temperature the split cannot pin is not shipped"
    assert "the search's bound" in caplog.text and "none is applied" in caplog.text
    assert cal.note.startswith("not applied")


def test_no_validation_split_or_temperature_off_keeps_the_network_probabilities(tmp_path):
    z, p, y = sample(400, seed=7)
    over = softmax(3 * z)
    for cal in (calibrate(y, over, None, None, False, Options(), tmp_path / "a"),
                calibrate(y, over, y, over, False, Options(temperature=False), tmp_path / "b")):
        assert cal.temperature == 1.0 and cal.test is over
        assert cal.metrics["test_ece"] == cal.metrics["test_ece_before_temperature"] == pytest.approx(ece(y, over))
    assert "val_ece_before_temperature" not in calibrate(y, over, None, None, False, Options(), tmp_path / "c").metrics


def test_temperature_keeps_multilabel_decisions_when_thresholds_move_with_it():
    _, q, _ = multilabel_sample(2_000, seed=8)
    thresholds = np.array([[0.2, 0.5, 0.73]])
    for t in (0.4, 1.7, 3.0):
        scaled, cut = apply_temperature(q, t, True), apply_temperature(thresholds, t, True)
        np.testing.assert_array_equal(scaled >= cut, q >= thresholds)
    assert apply_temperature(np.array([[0.5]]), 2.5, True)[0, 0] == 0.5
    np.testing.assert_allclose(apply_temperature(apply_temperature(q, 2.0, True), 0.5, True), q, rtol=1e-9)


def test_the_reliability_diagram_and_csv(tmp_path):
    z_val, _, y_val = sample(2_000, seed=9)
    z, _, y = sample(1_000, seed=10)
    cal = calibrate(y, softmax(2 * z), y_val, softmax(2 * z_val), False, Options(bins=10), tmp_path)
    assert [f.name for f in cal.files] == ["reliability.png", "calibration.csv"]
    with Image.open(tmp_path / "reliability.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000 and np.asarray(im.convert("L")).std() > 5
    rows = list(csv.DictReader(open(tmp_path / "calibration.csv", encoding="utf-8")))
    assert list(rows[0]) == list(calibration.CSV_COLUMNS)
    assert {(r["split"], r["temperature"], r["binning"]) for r in rows} == {
        (s, t, b) for s in ("val", "test") for t in ("before", "after") for b in ("equal_width", "adaptive")}
    test_after = [r for r in rows if (r["split"], r["temperature"], r["binning"]) == ("test", "after", "equal_width")]
    assert sum(int(r["count"]) for r in test_after) == 1_000 and len(test_after) <= 10
    ece_csv = sum(int(r["count"]) * abs(float(r["accuracy"]) - float(r["confidence"])) for r in test_after) / 1_000
    assert ece_csv == pytest.approx(cal.metrics["test_ece"])


@pytest.mark.parametrize("options, match", [
    ({"calibration": {"bins": 1}}, "evaluate.calibration.bins=1"),
    ({"calibration": {"bins": True}}, "evaluate.calibration.bins=True"),
    ({"calibration": {"bin": 10}}, "unknown evaluate.calibration option"),
    ({"temperature": "yes"}, "evaluate.temperature='yes'"),
    ({"tta": "rotate"}, "evaluate.tta='rotate' is not one of none, flip, flip_shift"),
])
def test_bad_options_name_their_key(options, match):
    with pytest.raises(ValueError, match=match):
        Options.from_mapping(options)


def test_defaults_and_the_project_config(cfg_factory):
    from omegaconf import OmegaConf

    from medspark.config import ConfigError, check

    assert Options.from_mapping(None) == Options(bins=15, temperature=True, tta="none")
    cfg = cfg_factory()
    assert Options.from_mapping(OmegaConf.to_container(cfg.evaluate)) == Options()
    with pytest.raises(ConfigError, match="evaluate.tta='spin'"):
        check(cfg_factory("evaluate.tta=spin"))


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_thresholds_moved_to_the_calibrated_scale_make_the_same_decisions(task):
    rng = np.random.default_rng(3)
    if task == "binary":
        p1 = rng.uniform(0.01, 0.99, 500)
        raw, thresholds, col = np.stack([1 - p1, p1], 1), {"yes": 0.3}, 1
    else:
        raw, thresholds, col = rng.uniform(0.01, 0.99, (500, 2)), {"a": 0.3, "b": 0.7}, None
    for t in (0.4, 2.5):
        scaled = calibration.scale_thresholds(thresholds, t, task, ["no", "yes"])
        cal = calibration.apply_temperature(raw, t, task == "multilabel")
        cut = np.array(list(scaled.values()))
        before = raw[:, col] >= thresholds["yes"] if col else raw >= np.array(list(thresholds.values()))
        after = cal[:, col] >= cut[0] if col else cal >= cut
        assert np.array_equal(before, after) and scaled != thresholds
