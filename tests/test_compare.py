"""`medspark compare`: an experiment's runs as one table, best first, from runs shaped like medspark's (same
param and metric keys), in a temporary sqlite store."""
import csv
import io
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from medspark import compare
from medspark.config import project_root

# name: (params that vary, metrics, status); every run also gets the params medspark logs for every run
RUNS = {
    "cnn-single": ({"model.name": "small_cnn", "backend.name": "single", "train.lr": "0.001", "train.epochs": "12"},
                   {"test_accuracy": 0.95, "test_macro_f1": 0.94, "train_seconds": 100.0,
                    "train_images_per_second": 50.0, "speedup_vs_single": 1.0}, "FINISHED"),
    "cnn-sync": ({"model.name": "small_cnn", "backend.name": "elephas_sync", "train.lr": "0.001", "train.epochs": "12"},
                 {"test_accuracy": 0.90, "test_macro_f1": 0.89, "train_seconds": 60.0,
                  "train_images_per_second": 80.0, "speedup_vs_single": 1.6}, "FINISHED"),
    "dense-single": ({"model.name": "dense", "backend.name": "single", "train.lr": "0.01", "train.epochs": "12"},
                     {"test_accuracy": 0.70, "test_macro_f1": 0.65, "train_seconds": 30.0,
                      "train_images_per_second": 160.0, "speedup_vs_single": 1.0}, "FINISHED"),
    "cnn-short": ({"model.name": "small_cnn", "backend.name": "single", "train.lr": "0.0001", "train.epochs": "5"},
                  {"test_accuracy": 0.98, "test_macro_f1": 0.97, "train_seconds": 45.0,
                   "train_images_per_second": 52.0, "speedup_vs_single": 1.0}, "FINISHED"),
    "cnn-crashed": ({"model.name": "small_cnn", "backend.name": "single", "train.lr": "0.001", "train.epochs": "12"},
                    {}, "FAILED"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlruns.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("medspark-synthetic", artifact_location=(tmp / "artifacts").as_uri())
    ids = {}
    for i, (name, (params, metrics, status)) in enumerate(RUNS.items()):
        run = client.create_run(exp, run_name=name, tags={"medspark.model": params["model.name"],
                                                          "medspark.backend": params["backend.name"]})
        common = {"seed": "42", "dataset.name": "synthetic", "preprocess.image_size": "128",
                  "paths.work_dir": f"/tmp/w{i}", "overrides": f"run={i}", "tracking.uri": uri}
        for k, v in (common | params).items():
            client.log_param(run.info.run_id, k, v)
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id, status)
        ids[name] = run.info.run_id
    parent = client.create_run(exp, run_name="sweep train.lr=1e-3,3e-4", tags={"medspark.sweep": "parent"})
    client.log_param(parent.info.run_id, "sweep_params", "train.lr=1e-3,3e-4")
    client.log_metric(parent.info.run_id, "best_test_accuracy", 0.98)
    client.set_terminated(parent.info.run_id)
    ids["sweep"] = parent.info.run_id
    trial = client.create_run(exp, run_name="optuna-trial", tags={"medspark.model": "small_cnn",
                                                                  "medspark.backend": "single"})
    client.log_param(trial.info.run_id, "train.lr", "0.0003162277660168379")  # an Optuna trial's value
    client.log_param(trial.info.run_id, "train.epochs", "12")
    client.log_metric(trial.info.run_id, "test_accuracy", 0.123456789)
    client.set_terminated(trial.info.run_id)
    ids["optuna-trial"] = trial.info.run_id
    other = client.create_experiment("no-speedups", artifact_location=(tmp / "artifacts2").as_uri())
    run = client.create_run(other, run_name="plain")
    client.log_param(run.info.run_id, "model.name", "small_cnn")
    client.log_metric(run.info.run_id, "test_accuracy", 0.5)
    client.log_metric(run.info.run_id, "train_seconds", 5.0)
    client.set_terminated(run.info.run_id)
    return {"uri": uri, "ids": ids}


def run_compare(store, *args, experiment="medspark-synthetic", capsys):
    rc = compare.main(["--uri", store["uri"], "--experiment", experiment, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def table(store, *args, capsys, **kw):
    rc, out, err = run_compare(store, "--format", "csv", *args, capsys=capsys, **kw)
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    return rows


def test_sorted_by_the_objective_best_first_failed_runs_last(store, capsys):
    rows = table(store, capsys=capsys)
    assert [r["run_name"] for r in rows] == ["cnn-short", "cnn-single", "cnn-sync", "dense-single", "optuna-trial",
                                             "cnn-crashed"]  # the sweep parent is not a training run: left out
    assert rows[0]["run_id"] == store["ids"]["cnn-short"] and rows[0]["status"] == "FINISHED"
    assert rows[-1]["status"] == "FAILED" and rows[-1]["test_accuracy"] == ""
    assert rows[0]["model"] == "small_cnn" and rows[1]["backend"] == "single" and rows[2]["backend"] == "elephas_sync"
    assert float(rows[0]["test_accuracy"]) == 0.98


def test_columns_show_the_params_that_differ_and_the_timing_metrics(store, capsys):
    rows = table(store, capsys=capsys)
    cols = list(rows[0])
    assert cols == ["run_name", "model", "backend", "train.epochs", "train.lr",  # what differs first
                    "test_accuracy", "train_seconds", "train_images_per_second", "speedup_vs_single",
                    "status", "run_id"]  # seed, dataset.name (same everywhere), paths/overrides (noise) left out
    sync = next(r for r in rows if r["run_name"] == "cnn-sync")
    assert sync["train.lr"] == "0.001" and float(sync["speedup_vs_single"]) == 1.6


def test_a_column_only_for_metrics_some_run_has(store, capsys):
    rows = table(store, capsys=capsys, experiment="no-speedups")
    assert list(rows[0]) == ["run_name", "test_accuracy", "train_seconds", "status", "run_id"]  # nothing differs


def test_sort_by_another_metric_and_order(store, capsys):
    asc = [r["run_name"] for r in table(store, "--sort", "train_seconds", capsys=capsys)]  # seconds: fastest first
    assert asc == ["dense-single", "cnn-short", "cnn-sync", "cnn-single", "optuna-trial", "cnn-crashed"]
    desc = [r["run_name"] for r in table(store, "--sort", "metrics.train_seconds", "--order", "desc", capsys=capsys)]
    assert desc == ["cnn-single", "cnn-sync", "cnn-short", "dense-single", "optuna-trial", "cnn-crashed"]


def test_filter_limit_and_metric_columns(store, capsys):
    rows = table(store, "--filter", "params.model.name = 'small_cnn' and attributes.status = 'FINISHED'",
                 "--metrics", "test_macro_f1", "--limit", "2", capsys=capsys)
    assert [r["run_name"] for r in rows] == ["cnn-short", "cnn-single"]
    assert list(rows[0])[-4:] == ["test_accuracy", "test_macro_f1", "status", "run_id"]
    rows = table(store, "--filter", "tags.`medspark.backend` = 'elephas_sync'", capsys=capsys)
    assert [r["run_name"] for r in rows] == ["cnn-sync"]


def test_markdown_is_the_default_format(store, capsys):
    rc, out, err = run_compare(store, capsys=capsys)
    lines = out.splitlines()
    assert rc == 0 and "sorted by test_accuracy (descending)" in lines[0]
    assert "1 sweep parent run(s) left out (--all lists them)" in lines[0]
    assert lines[2].startswith("| run_name | model | backend | train.epochs | train.lr | test_accuracy |")
    assert lines[2].endswith("| status | run_id |")
    assert lines[3].startswith("| --- |") and lines[3].endswith("---: | --- | --- |")
    assert lines[4].startswith("| cnn-short | small_cnn | single | 5 | 0.0001 | 0.9800 |")
    assert lines[4].endswith(f"| FINISHED | {store['ids']['cnn-short'][:8]} |") and len(lines) == 4 + len(RUNS) + 1


def test_markdown_rounds_values_csv_keeps_them(store, capsys):
    rc, out, err = run_compare(store, "--filter", "attributes.run_name = 'optuna-trial'", capsys=capsys)
    row = out.splitlines()[-1]
    assert rc == 0 and "| 0.1235 |" in row and "0.0003162277660168379" not in row
    rows = table(store, "--filter", "attributes.run_name = 'optuna-trial'", capsys=capsys)
    assert rows[0]["test_accuracy"] == "0.123456789"


def test_sweep_parents_only_with_all(store, capsys):
    names = [r["run_name"] for r in table(store, "--all", capsys=capsys)]
    assert "sweep train.lr=1e-3,3e-4" in names and len(names) == len(RUNS) + 2
    rc, out, err = run_compare(store, "--filter", "tags.`medspark.sweep` = 'parent'", capsys=capsys)
    assert rc == 0 and "no runs" in out and "1 sweep parent run(s) left out: --all lists them" in out


def test_no_match_is_not_an_error(store, capsys):
    rc, out, err = run_compare(store, "--filter", "params.model.name = 'vgg'", capsys=capsys)
    assert rc == 0 and "no runs" in out and err == ""


@pytest.mark.parametrize("args, experiment, message", [
    ((), "medspark-nope", "no experiment 'medspark-nope' in sqlite:///"),
    (("--sort", "test_nope"), "medspark-synthetic", "no run in experiment 'medspark-synthetic' has metric 'test_nope'"),
    (("--metrics", "test_accuracy,nope"), "medspark-synthetic", "has metric 'nope'"),
    (("--filter", "params.model.name ~ 'x'"), "medspark-synthetic", "medspark compare: error: "),
    (("--limit", "0"), "medspark-synthetic", "--limit 0 must be >= 1"),
])
def test_errors_are_one_clear_line(store, capsys, args, experiment, message):
    rc, out, err = run_compare(store, *args, experiment=experiment, capsys=capsys)
    assert rc == 2 and out == ""
    assert err.startswith("medspark compare: error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    if "experiment 'medspark-nope'" in message:
        assert "experiments there:" in err and "medspark-synthetic" in err
    if "test_nope" in message:
        assert "test_accuracy" in err  # names what is there


def test_the_medspark_command_dispatches_to_compare(store):
    res = subprocess.run([sys.executable, "-m", "medspark", "compare", "--uri", store["uri"], "--experiment",
                          "medspark-synthetic", "--format", "csv", "--limit", "1"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[1].startswith("cnn-short,")
    assert res.stdout.splitlines()[1].endswith(store["ids"]["cnn-short"])


def test_defaults_come_from_the_project_config():
    if (project_root() / "conf" / "local" / "default.yaml").exists():
        pytest.skip("conf/local/default.yaml may override the tracking settings on this machine")
    assert compare.defaults() == {"uri": f"sqlite:///{project_root()}/mlruns.db", "experiment": "medspark-synthetic",
                                  "objective": "auto"}


# ---------------------------------------------------------------------------------------------------------
# --paired: two runs on the same test images (medspark.compare.paired, delong)

def predictions(tmp_path, name, y, p, classes, sha1=None, task=None):
    sha1 = [f"{i:040x}" for i in range(len(y))] if sha1 is None else sha1
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    return str(compare.write_predictions(tmp_path / name / "test_predictions.csv", sha1, y, p, classes, task))


def two_models(n=600, seed=0, gap=1.0):
    """Binary labels and two correlated models' softmax rows; A is better than B by `gap` of signal."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    shared = rng.normal(size=n)
    a = 1.5 * y + shared + 0.5 * rng.normal(size=n)
    b = (1.5 - gap) * y + shared + 0.5 * rng.normal(size=n)
    soft = lambda s: np.stack([1 / (1 + np.exp(s - 0.75)), 1 / (1 + np.exp(0.75 - s))], 1)  # noqa: E731
    return y, soft(a), soft(b), a, b


def test_predictions_file_round_trips_without_paths(tmp_path):
    y, pa, _, _, _ = two_models(20)
    path = predictions(tmp_path, "a", y, pa, ["NORMAL", "PNEUMONIA"])
    df = compare.read_predictions(str(tmp_path / "a"))  # a folder holding it works too
    assert list(df.columns) == ["sha1", "label", "prob_NORMAL", "prob_PNEUMONIA"]
    np.testing.assert_allclose(df[["prob_NORMAL", "prob_PNEUMONIA"]].to_numpy(), pa, rtol=1e-8)
    assert "path" not in open(path).read().splitlines()[0]


def test_delong_matches_sklearn_and_the_paired_bootstrap():
    from sklearn.metrics import roc_auc_score

    from medspark import uncertainty

    y, _, _, a, b = two_models(500, seed=1, gap=0.4)
    auc_a, auc_b, z, p = compare.delong(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a)) and auc_b == pytest.approx(roc_auc_score(y, b))
    diffs = np.concatenate([uncertainty.weighted_auc(y == 1, a, w) - uncertainty.weighted_auc(y == 1, b, w)
                            for w in uncertainty.resample_weights(np.arange(500), y, 3000, 0)])
    assert (auc_a - auc_b) / z == pytest.approx(diffs.std(), rel=0.1)  # DeLong's s.e. = the bootstrap's
    assert compare.delong(y, a, a)[2:] == (0.0, 1.0)


def test_delong_hand_example():
    """3 positives, 3 negatives: AUC A = 8/9 and B = 5/9 by counting pairs; DeLong's structural components counted
    by hand (not by ranks), z = (A - B) / sqrt(S_AA + S_BB - 2 S_AB) with S = cov(V10)/m + cov(V01)/n."""
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.4, 0.5, 0.3, 0.1])
    b = np.array([0.6, 0.2, 0.7, 0.5, 0.8, 0.1])
    auc_a, auc_b, z, _ = compare.delong(y, a, b)
    assert (auc_a, auc_b) == pytest.approx((8 / 9, 5 / 9))
    # structural components: per positive, share of negatives below; per negative, share of positives above
    v10 = np.array([[1, 1, 2 / 3], [2 / 3, 1 / 3, 2 / 3]])
    v01 = np.array([[2 / 3, 1, 1], [2 / 3, 0, 1]])
    s = np.cov(v10) / 3 + np.cov(v01) / 3
    assert z == pytest.approx((8 / 9 - 5 / 9) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1]))


def test_paired_says_beyond_chance_for_a_real_gap_and_within_for_none(tmp_path, capsys):
    y, pa, pb, _, _ = two_models(800, gap=1.0)
    a, b = predictions(tmp_path, "a", y, pa, ["no", "yes"]), predictions(tmp_path, "b", y, pb, ["no", "yes"])
    assert compare.main(["--paired", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    acc = [x for x in out if x.startswith("accuracy A - B")][0]
    diff = (pa.argmax(1) == y).mean() - (pb.argmax(1) == y).mean()
    assert acc.startswith(f"accuracy A - B = {diff:+.3f} [") and acc.endswith(": differs beyond chance"), acc
    assert "DeLong z = +" in out[-1] and out[-1].endswith("differs beyond chance")
    shuffled = predictions(tmp_path, "a2", y[::-1], pa[::-1], ["no", "yes"],
                           sha1=[f"{i:040x}" for i in range(800)][::-1])
    assert compare.main(["--paired", a, shuffled]) == 0  # same images in another order: joined on sha1
    out = capsys.readouterr().out
    assert "accuracy A - B = +0.000 [0.000, 0.000]: within chance" in out.replace(" (95%, 1000 paired resamples of 800 "
                                                                                  "images)", "")
    assert "DeLong z = +0.00, p = 1: within chance" in out


def test_paired_multiclass_and_multilabel(tmp_path, capsys):
    rng = np.random.default_rng(3)
    y = np.arange(300) % 3
    pa = rng.dirichlet(np.ones(3), 300)
    pb = rng.dirichlet(np.ones(3), 300)
    a, b = predictions(tmp_path, "a", y, pa, list("abc")), predictions(tmp_path, "b", y, pb, list("abc"))
    assert compare.main(["--paired", a, b, "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "(multiclass)" in out and "within chance" in out and "DeLong" not in out
    ym = (rng.random((300, 2)) < 0.3).astype(int)
    good, bad = np.clip(ym * 0.6 + rng.uniform(0, 0.4, (300, 2)), 0, 1), rng.random((300, 2))
    a = predictions(tmp_path, "ma", ym, good, ["Mass", "Nodule"], task="multilabel")
    b = predictions(tmp_path, "mb", ym, bad, ["Mass", "Nodule"], task="multilabel")
    assert compare.main(["--paired", a, b, "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "mean_auc A - B = +" in out and "differs beyond chance" in out


def test_paired_refuses_different_test_splits_in_one_line(tmp_path, capsys):
    y, pa, pb, _, _ = two_models(50)
    a = predictions(tmp_path, "a", y, pa, ["no", "yes"])
    other = predictions(tmp_path, "b", y, pb, ["no", "yes"], sha1=[f"{i + 3:040x}" for i in range(50)])
    assert compare.main(["--paired", a, other]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medspark compare: error: runs A and B were not evaluated on the same test split (3 test image(s) "
                   "only in A, 3 only in B): a paired comparison needs the same test images")
    relabeled = predictions(tmp_path, "c", 1 - y, pb, ["no", "yes"])
    assert compare.main(["--paired", a, relabeled]) == 2
    assert "label the same test images differently" in capsys.readouterr().err
    classes = predictions(tmp_path, "d", y, pb, ["NORMAL", "PNEUMONIA"])
    assert compare.main(["--paired", a, classes]) == 2
    assert "predict different classes" in capsys.readouterr().err


def test_paired_run_without_predictions_is_one_line(store, capsys):
    assert compare.main(["--uri", store["uri"], "--paired", store["ids"]["cnn-single"], store["ids"]["cnn-sync"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medspark compare: error: run {store['ids']['cnn-single']}: no "
                                               "evaluation/test_predictions.csv")
    assert compare.main(["--uri", store["uri"], "--paired", "0" * 32, store["ids"]["cnn-sync"]]) == 2
    assert capsys.readouterr().err.strip() == (f"medspark compare: error: run {'0' * 32}: no such run in "
                                               f"{store['uri']} (nor a test_predictions.csv path)")


# ---------------------------------------------------------------------------------------------------------
# end to end: two real tiny binary runs, their evaluation files, the shipped threshold and --paired on their ids

BINARY = ["dataset.classes=[glioma,notumor]", "dataset.generate.per_class=60", "dataset.generate.size=32",
          "preprocess.image_size=32", "model=dense", "train.batch_size=16", "tracking.register=never",
          "evaluate.bootstrap.resamples=300"]


@pytest.fixture(scope="module")
def two_runs(spark, tmp_path_factory):
    import mlflow

    from conftest import make_cfg
    from medspark.train import train

    tmp = tmp_path_factory.mktemp("paired")
    for extra in (["train.epochs=4"], ["train.epochs=1", "evaluate.operating_point=sensitivity:0.9"]):
        cfg = make_cfg(tmp, BINARY + extra)
        train(cfg, spark=spark)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                              order_by=["attributes.start_time ASC"])
    return {"uri": str(cfg.tracking.uri), "runs": runs}


@pytest.mark.slow
def test_a_binary_run_logs_intervals_operating_points_and_ships_its_threshold(two_runs):
    import mlflow
    import pandas as pd

    for run, rule in zip(two_runs["runs"], ("youden", "sensitivity:0.9")):
        rid, m = run.info.run_id, run.data.metrics
        files = {f.path for f in mlflow.MlflowClient().list_artifacts(rid, "evaluation")}
        assert {f"evaluation/{f}" for f in ("intervals.csv", "operating_points.csv", "test_predictions.csv")} <= files
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "sensitivity_notumor",
                    "op_sensitivity"):
            assert m[f"test_{key}_ci_low"] <= m.get(f"test_{key}", m[f"test_{key}_ci_low"]) <= m[f"test_{key}_ci_high"]
        assert {"test_op_specificity", "test_op_ppv", "test_op_npv", "test_sensitivity_at_spec_90",
                "test_sensitivity_at_spec_95"} <= set(m)
        ops = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=rid,
                                                              artifact_path="evaluation/operating_points.csv"))
        assert ops["class"].tolist() == ["notumor"] and ops["rule"].tolist() == [rule]
        if rule.startswith("sensitivity"):
            assert ops["val_sensitivity"][0] >= 0.9
        clf = mlflow.pyfunc.load_model(f"runs:/{rid}/classifier")
        from medspark.calibration import scale_thresholds  # chosen on the network's scale, shipped on the calibrated

        shipped = scale_thresholds({"notumor": ops["threshold"][0]}, m["temperature"], "binary", ["glioma", "notumor"])
        assert clf.metadata.metadata["medspark"]["thresholds"] == pytest.approx(shipped)
        assert shipped == pytest.approx({"notumor": ops["shipped_threshold"][0]})  # the CSV says what ships
        preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=rid,
                                                                artifact_path="evaluation/test_predictions.csv"))
        assert list(preds.columns) == ["sha1", "label", "prob_glioma", "prob_notumor"] and len(preds) == m["test_n"]


@pytest.mark.slow
def test_paired_compare_of_two_real_runs(two_runs, capsys):
    a, b = (r.info.run_id for r in two_runs["runs"])
    assert compare.main(["--uri", two_runs["uri"], "--paired", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    n = int(two_runs["runs"][0].data.metrics["test_n"])
    assert out[0] == f"A = {a}, B = {b}: {n} test images in common (binary)"
    assert out[2].startswith("accuracy A - B = ") and out[2].endswith(("differs beyond chance", "within chance"))
    assert out[3].startswith("roc_auc A = ") and "DeLong z = " in out[3]
