"""Sweeps: one parent MLflow run per `medspark -m ...`, every job a child run, a summary on the parent; and how
tracking.run() joins a run it is handed (`mlflow run`'s MLFLOW_RUN_ID, a sweep's MEDSPARK_PARENT_RUN_ID)."""
import os
import subprocess
import sys
from contextlib import nullcontext

import mlflow
import pytest
from omegaconf import OmegaConf

from medspark import tracking
from medspark.config import ConfigError, compose_project_config
from medspark.sweep import MlflowSweep, direction, swept_overrides
from conftest import REPO

TINY = ["dataset.generate.per_class=40", "dataset.generate.size=48", "preprocess.image_size=48", "train.epochs=2"]


def hydra_cfg(tmp_path, *overrides):
    """The config as a sweep's callbacks see it (with the hydra node), pointed at tmp_path."""
    return compose_project_config([f"paths.work_dir={tmp_path}/work", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
                                   f"tracking.artifact_location={tmp_path}/artifacts", *overrides],
                                  return_hydra_config=True)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", tracking.PARENT_RUN_ENV):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def configure(tmp_path, experiment="medspark-synthetic"):
    return tracking.configure(OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlruns.db", "experiment": experiment,
                                                "artifact_location": str(tmp_path / "artifacts")}))


def test_sweep_config_options_compose(tmp_path):
    cfg = hydra_cfg(tmp_path, "hydra/launcher=parallel")
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "medspark.sweep.MlflowSweep"
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    cfg = hydra_cfg(tmp_path, "hparams_search=lr_dropout")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.storage is None
    assert set(cfg.hydra.sweeper.params) == {"train.lr", "model.dropout"} and direction(cfg) == "maximize"
    assert swept_overrides(cfg) == ["train.lr=tag(log, interval(1e-4, 3e-3))", "model.dropout=interval(0.0, 0.5)"]
    assert direction(hydra_cfg(tmp_path, "train.objective=test_log_loss", "tracking.champion_mode=min")) == "minimize"


def test_run_launched_by_mlflow_run_is_that_run_in_its_experiment(tmp_path, clean_env):
    other = configure(tmp_path, "chosen-by-mlflow-run")
    launched = mlflow.MlflowClient().create_run(other, tags={"mlflow.project.entryPoint": "main"})
    mlflow.MlflowClient().log_param(launched.info.run_id, "overrides", "train.epochs=2")
    clean_env.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    configure(tmp_path)  # medspark's own experiment is active, as in train()
    with tracking.run("small_cnn-single", {"medspark.model": "small_cnn"}) as run:
        tracking.log_config(OmegaConf.create({"train": {"epochs": 2}}), ["train.epochs=2", "tracking.uri=x"])
    assert run.info.run_id == launched.info.run_id
    got = mlflow.get_run(run.info.run_id)
    assert got.info.experiment_id == other and got.info.status == "FINISHED"
    assert got.data.tags["medspark.model"] == "small_cnn" and got.info.run_name == "small_cnn-single"
    assert got.data.params["overrides"] == "train.epochs=2"  # kept: MLflow params cannot change
    assert got.data.params["hydra_overrides"] == "train.epochs=2 tracking.uri=x"
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1


