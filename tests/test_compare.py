"""`medspark compare`: an experiment's runs as one table, best first, from runs shaped like medspark's (same
param and metric keys), in a temporary sqlite store."""
import csv
import io
import subprocess
import sys

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
