"""Operating points (medspark.operating_points): the threshold chosen on validation hits its rule's target there,
Youden's threshold maximises J, the test figures at it are right, a bad rule is one config line before Spark, and a
binary classifier logged with its threshold answers by it (medspark.serving), through MLflow's pyfunc loader."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from medspark import operating_points as op
from medspark import serving
from medspark.config import ConfigError, check
from medspark.data.preprocess import PreprocessConfig, decode
from medspark.evaluate import _f1_cut
from conftest import make_cfg


def scores(n: int = 400, seed: int = 0, ties: bool = False):
    """Overlapping positive and negative scores in [0, 1] (optionally rounded, so many are tied)."""
    rng = np.random.default_rng(seed)
    pos = np.arange(n) % 3 == 0
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * pos)))
    return pos, (np.round(s, 2) if ties else s)


def rates(pos, s, t):
    called = s >= t
    return called[pos].mean(), (~called[~pos]).mean()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_sensitivity_rule_hits_its_target_with_the_best_specificity(target, ties):
    pos, s = scores(ties=ties)
    t = op.choose_threshold(pos, s, f"sensitivity:{target}")
    sens, spec = rates(pos, s, t)
    assert sens >= target
    higher = np.unique(s[s > s[s >= t].min()])  # any higher cut loses the target (none has better specificity)
    assert all(rates(pos, s, h)[0] < target for h in higher)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", [0.9, 0.95])
def test_specificity_rule_hits_its_target_with_the_best_sensitivity(target, ties):
    pos, s = scores(seed=1, ties=ties)
    t = op.choose_threshold(pos, s, f"specificity:{target}")
    assert rates(pos, s, t)[1] >= target
    lower = np.unique(s[s < t])  # any lower cut loses the target (none has better sensitivity)
    assert all(rates(pos, s, lo)[1] < target for lo in lower)


@pytest.mark.parametrize("ties", [False, True])
def test_youden_maximises_j_over_every_threshold(ties):
    pos, s = scores(seed=2, ties=ties)
    t = op.choose_threshold(pos, s, "youden")
    j = sum(rates(pos, s, t)) - 1
    best = max(sum(rates(pos, s, c)) - 1 for c in np.unique(s))
    assert j == pytest.approx(best) and j > 0.3
    assert not np.isin(t, s) or ties  # halfway between two validation scores, as evaluate._f1_cut places it


def test_f1_rule_is_the_multilabel_rule_of_before():
    pos, s = scores(seed=3)
    assert op.choose_threshold(pos, s, "f1") == _f1_cut(pos.astype(np.int64), s)


def test_one_class_in_validation_has_no_threshold():
    s = np.linspace(0, 1, 10)
    assert op.choose_threshold(np.zeros(10, bool), s, "youden") is None
    assert op.choose_threshold(np.ones(10, bool), s, "sensitivity:0.9") is None


def test_sensitivity_at_fixed_specificity_reads_the_roc():
    pos, s = scores(seed=4)
    fpr, tpr, _ = roc_curve(pos, s)
    for spec in op.FIXED_SPECIFICITIES:
        assert op.sensitivity_at_specificity(pos, s, spec) == pytest.approx(tpr[fpr <= 1 - spec].max())


def test_at_threshold_counts():
    got = op.at_threshold([1, 1, 0, 0, 0], [0.9, 0.2, 0.8, 0.1, 0.3], 0.5)
    assert got == {"tp": 1, "fp": 1, "fn": 1, "tn": 2, "sensitivity": 0.5, "specificity": 2 / 3, "ppv": 0.5,
                   "npv": 2 / 3}
    assert op.at_threshold([0, 0], [0.1, 0.2], 0.5)["sensitivity"] is None  # undefined, not NaN


def test_binary_metrics_rows_and_shipped_threshold(tmp_path):
    pos_v, s_v = scores(seed=5)
    pos_t, s_t = scores(seed=6)
    two = lambda s: np.stack([1 - s, s], 1)  # noqa: E731
    metrics, rows, shipped = op.operating_point_metrics(pos_v.astype(int), two(s_v), pos_t.astype(int), two(s_t),
                                                        ["NORMAL", "PNEUMONIA"], "binary", "sensitivity:0.9")
    t = shipped["PNEUMONIA"]
    assert list(shipped) == ["PNEUMONIA"] and rows[0]["val_sensitivity"] >= 0.9 and rows[0]["rule"] == "sensitivity:0.9"
    assert metrics["test_op_sensitivity"] == pytest.approx(rates(pos_t, s_t, t)[0])
    assert metrics["test_op_specificity"] == pytest.approx(rates(pos_t, s_t, t)[1])
    assert set(metrics) == {"test_op_sensitivity", "test_op_specificity", "test_op_ppv", "test_op_npv",
                            "test_sensitivity_at_spec_90", "test_sensitivity_at_spec_95"}
    path = op.write_csv(rows, tmp_path / "operating_points.csv")
    assert path.read_text().splitlines()[0] == ",".join(op.OP_COLUMNS)
    # no validation split: the default threshold, said in the rows
    _, rows, shipped = op.operating_point_metrics(None, None, pos_t.astype(int), two(s_t), ["no", "yes"], "binary",
                                                  "auto")
    assert shipped == {"yes": op.DEFAULT_THRESHOLD} and rows[0]["val_sensitivity"] is None


def test_multilabel_auto_keeps_the_thresholds_it_is_given_and_multiclass_has_none():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.1, 0.7], [0.6, 0.8], [0.3, 0.1]])
    metrics, rows, shipped = op.operating_point_metrics(y, p, y, p, ["Mass", "Nodule"], "multilabel", "auto",
                                                        thresholds={"Mass": 0.5, "Nodule": 0.45})
    assert shipped == {"Mass": 0.5, "Nodule": 0.45} and [r["rule"] for r in rows] == ["f1", "f1"]
    assert metrics["test_op_sensitivity_Mass"] == 1.0 and "test_sensitivity_at_spec_90_Nodule" in metrics
    assert op.operating_point_metrics(y[:, 0], p, y[:, 0], p, ["a", "b", "c"], "multiclass", "youden") == ({}, [], {})


@pytest.mark.parametrize("rule", ["youdn", "sensitivity", "sensitivity:1.5", "specificity:x", "f1:0.5", "0.5"])
def test_bad_rule_is_a_config_error_naming_the_key(tmp_path, rule):
    with pytest.raises(ValueError, match="evaluate.operating_point"):
        op.parse_rule(rule)
    with pytest.raises(ConfigError, match="evaluate.operating_point"):
        check(make_cfg(tmp_path, [f"evaluate.operating_point={rule}"]))


def test_good_settings_pass_the_config_check(tmp_path):
    check(make_cfg(tmp_path, ["evaluate.operating_point=specificity:0.9", "evaluate.bootstrap.resamples=0"]))
    with pytest.raises(ConfigError, match="evaluate.bootstrap.resamples"):
        check(make_cfg(tmp_path, ["evaluate.bootstrap.resamples=-5"]))


def test_cli_bad_rule_is_one_line_before_spark(tmp_path):
    from test_config import cli, the_error_line  # no Java: anything starting Spark would fail differently

    line = the_error_line(cli("medspark.train", "evaluate.operating_point=sensitivity:95", tmp_path=tmp_path))
    assert line.startswith("medspark: error: evaluate.operating_point='sensitivity:95' is not a rule; use youden")


# ---------------------------------------------------------------------------------------------------------
# the packaged binary classifier answers by its threshold

PRE = PreprocessConfig(image_size=16)


@pytest.fixture(scope="module")
def binary_classifier(tmp_path_factory):
    """A tiny untrained softmax network logged with a threshold below 0.5, so some answers differ from argmax."""
    import keras

    tmp = tmp_path_factory.mktemp("serving_binary")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Rescaling(1 / 127.5, -1),
                              keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    rng = np.random.default_rng(0)
    ims = rng.integers(0, 256, (24, 16, 16, 1)).astype(np.uint8)
    files = [serving.png_bytes(im) for im in ims]
    p = np.asarray(model.predict(np.stack([decode(b, PRE) for b in files]).astype(np.float32), verbose=0), float)
    t = float(np.quantile(p[:, 1], 0.3))
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlruns.db")
    mlflow.set_experiment("serving-binary")
    with mlflow.start_run() as run:
        serving.log_model(model, PRE, ["NORMAL", "PNEUMONIA"], ims[:1], task="binary", thresholds={"PNEUMONIA": t})
        serving.log_model(model, PRE, ["NORMAL", "PNEUMONIA"], ims[:1], name="argmax", task="binary")
    return {"uri": f"runs:/{run.info.run_id}", "files": files, "p": p, "t": t}


def test_binary_classifier_answers_by_its_threshold(binary_classifier):
    c = binary_classifier
    clf = mlflow.pyfunc.load_model(f"{c['uri']}/classifier")
    assert clf.metadata.metadata["medspark"]["thresholds"] == {"PNEUMONIA": c["t"]}
    out = clf.predict(pd.DataFrame({"image": c["files"]}))
    by_threshold = np.where(c["p"][:, 1] >= c["t"], "PNEUMONIA", "NORMAL")
    assert (by_threshold != np.where(c["p"][:, 1] >= 0.5, "PNEUMONIA", "NORMAL")).any()  # not vacuous
    assert out["predicted_class"].tolist() == by_threshold.tolist()
    plain = mlflow.pyfunc.load_model(f"{c['uri']}/argmax").predict(pd.DataFrame({"image": c["files"]}))
    assert plain["predicted_class"].tolist() == np.array(["NORMAL", "PNEUMONIA"])[c["p"].argmax(1)].tolist()


def test_binary_threshold_must_name_the_positive_class():
    assert serving.check_binary_threshold({"yes": 0.3}, ["no", "yes"]) == {"yes": 0.3}
    for bad in ({"no": 0.3}, {"yes": 1.5}, [0.3], {"yes": 0.3, "no": 0.7}):
        with pytest.raises(ValueError, match="positive class 'yes'"):
            serving.check_binary_threshold(bad, ["no", "yes"])


def test_medspark_predict_writes_the_thresholded_class_and_says_the_rule(binary_classifier, tmp_path, capsys):
    from medspark import predict

    c = binary_classifier
    for i, b in enumerate(c["files"][:8]):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"scan{i}.png").write_bytes(b)
    rc = predict.main([f"model={c['uri']}/classifier", f"input={tmp_path / 'in'}", f"output={tmp_path / 'p.csv'}",
                       f"tracking_uri={mlflow.get_tracking_uri()}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[-1] == (f"medspark predict: predicted_class is PNEUMONIA when prob_PNEUMONIA >= "
                                    f"{c['t']:.4g} (the operating point chosen on validation), else NORMAL")
    got = pd.read_csv(tmp_path / "p.csv")
    assert got["predicted_class"].tolist() == np.where(got["prob_PNEUMONIA"] >= c["t"], "PNEUMONIA", "NORMAL").tolist()
    assert predict.decision(f"{c['uri']}/argmax") is None
