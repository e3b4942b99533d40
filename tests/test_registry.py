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
        run_id, registered_model_name, registered_model_version = "x", None, None
        registration = "not registered: a sweep job: the sweep registers its best job when it ends"

    cfg = OmegaConf.create({"champion_alias": None, "registered_model": "m", "champion_mode": "max"})
    assert registry.promote(cfg, (Info(), Info()), "test_accuracy", 1.0) == {
        "decision": "skipped", "reason": "tracking.champion_alias is null"}
    cfg.champion_alias = "champion"
    assert registry.promote(cfg, (Info(), Info()), "test_accuracy", 1.0)["reason"].startswith("a sweep job")


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
# data definitions: one champion per definition, on both models, with tagged and described versions

TRACKING = {"champion_alias": "champion", "champion_mode": "max"}


def definition(key: str, shape="32x32x1", classes="a,b") -> dict:
    return {"key": key, "fingerprint": f"fp-{key}", "classes": classes, "task": "binary", "input_shape": shape,
            "test_n": "12"}


def registered_run(client, base, defn: dict, accuracy: float) -> tuple[str, dict]:
    """A finished run with test_accuracy and two logged models (records only: registering needs no files),
    registered by registry.register: (run_id, versions)."""
    mlflow.set_tracking_uri(client.tracking_uri)  # this store (and registry) for mlflow.register_model
    run_id = client.create_run(client.exp).info.run_id
    client.log_metric(run_id, "test_accuracy", accuracy)
    sources = {name: mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=client.exp).model_uri
               for name in ("model", "classifier")}
    client.set_terminated(run_id)
    return run_id, registry.register(client, run_id, base, defn, sources)


def test_the_alias_moves_on_both_models_and_versions_carry_what_they_were_tested_on(client):
    r1, g1 = registered_run(client, "both", definition("1" * 16), 0.6)
    assert g1 == {"name": "both", "version": "1", "classifier_name": "both-classifier", "classifier_version": "1"}
    d = registry.promote_registered(client, TRACKING, r1, g1, definition("1" * 16), "test_accuracy", 0.6)
    assert d["decision"] == "promoted" and d["classifier_champion_uri"] == "models:/both-classifier@champion"
    r2, g2 = registered_run(client, "both", definition("1" * 16), 0.8)
    d = registry.promote_registered(client, TRACKING, r2, g2, definition("1" * 16), "test_accuracy", 0.8)
    assert d["decision"] == "promoted" and champion(client, "both") == champion(client, "both-classifier") == "2"
    assert client.get_model_version_by_alias("both-classifier", "champion").run_id == r2
    r3, g3 = registered_run(client, "both", definition("1" * 16), 0.7)
    registry.promote_registered(client, TRACKING, r3, g3, definition("1" * 16), "test_accuracy", 0.7)
    assert champion(client, "both") == champion(client, "both-classifier") == "2", "a worse run moves neither"

    for name, kind in (("both", "keras"), ("both-classifier", "classifier")):
        mv = client.get_model_version(name, "2")
        assert mv.tags.items() >= {"medspark.objective": "test_accuracy", "medspark.objective_value": "0.8",
                                "medspark.data_definition": "1" * 16, "medspark.data_fingerprint": "fp-" + "1" * 16,
                                "medspark.classes": "a,b", "medspark.task": "binary",
                                "medspark.input_shape": "32x32x1", "medspark.run_id": r2,
                                    "medspark.model_kind": kind}.items()
        assert f"of run {r2}: test_accuracy = 0.8 on the test split of data definition {'1' * 16}" in mv.description
    assert client.get_registered_model("both").tags["medspark.data_definition"] == "1" * 16
    r4, g4 = registered_run(client, "both", definition("1" * 16), 0.9)  # champion_alias null: described, no alias
    d = registry.promote_registered(client, {"champion_alias": None}, r4, g4, definition("1" * 16), "test_accuracy",
                                    0.9)
    assert d == {"decision": "skipped", "reason": "tracking.champion_alias is null"} and champion(client, "both") == "2"
    assert client.get_model_version("both", g4["version"]).tags["medspark.objective_value"] == "0.9"


