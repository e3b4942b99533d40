"""`mlflow run` on this checkout, as a user runs it: the MLproject entry points start the real pipeline, and
medspark records into the run `mlflow run` created (one run per `mlflow run`, not two).

Conda itself cannot be installed on these machines (no conda/mamba binary, and nothing may fetch one), hence
`--env-manager local`: the entry points run in this virtualenv. That conda.yaml carries exactly the tested pins
is checked by tests/test_packaging.py instead.
"""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO

TINY = ["backend=single", "dataset=synthetic", "dataset.generate.per_class=40", "dataset.generate.size=48",
        "preprocess.image_size=48", "train.epochs=2"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def mlflow_run(tmp: Path, entry: str, *args: str, project: str = ".",
               overrides: list[str] | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """`mlflow run <project> -e entry` from the repo root, store and outputs in tmp; MLflow's own env vars point at
    the same store (MLFLOW_TRACKING_URI, as a user sets it). `overrides`: instead of TINY and paths under tmp."""
    uri = f"sqlite:///{tmp}/mlruns.db"
    if overrides is None:
        overrides = TINY + [f"paths.work_dir={tmp}/work", f"tracking.artifact_location={tmp}/artifacts",
                            f"hydra.run.dir={tmp}/outputs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDSPARK_"))}
    # --env-manager local runs the entry point's `python` from PATH: this virtualenv's, as when it is activated
    env |= {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    res = subprocess.run([MLFLOW, "run", project, "-e", entry, "-P",
                          f"overrides={' '.join([*overrides, f'tracking.uri={uri}'])}", "--env-manager", "local",
                          *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    return res, uri


def make_experiment(uri: str, name: str, artifacts: Path) -> str:
    from medspark import tracking

    return tracking.configure(OmegaConf.create({"uri": uri, "experiment": name, "artifact_location": str(artifacts)}))


def all_runs(uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_mlproject_entry_points_and_parameters():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml" and (REPO / "conda.yaml").is_file()
    eps = spec["entry_points"]
    assert set(eps) >= {"main", "preprocess", "predict", "benchmark", "bench_preprocess", "bench_loader",
                        "bench_train_speed", "bench_time_to_accuracy"}
    assert set(eps["predict"]["parameters"]) == {"model", "input", "output"}
    assert eps["predict"]["command"].endswith("python -m medspark predict model={model} input={input} output={output}")
    for name, ep in eps.items():  # the project's own code and folder, whatever medspark the environment has
        assert ep["command"].startswith('export PYTHONPATH="$PWD/src:$PYTHONPATH" MEDSPARK_HOME="$PWD" && '), name
    assert set(eps["benchmark"]["parameters"]) == {"epochs", "backends", "per_class", "image_size", "save_results"}
    for name in ("benchmark", "bench_preprocess", "bench_loader", "bench_train_speed"):  # data size; results/ when asked
        assert eps[name]["parameters"]["save_results"]["default"] == "false" and "image_size" in eps[name]["parameters"]
        assert "--save-results {save_results}" in eps[name]["command"] and "{image_size}" in eps[name]["command"]
    assert "benchmarks/backends.py" in eps["benchmark"]["command"]
    for name in ("main", "preprocess"):
        assert set(eps[name]["parameters"]) == {"overrides"} and eps[name]["parameters"]["overrides"]["default"] == ""


@pytest.mark.slow
def test_mlflow_run_main_trains_into_the_run_mlflow_created(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    exp_id = make_experiment(uri, "medspark-synthetic", tmp_path / "artifacts")
    res, _ = mlflow_run(tmp_path, "main", "--experiment-name", "medspark-synthetic")
    runs = all_runs(uri)
    assert len(runs) == 1, "medspark must record into the run of `mlflow run`, not start a second one"
    run = runs[0]
    assert run.info.experiment_id == exp_id and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"  # written by `mlflow run`
    p, m = run.data.params, run.data.metrics  # written by medspark
    assert p["model.name"] == "small_cnn" and p["train.epochs"] == "2" and p["preprocess.image_size"] == "48"
    # the -P value, logged by `mlflow run` (shell-quoted: MLflow logs what it substitutes into the command)
    assert p["overrides"].strip("'").startswith("backend=single dataset=synthetic")
    assert "train.epochs=2" in p["hydra_overrides"] and f"tracking.uri={uri}" in p["hydra_overrides"]
    assert m["data_listed"] == 160 and m["epochs_run"] == 2 and 0 <= m["test_accuracy"] <= 1
    paths = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"summary.json", "data", "evaluation", "config"} <= paths
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    assert run.info.run_id in res.stdout


@pytest.mark.slow
def test_mlflow_run_preprocess_materializes_without_training(tmp_path):
    """Also the case of an experiment other than medspark's (MLflow's choice wins, no second run)."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    exp_id = make_experiment(uri, "data-prep", tmp_path / "prep-artifacts")
    res, _ = mlflow_run(tmp_path, "preprocess", "--experiment-id", exp_id)
    runs = all_runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.experiment_id == exp_id and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "preprocess"
    assert run.data.tags["medspark.stage"] == "preprocess"
    m = run.data.metrics
    assert m["data_listed"] == 160 and m["data_rejected"] == 0
    assert m["data_n_train"] + m["data_n_val"] + m["data_n_test"] == 160
    assert "train_seconds" not in m and "test_accuracy" not in m, "preprocess must not train"
    paths = {a.path for d in ("", "data") for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, d)}
    assert {"summary.json", "data/rejected.csv", "data/splits.json"} <= paths
    data_url = run.data.params["data_url"]
    assert data_url in res.stdout and "train/val/test" in res.stdout
    local = Path(data_url.removeprefix("file://"))
    assert local.is_relative_to(tmp_path) and all((local / s).is_dir() for s in ("train", "val", "test"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A `git clone` of this repository (its committed HEAD) with one more commit, a marker no other checkout has:
    the synthetic dataset's default size, 7 images per class."""
    dst = tmp_path_factory.mktemp("fetched") / "medspark-clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dst)], check=True, timeout=120)
    conf = dst / "conf" / "dataset" / "synthetic.yaml"
    text = conf.read_text()
    assert "  per_class: 300" in text
    conf.write_text(text.replace("  per_class: 300", "  per_class: 7"))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "marker"],
                   cwd=dst, check=True, timeout=60)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("as_uri", [False, True], ids=["folder", "file-uri"])
def test_mlflow_run_of_another_checkout_runs_its_code_and_writes_there(clone, tmp_path, as_uri):
    """`mlflow run <a clone> --env-manager local` runs the clone's code and config, and its data lands in the clone,
    although this virtualenv's medspark is another checkout (an editable install)."""
    project = clone.as_uri() if as_uri else str(clone)
    res, uri = mlflow_run(tmp_path, "preprocess", project=project,
                          overrides=["dataset.generate.size=32", "preprocess.image_size=32"])
    run, = all_runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "preprocess"
    assert run.data.tags["medspark.code"] == str(clone / "src" / "medspark")  # the clone's package ran
    assert run.data.params["paths.project_dir"] == str(clone)
    assert run.data.metrics["data_listed"] == 4 * 7  # the clone's own default (conf/dataset/synthetic.yaml)
    assert run.data.params["data_url"].startswith((clone / ".medspark").as_uri())  # its data, in the clone