def test_run_in_a_sweep_is_a_child_in_the_parents_experiment(tmp_path, clean_env):
    sweeps = configure(tmp_path, "sweeps")
    parent = mlflow.MlflowClient().create_run(sweeps)
    clean_env.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
    configure(tmp_path)
    with tracking.run("child", {}) as run:
        pass
    got = mlflow.get_run(run.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.info.experiment_id == parent.info.experiment_id


def test_a_run_id_from_another_store_fails_with_one_line(tmp_path, clean_env):
    clean_env.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    configure(tmp_path)
    with pytest.raises(ConfigError, match="not in tracking.uri=sqlite:///.*MLFLOW_TRACKING_URI"):
        with tracking.run("x", {}):
            pass


def test_a_sweep_that_stops_early_still_gets_its_summary_and_fails(tmp_path, clean_env):
    """The callback's hooks driven by hand: a finished and a failed job, then the exit hook (the basic sweeper
    re-raises a failed job, so on_multirun_end never comes)."""
    cfg = hydra_cfg(tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.overrides.task.append("train.lr=1e-3,3e-4")  # the sweep's command line (compose cannot sweep)
    cb = MlflowSweep()
    cb.on_multirun_start(cfg)
    parent = cb.parent_id
    for lr, fail in (("0.001", False), ("0.0003", True)):
        configure(tmp_path)
        with pytest.raises(RuntimeError) if fail else nullcontext():
            with tracking.run(f"job-{lr}", {"medspark.overrides": f"train.lr={lr} train.epochs=2"}):
                mlflow.log_metrics({"test_accuracy": 0.75, "train_seconds": 3.0})
                if fail:
                    raise RuntimeError("boom")
    cb._on_exit()
    cb._on_exit()  # idempotent: the summary is written once
    run = mlflow.get_run(parent)
    assert run.info.status == "FAILED" and run.data.metrics["sweep_jobs"] == 2
    assert run.data.metrics["sweep_jobs_failed"] == 1 and run.data.metrics["best_test_accuracy"] == 0.75
    md = mlflow.artifacts.load_text(f"runs:/{parent}/sweep_summary.md")
    assert "`train.lr=0.001`" in md and "`train.lr=0.0003`" in md and "FAILED" in md and "**0.7500**" in md
    assert run.data.params["sweep_params"] == "train.lr=1e-3,3e-4" and run.info.run_name == "sweep train.lr=1e-3,3e-4"
    assert tracking.PARENT_RUN_ENV not in os.environ
    assert run.data.tags["medspark.registration"] == "not registered: the sweep did not finish (FAILED): nothing " \
                                                     "registered"
    assert not mlflow.MlflowClient().search_registered_models()


def test_a_finished_sweep_registers_its_best_job_once_and_offers_it_to_the_champion(tmp_path, clean_env):
    """tracking.register=auto: the jobs register nothing (registry.not_registering); on_multirun_end registers the
    best job's two logged models, under the name and data definition the job recorded, and moves the alias on both."""
    from medspark import registry

    cfg = hydra_cfg(tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.overrides.task.append("train.lr=1e-3,3e-4")
    cb = MlflowSweep()
    cb.on_multirun_start(cfg)
    jobs = {}
    for lr, accuracy in (("0.001", 0.6), ("0.0003", 0.8)):
        configure(tmp_path)
        with tracking.run(f"job-{lr}", {"medspark.overrides": f"train.lr={lr}"}) as run:
            mlflow.log_metrics({"test_accuracy": accuracy, "train_seconds": 3.0})
            registry.record_definition({"key": "f" * 16, "fingerprint": "fp", "classes": "a,b,c,d",
                                        "task": "multiclass", "input_shape": "48x48x1", "test_n": "24"},
                                       "medspark-synthetic")
            for name in ("model", "classifier"):  # the two logged models a job has (their files are not needed)
                mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id)
        jobs[lr] = run.info.run_id
    cb.on_multirun_end(cfg)
    client = mlflow.MlflowClient()
    for name in ("medspark-synthetic", "medspark-synthetic-classifier"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert [(v.version, v.run_id) for v in versions] == [(1, jobs["0.0003"])], "the best job, once"
        assert client.get_model_version_by_alias(name, "champion").run_id == jobs["0.0003"]
        assert versions[0].tags["medspark.data_definition"] == "f" * 16
    parent = client.get_run(cb.parent_id).data.tags
    assert parent["medspark.registration"] == "models:/medspark-synthetic/1"
    assert parent["medspark.champion"] == "promoted"
    best = client.get_run(jobs["0.0003"]).data.tags
    assert best["medspark.registration"] == "models:/medspark-synthetic/1" and best["medspark.champion"] == "promoted"
    assert "medspark.registration" not in client.get_run(jobs["0.001"]).data.tags


def sweep(tmp_path, *launcher):
    """A real 2-job sweep through the entrypoint; returns (parent, children, stdout)."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != tracking.PARENT_RUN_ENV}
    res = subprocess.run([sys.executable, "-m", "medspark.train", "-m", *launcher, "train.lr=1e-3,3e-4", *TINY,
                          f"paths.work_dir={tmp_path}/work", f"tracking.uri={uri}",
                          f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/multirun"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("medspark.sweep") == "parent"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.0003", "0.001"]
    assert sorted(c.data.tags["medspark.job"] for c in children) == ["0", "1"]
    # named by what the sweep varies (tracking.run_name), not by the overrides every job shares
    assert sorted(c.info.run_name for c in children) == ["small_cnn-single-lr0.0003", "small_cnn-single-lr0.001"]
    assert parent.info.status == "FINISHED" and parent.info.run_id in res.stdout
    return parent, children, res.stdout


@pytest.mark.slow
def test_basic_sweep_is_one_parent_with_finished_children_and_a_summary(tmp_path):
    parent, children, _ = sweep(tmp_path)
    m = parent.data.metrics
    assert m["sweep_jobs"] == 2 and m["sweep_jobs_finished"] == 2
    assert m["best_test_accuracy"] == max(c.data.metrics["test_accuracy"] for c in children)
    paths = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.md", "sweep_summary.png", "sweep_summary.json"} <= paths
    md = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/sweep_summary.md")
    assert "`train.lr=0.001`" in md and "`train.lr=0.0003`" in md and md.count("FINISHED") == 2
    assert "| job | overrides | test_accuracy | train_seconds |" in md
    assert parent.data.params["launcher"] == "BasicLauncher"


@pytest.mark.slow
def test_parallel_sweep_runs_jobs_in_processes_and_writes_the_data_once(tmp_path):
    """hydra/launcher=parallel (joblib, 2 at a time): same parent/children, and the two jobs that need the
    same new Petastorm dataset do not race for it: one writes it, the other waits and reuses it."""
    parent, children, _ = sweep(tmp_path, "hydra/launcher=parallel", "cluster.cores=1")
    assert parent.data.params["launcher"] == "JoblibLauncher" and parent.data.params["n_jobs"] == "2"
    assert sorted(c.data.metrics["data_reused"] for c in children) == [0.0, 1.0]
    assert parent.data.metrics["sweep_jobs_finished"] == 2