def test_another_data_definition_registers_under_its_own_name_with_its_own_champion(client, caplog):
    small, large = definition("a" * 16, "32x32x1"), definition("b" * 16, "64x64x1")
    r1, g1 = registered_run(client, "defs", small, 0.5)
    registry.promote_registered(client, TRACKING, r1, g1, small, "test_accuracy", 0.5)
    with caplog.at_level("WARNING", logger="medspark.registry"):
        r2, g2 = registered_run(client, "defs", large, 0.99)  # far better, but on other data: not comparable
    assert g2["name"] == "defs-bbbbbbbb" and g2["classifier_name"] == "defs-bbbbbbbb-classifier"
    assert "registered as defs-bbbbbbbb, which has its own champion" in caplog.text
    d = registry.promote_registered(client, TRACKING, r2, g2, large, "test_accuracy", 0.99)
    assert d["decision"] == "promoted" and d["reason"] == "no champion yet"
    assert champion(client, "defs") == "1" and champion(client, "defs-bbbbbbbb") == "1"
    r3, g3 = registered_run(client, "defs", small, 0.4)  # the first definition keeps the name
    assert g3["name"] == "defs" and g3["version"] == "2"


def test_a_champion_on_another_definition_is_never_compared_one_without_is_replaced(client):
    """The registry's own guard (a name someone tagged by hand, or filled before definitions were recorded)."""
    r1, v1 = version(client, "guard", {"test_accuracy": 0.5})
    registry.promote_if_better(client, "guard", v1, r1, "test_accuracy", 0.5)  # a version without a definition
    r2, v2 = version(client, "guard", {"test_accuracy": 0.1})
    client.set_model_version_tag("guard", v2, "medspark.data_definition", "c" * 16)
    d = registry.promote_if_better(client, "guard", v2, r2, "test_accuracy", 0.1, definition="c" * 16)
    assert d["decision"] == "promoted" and "records no data definition" in d["reason"]
    r3, v3 = version(client, "guard", {"test_accuracy": 0.9})
    client.set_model_version_tag("guard", v3, "medspark.data_definition", "d" * 16)
    d = registry.promote_if_better(client, "guard", v3, r3, "test_accuracy", 0.9, definition="d" * 16)
    assert d["decision"] == "kept" and "not comparable" in d["reason"] and champion(client, "guard") == v2


def test_the_data_definition_is_the_test_split_classes_task_and_shape_not_paths_or_times(spark, tmp_path):
    """The same images copied elsewhere (new paths and file times: a new fingerprint, a new Petastorm folder) are
    the same definition; another input shape or another test split is not."""
    import shutil

    from PIL import Image

    from medspark.data import materialize as mat
    from medspark.data.preprocess import PreprocessConfig
    from medspark.data.sources.class_folders import ClassFolders

    rng = np.random.default_rng(0)
    for cls in ("no", "yes"):
        (tmp_path / "a" / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / "a" / cls / f"{i}.png")
    shutil.copytree(tmp_path / "a", tmp_path / "copy" / "b")

    def defn(root, size=16, seed=0):
        listing = ClassFolders(str(root)).list()
        data = mat.materialize(spark, listing, PreprocessConfig(image_size=size, channels=1),
                               {"val": 0.2, "test": 0.3, "seed": seed}, str(tmp_path / "data"), "def")
        return registry.data_definition(data)

    first, copy = defn(tmp_path / "a"), defn(tmp_path / "copy" / "b")
    assert first["fingerprint"] != copy["fingerprint"] and first["key"] == copy["key"]
    assert first | {"key": "", "fingerprint": ""} == {"key": "", "fingerprint": "", "classes": "no,yes",
                                                      "task": "binary", "input_shape": "16x16x1", "test_n": "8"}
    assert defn(tmp_path / "a", size=20)["key"] != first["key"]
    assert defn(tmp_path / "a", seed=1)["key"] != first["key"]


@pytest.fixture
def no_parent(monkeypatch):
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return monkeypatch


