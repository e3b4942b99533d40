"""The registry champion: `models:/<name>@champion` moves to a new version only when its run beats the champion's
run on the objective, every decision is recorded on the run, and the champion loads by alias as a pyfunc and as
a Keras model. Unit tests against a real MLflow sqlite store; one slow test with two real trainings."""
import json
import math
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from medspark import registry, tracking
from medspark.config import ConfigError


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlruns.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.tmp, c.exp = tmp, c.create_experiment("registry-tests", artifact_location=(tmp / "artifacts").as_uri())
    return c


def version(client, name, metrics: dict):
    """A finished run with `metrics` and a registered version of `name` pointing at it: (run_id, version)."""
    run = client.create_run(client.exp)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    return run.info.run_id, str(mv.version)


def champion(client, name, alias="champion"):
    held = client.get_registered_model(name).aliases.get(alias)
    return None if held is None else str(held)


def test_the_first_version_becomes_champion_and_the_decision_is_tagged(client):
    run_id, v = version(client, "first", {"test_accuracy": 0.5})
    d = registry.promote_if_better(client, "first", v, run_id, "test_accuracy", 0.5, "max")
    assert d["decision"] == "promoted" and d["reason"] == "no champion yet" and d["previous_version"] is None
    assert champion(client, "first") == v == "1"
    tags = client.get_run(run_id).data.tags
    assert tags["medspark.champion"] == "promoted"
    assert tags["medspark.champion.previous_version"] == "none" and tags["medspark.champion.value"] == "0.5"
    assert tags["medspark.champion.metric"] == "test_accuracy" and tags["medspark.champion.champion_version"] == "1"


def test_a_better_run_takes_the_alias_a_worse_or_equal_one_does_not(client):
    name = "ladder"
    r1, v1 = version(client, name, {"test_accuracy": 0.80})
    registry.promote_if_better(client, name, v1, r1, "test_accuracy", 0.80, "max")

    r2, v2 = version(client, name, {"test_accuracy": 0.90})
    d = registry.promote_if_better(client, name, v2, r2, "test_accuracy", 0.90, "max")
    assert d["decision"] == "promoted" and champion(client, name) == v2 == "2"
    assert d["previous_version"] == "1" and d["previous_value"] == pytest.approx(0.80) and d["previous_run_id"] == r1
    tags = client.get_run(r2).data.tags
    assert tags["medspark.champion"] == "promoted" and tags["medspark.champion.previous_version"] == "1"
    assert float(tags["medspark.champion.previous_value"]) == pytest.approx(0.80)
    assert "0.9 > 0.8 of version 1" in tags["medspark.champion.reason"]

    r3, v3 = version(client, name, {"test_accuracy": 0.70})
    d = registry.promote_if_better(client, name, v3, r3, "test_accuracy", 0.70, "max")
    assert d["decision"] == "kept" and d["champion_version"] == "2" and champion(client, name) == "2"
    tags = client.get_run(r3).data.tags
    assert tags["medspark.champion"] == "kept" and tags["medspark.champion.champion_version"] == "2"
    assert float(tags["medspark.champion.previous_value"]) == pytest.approx(0.90)

    r4, v4 = version(client, name, {"test_accuracy": 0.90})  # a tie keeps the current champion
    d = registry.promote_if_better(client, name, v4, r4, "test_accuracy", 0.90, "max")
    assert d["decision"] == "kept" and champion(client, name) == "2"
    assert "<=" in d["reason"]


def test_min_mode_prefers_the_lower_value(client):
    name = "losses"
    r1, v1 = version(client, name, {"test_log_loss": 0.40})
    registry.promote_if_better(client, name, v1, r1, "test_log_loss", 0.40, "min")
    r2, v2 = version(client, name, {"test_log_loss": 0.55})
    assert registry.promote_if_better(client, name, v2, r2, "test_log_loss", 0.55, "min")["decision"] == "kept"
    r3, v3 = version(client, name, {"test_log_loss": 0.20})
    assert registry.promote_if_better(client, name, v3, r3, "test_log_loss", 0.20, "min")["decision"] == "promoted"
    assert champion(client, name) == "3"


def test_a_run_without_the_metric_never_wins_a_champion_without_it_always_loses(client):
    name = "gaps"
    r1, v1 = version(client, name, {"test_macro_f1": 0.9})  # the champion's run has no test_accuracy
    registry.promote_if_better(client, name, v1, r1, "test_macro_f1", 0.9, "max")
    r2, v2 = version(client, name, {})
    d = registry.promote_if_better(client, name, v2, r2, "test_accuracy", float("nan"), "max")
    assert d["decision"] == "kept" and "no finite test_accuracy" in d["reason"] and champion(client, name) == "1"
    r3, v3 = version(client, name, {"test_accuracy": 0.3})
    d = registry.promote_if_better(client, name, v3, r3, "test_accuracy", 0.3, "max")
    assert d["decision"] == "promoted" and "has no test_accuracy" in d["reason"] and champion(client, name) == "3"


def test_a_custom_alias_and_a_bad_mode(client):
    r1, v1 = version(client, "aliases", {"test_accuracy": 0.5})
    d = registry.promote_if_better(client, "aliases", v1, r1, "test_accuracy", 0.5, "max", alias="prod")
    assert d["champion_uri"] == "models:/aliases@prod" and champion(client, "aliases", "prod") == "1"
    assert champion(client, "aliases") is None
    with pytest.raises(ValueError, match="champion_mode"):
        registry.promote_if_better(client, "aliases", v1, r1, "test_accuracy", 0.5, "best")