def test_registration_is_deliberate(tmp_path, no_parent):
    from hydra.core.hydra_config import HydraConfig

    from medspark.config import compose_project_config

    auto = OmegaConf.create({"registered_model": "m", "register": "auto"})
    assert registry.not_registering(auto) is None  # a stand-alone run registers
    assert registry.not_registering(OmegaConf.create({"registered_model": "m", "register": "never"})) == \
        "tracking.register=never"
    assert registry.not_registering(OmegaConf.create({"registered_model": None})) == "tracking.registered_model is null"
    no_parent.setenv(tracking.PARENT_RUN_ENV, "0123abcd")  # a benchmark's (or a sweep's) child run
    assert "a child of run 0123abcd" in registry.not_registering(auto)
    no_parent.delenv(tracking.PARENT_RUN_ENV)
    cfg = compose_project_config([f"paths.work_dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.mode = "MULTIRUN"  # what a job of `medspark -m ...` sees, with any launcher
    HydraConfig.instance().set_config(cfg)
    try:
        assert registry.not_registering(auto).startswith("a sweep job: the sweep registers its best job")
        assert registry.not_registering(OmegaConf.create({"registered_model": "m", "register": "always"})) is None
    finally:
        HydraConfig.instance().cfg = None
    with pytest.raises(ConfigError, match=r"tracking.register=sometimes must be one of auto \| always \| never"):
        tracking.configure(OmegaConf.create({"uri": f"sqlite:///{tmp_path}/m.db", "experiment": "x",
                                             "register": "sometimes"}))


def test_image_folder_datasets_are_named_after_their_root(tmp_path):
    from medspark.config import compose_project_config

    def name(*overrides):
        return registry.base_name(compose_project_config([f"paths.work_dir={tmp_path}", *overrides]))

    assert name("dataset=image_folder", "dataset.root=/data/Brain Tumor MRI/") == \
        "medspark-image_folder-brain-tumor-mri"
    assert name("dataset=image_folder", "dataset.root=/data/yes_no") == "medspark-image_folder-yes-no"
    assert name("dataset=image_folder", "dataset.root=/d/x", "tracking.registered_model=tumours") == "tumours"
    assert name() == "medspark-synthetic" and name("tracking.registered_model=null") is None


def test_predict_takes_the_keras_models_alias_for_the_classifier_of_the_same_run(client, capsys):
    from medspark import predict

    r1, g1 = registered_run(client, "served", definition("e" * 16), 0.7)
    registry.promote_registered(client, TRACKING, r1, g1, definition("e" * 16), "test_accuracy", 0.7)
    r2, g2 = registered_run(client, "served", definition("e" * 16), 0.6)  # not champion
    assert predict.classifier_uri("models:/served@champion") == "models:/served-classifier@champion"
    assert "is the Keras model" in capsys.readouterr().out
    assert predict.classifier_uri("models:/served/2") == "models:/served-classifier/2"
    other = client.create_run(client.exp).info.run_id  # a classifier version of its own: the numbers now differ
    client.create_model_version("served-classifier", "file:///nowhere", run_id=other)
    r3, g3 = registered_run(client, "served", definition("e" * 16), 0.5)
    assert (g3["version"], g3["classifier_version"]) == ("3", "4")
    assert predict.classifier_uri("models:/served/3") == "models:/served-classifier/4"  # found by run, not number
    for uri in ("models:/served-classifier/2", "models:/served-classifier@champion", "runs:/x/classifier",
                "models:/nothing@champion", "models:/served@nope"):
        assert predict.classifier_uri(uri) == uri  # a classifier, a run, or something MLflow will report


# ---------------------------------------------------------------------------------------------------------
# two real trainings: the first becomes champion, a deliberately worse second one does not

SMALL = ["dataset.generate.per_class=60", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.batch_size=16", "cluster.cores=2"]


def train_cli(tmp, *overrides, timeout=900, multirun=False):
    res = subprocess.run([sys.executable, "-m", "medspark.train", *(["-m"] if multirun else []), *SMALL, f"paths.work_dir={tmp}/work",
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
    line = next(x for x in out.splitlines() if x.startswith("champion:"))  # the run's closing block
    assert line.split()[1] == "kept:" and "@champion is version 1" in line, line
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


@pytest.fixture(scope="module")
def more_runs(two_runs):
    """In the same store, after the two runs: a 2-job sweep on the same data (1 epoch, lr 1e-6 and 1e-5: worse
    than run 1), then one run on other data (32 px: another input shape, so another data definition)."""
    tmp = two_runs["tmp"]
    sweep = train_cli(tmp, "train.epochs=1", "train.lr=1e-6,1e-5", f"hydra.sweep.dir={tmp}/multirun", multirun=True)
    small = train_cli(tmp, "train.epochs=1", "preprocess.image_size=32")
    client = two_runs["client"]
    runs = sorted(client.search_runs([client.get_experiment_by_name("medspark-synthetic").experiment_id]),
                  key=lambda r: r.info.start_time)
    return two_runs | {"all": runs, "sweep_stdout": sweep.stdout, "small_output": small.stdout + small.stderr}


@pytest.mark.slow
def test_a_sweep_registers_its_best_job_once_and_other_data_gets_its_own_champion(more_runs):
    client, runs = more_runs["client"], more_runs["all"]
    r1 = runs[0]
    parent = next(r for r in runs if r.data.tags.get("medspark.sweep") == "parent")
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    small = runs[-1]
    assert len(runs) == 6 and len(jobs) == 2 and small.data.params["preprocess.image_size"] == "32"
    key = r1.data.tags["medspark.data_definition"]
    assert {r.data.tags["medspark.data_definition"] for r in runs[:2] + jobs} == {key}, "stable across runs"
    assert small.data.tags["medspark.data_definition"] != key

    # the sweep: its jobs registered nothing; its best job was registered once, after them, and lost to run 1
    best = parent.data.tags["medspark.best_run_id"]
    versions = {mv.run_id: str(mv.version) for mv in client.search_model_versions("name = 'medspark-synthetic'")}
    assert versions == {r1.info.run_id: "1", runs[1].info.run_id: "2", best: "3"}
    assert all(j.data.tags["medspark.registration"].startswith("not registered: a sweep job") for j in jobs
               if j.info.run_id != best)
    assert parent.data.tags["medspark.registration"] == "models:/medspark-synthetic/3"
    assert parent.data.tags["medspark.champion"] == "kept" and "registered: models:/medspark-synthetic/3" in \
        more_runs["sweep_stdout"]
    for name in ("medspark-synthetic", "medspark-synthetic-classifier"):
        assert client.get_model_version_by_alias(name, "champion").run_id == r1.info.run_id

    # other data: its own name and champion, on both models; the first name's champion did not move
    other = f"medspark-synthetic-{small.data.tags['medspark.data_definition'][:8]}"
    assert small.data.tags["medspark.registration"] == f"models:/{other}/1"
    assert f"registered as {other}, which has its own champion" in more_runs["small_output"]  # one log line
    for name in (other, f"{other}-classifier"):
        mv = client.get_model_version_by_alias(name, "champion")
        assert mv.run_id == small.info.run_id and mv.tags["medspark.input_shape"] == "32x32x1"
    mv = client.get_model_version_by_alias("medspark-synthetic-classifier", "champion")
    assert mv.tags["medspark.model_kind"] == "classifier" and mv.tags["medspark.data_definition"] == key
    assert float(mv.tags["medspark.objective_value"]) == pytest.approx(r1.data.metrics["test_accuracy"])
    assert mv.tags["medspark.classes"] == r1.data.params["classes"] and mv.tags["medspark.input_shape"] == "64x64x1"
    assert f"of run {r1.info.run_id}: test_accuracy = " in mv.description


@pytest.mark.slow
def test_predict_on_files_with_the_keras_models_champion_alias(more_runs, tmp_path, capsys):
    import csv
    import shutil

    from medspark import predict

    r1 = more_runs["all"][0]
    images = sorted((more_runs["tmp"] / "work" / "synthetic").rglob("*.png"))[:3]
    for p in images:
        shutil.copy(p, tmp_path / p.name)
    out = tmp_path / "p.csv"
    assert predict.main(["model=models:/medspark-synthetic@champion", f"input={tmp_path}", f"output={out}",
                         f"tracking_uri={more_runs['uri']}"]) == 0
    said = capsys.readouterr().out
    assert "predicting with the classifier of the same run, models:/medspark-synthetic-classifier@champion" in said
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(r["predicted_class"] in r1.data.params["classes"].split(",") for r in rows)