def test_promote_is_skipped_when_disabled_or_not_registered(client):
    class Info:
        run_id, registered_model_version = "x", None

    cfg = OmegaConf.create({"champion_alias": None, "registered_model": "m", "champion_mode": "max"})
    assert registry.promote(cfg, Info(), "test_accuracy", 1.0) == {"decision": "skipped",
                                                                  "reason": "tracking.champion_alias is null"}
    cfg.champion_alias = "champion"
    assert registry.promote(cfg, Info(), "test_accuracy", 1.0)["reason"] == "the model was not registered"


def test_configure_rejects_a_bad_mode_and_chooses_artifact_roots(tmp_path):
    cfg = OmegaConf.create({"uri": f"sqlite:///{tmp_path}/m.db", "experiment": "x", "champion_mode": "highest"})
    with pytest.raises(ConfigError, match="tracking.champion_mode=highest"):
        tracking.configure(cfg)
    assert tracking.artifact_location(f"sqlite:///{tmp_path}/m.db", None) == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", None) is None  # the server decides (proxied)
    assert tracking.artifact_location("https://mlflow.example.org", None) is None
    assert tracking.artifact_location("http://h:5000", "s3://bucket/medspark") == "s3://bucket/medspark"
    assert tracking.artifact_location("http://h:5000", str(tmp_path / "a")) == (tmp_path / "a").as_uri()


# ---------------------------------------------------------------------------------------------------------
# two real trainings: the first becomes champion, a deliberately worse second one does not

SMALL = ["dataset.generate.per_class=60", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.batch_size=16", "cluster.cores=2"]


def train_cli(tmp, *overrides, timeout=900):
    res = subprocess.run([sys.executable, "-m", "medspark.train", *SMALL, f"paths.work_dir={tmp}/work",
                          f"tracking.uri=sqlite:///{tmp}/mlruns.db", f"hydra.run.dir={tmp}/hydra", *overrides],
                         cwd=tmp, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run 1 learns: 12 epochs, early stopping (patience 6) restores the best epoch; BN makes validation jumpy on
    240 images, so fewer epochs or patience can end at chance. Run 2 cannot: 1 epoch at lr 1e-6 (chance, 0.25).
    Same data (run 2 reuses it), same store."""
    tmp = tmp_path_factory.mktemp("two_runs")
    first = train_cli(tmp, "train.epochs=12", "train.early_stopping.patience=6")
    second = train_cli(tmp, "train.epochs=1", "train.lr=1e-6")
    uri = f"sqlite:///{tmp}/mlruns.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("medspark-synthetic")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    return {"tmp": tmp, "uri": uri, "client": client, "runs": runs, "stdout": [first.stdout, second.stdout]}


@pytest.mark.slow
def test_the_better_run_stays_champion_and_loads_by_alias(two_runs):
    client, (r1, r2) = two_runs["client"], two_runs["runs"]
    a1, a2 = r1.data.metrics["test_accuracy"], r2.data.metrics["test_accuracy"]
    assert a1 > a2, f"the 12-epoch run ({a1}) must beat the 1-epoch lr=1e-6 run ({a2})"
    v = {mv.run_id: str(mv.version) for mv in client.search_model_versions("name = 'medspark-synthetic'")}
    assert v == {r1.info.run_id: "1", r2.info.run_id: "2"}
    assert champion(client, "medspark-synthetic") == "1"

    t1, t2 = r1.data.tags, client.get_run(r2.info.run_id).data.tags
    assert t1["medspark.champion"] == "promoted" and t1["medspark.champion.previous_version"] == "none"
    assert t2["medspark.champion"] == "kept" and t2["medspark.champion.previous_version"] == "1"
    assert float(t2["medspark.champion.previous_value"]) == pytest.approx(a1)
    assert float(t2["medspark.champion.value"]) == pytest.approx(a2)

    out = two_runs["stdout"][1]
    assert '"decision": "kept"' in out and '"champion_version": "1"' in out  # printed in the run summary
    mlflow.set_tracking_uri(two_runs["uri"])  # this store for load_text and models:/ (the registry follows it)
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{r2.info.run_id}/summary.json"))
    assert summary["champion"]["decision"] == "kept" and summary["champion"]["previous_version"] == "1"

    from medspark.data.loader import read_arrays

    images, labels = read_arrays(f"{r1.data.params['data_url']}/test")
    images = images.astype("float32")
    keras_model = mlflow.tensorflow.load_model("models:/medspark-synthetic@champion")
    pyfunc = mlflow.pyfunc.load_model("models:/medspark-synthetic@champion")
    k_probs = keras_model.predict(images, verbose=0)
    p_probs = np.asarray(pyfunc.predict(images))
    assert k_probs.shape == (len(labels), 4)
    np.testing.assert_allclose(k_probs, p_probs, rtol=1e-5, atol=1e-6)
    assert float((k_probs.argmax(1) == labels).mean()) == pytest.approx(a1, abs=1e-9), "the champion is run 1's model"


@pytest.mark.slow
def test_two_runs_log_the_same_param_and_metric_keys(two_runs):
    """The same-keys promise behind `medspark compare`: runs of one config shape are comparable column by column."""
    r1, r2 = two_runs["runs"]
    assert set(r1.data.params) == set(r2.data.params)
    only1, only2 = set(r1.data.metrics) - set(r2.data.metrics), set(r2.data.metrics) - set(r1.data.metrics)
    assert not only1 and not only2, f"metrics only in run 1: {sorted(only1)}; only in run 2: {sorted(only2)}"
    assert all(not math.isnan(r1.data.metrics[k]) for k in ("test_accuracy", "train_seconds"))
