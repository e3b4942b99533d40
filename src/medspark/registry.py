"""The registry: which runs register their models, under which name, and the champion alias.

A champion is only meaningful among models trained and tested on the same data. A run's **data definition**
(`data_definition`) is the key of what its test metrics are measured on and what its models take: the task,
the classes, the input shape and the test split's identity (the content hash and label of every test image). It is
stable across runs, machines and checkouts of the same dataset + split settings (file paths, times and training
settings do not enter it; preprocessing does only through the input shape). A registered name belongs to one data
definition (registered-model tag `medspark.data_definition`, set by the first version): a run on another
definition registers under `<name>-<first 8 hex of its key>` instead, with its own champion, and says so in one
log line. So `models:/<name>@champion` never changes its classes, task or input shape under its users.

Registration is deliberate (`tracking.register`): `auto` registers stand-alone runs, not sweep jobs nor runs that
are children of another run (benchmarks); a sweep registers its best job once, when it ends (medspark.sweep);
`always` registers every run (each offers itself to the champion); `never` registers nothing.

Each registered run gets two versions, the Keras model `<name>` and the packaged classifier `<name>-classifier`,
tagged and described (objective and value, data definition and fingerprint, classes, task, input shape, run).
`promote` then moves the alias on both together, when the run is strictly better than the champion's run on the
objective (or there is no champion yet; ties keep the champion), records the decision on the run (tags
`medspark.champion*`) and returns it for the run summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re

log = logging.getLogger(__name__)
MODES = ("max", "min")  # max: higher is better (accuracy, F1, AUC); min: lower is better (a loss, an error rate)
REGISTER = ("auto", "always", "never")
TAG = "medspark.champion"
DEFINITION_TAG = "medspark.data_definition"  # on runs, registered models and model versions
BASE_TAG = "medspark.registered_model"  # on runs: the name the run registers under (before any definition suffix)
REGISTRATION_TAG = "medspark.registration"  # on runs: models:/<name>/<version>, or why the run did not register
DEFINITION_TAGS = {"key": DEFINITION_TAG, "fingerprint": "medspark.data_fingerprint", "classes": "medspark.classes",
                   "task": "medspark.task", "input_shape": "medspark.input_shape", "test_n": "medspark.test_n"}
KIND_TAG = "medspark.model_kind"  # on model versions: keras | classifier


# ---------------------------------------------------------------- the data definition

def data_definition(data) -> dict:
    """The data definition of a materialized dataset (see the module docstring): its key (16 hex) and what it is
    made of; `fingerprint` (the materialized folder's, which also covers paths, file times and preprocessing) is
    recorded beside it, not part of it."""
    from .data import loader

    test = loader.read_split(data.split_url("test"), columns=("sha1", "label")) if data.sizes.get("test") else {}
    items = sorted(f"{s}:{int(label)}" for s, label in zip(test.get("sha1", []), test.get("label", [])))
    blob = json.dumps({"task": data.task, "classes": list(data.classes), "shape": [int(x) for x in data.shape],
                       "test": items}, sort_keys=True)
    return {"key": hashlib.sha256(blob.encode()).hexdigest()[:16], "fingerprint": data.fingerprint,
            "classes": ",".join(data.classes), "task": data.task, "input_shape": "x".join(map(str, data.shape)),
            "test_n": str(len(items))}


def definition_from_tags(tags: dict) -> dict:
    """A run's data definition, read back from its tags (record_definition)."""
    return {k: tags.get(tag, "") for k, tag in DEFINITION_TAGS.items()}


def record_definition(definition: dict, base: str | None) -> None:
    """The active run's data definition and registered-model name as tags: what a sweep needs to register it later."""
    import mlflow

    mlflow.set_tags({DEFINITION_TAGS[k]: str(v) for k, v in definition.items()} | ({BASE_TAG: base} if base else {}))


# ---------------------------------------------------------------- who registers, under which name

def check_register(tracking) -> str:
    """tracking.register, checked: auto | always | never."""
    from .config import ConfigError

    mode = str(tracking.get("register") or "auto")
    if mode not in REGISTER:
        raise ConfigError(f"tracking.register={mode} must be one of {' | '.join(REGISTER)} (auto: stand-alone runs "
                          "register, a sweep registers its best job; always: every run; never: none)")
    return mode


def in_sweep() -> bool:
    """This process runs a job of a Hydra multirun (any sweeper, any launcher)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not in a Hydra job
        return False


def not_registering(tracking) -> str | None:
    """Why this run does not register its models under tracking.registered_model, or None when it does."""
    from .tracking import PARENT_RUN_ENV

    mode = check_register(tracking)
    if not tracking.get("registered_model"):
        return "tracking.registered_model is null"
    if mode == "never":
        return "tracking.register=never"
    if mode == "auto" and in_sweep():
        return "a sweep job: the sweep registers its best job when it ends (tracking.register=auto; always: every job)"
    if mode == "auto" and os.environ.get(PARENT_RUN_ENV):
        return (f"a child of run {os.environ[PARENT_RUN_ENV]} (tracking.register=auto registers stand-alone runs "
                "and a sweep's best job; always: every run)")
    return None


ANY_FOLDER = ("image_folder", "dicom", "nifti")  # dataset options whose root is any folder of the user's


def base_name(cfg) -> str | None:
    """tracking.registered_model; the default name of a dataset option that takes any folder (`image_folder`,
    `dicom`, `nifti`: `medspark-<option>`, shared by every folder) gets the dataset root's folder name:
    `medspark-image_folder-<root folder>`."""
    name = cfg.tracking.get("registered_model")
    if not name:
        return None
    option = cfg.dataset.get("name")
    root = cfg.dataset.get("root") if option in ANY_FOLDER else None
    if str(name) == f"medspark-{option}" and root:
        slug = re.sub(r"[^a-z0-9]+", "-", os.path.basename(os.path.abspath(str(root))).lower()).strip("-")[:40]
        return f"{name}-{slug}" if slug else str(name)
    return str(name)


def name_for(client, base: str, key: str) -> tuple[str, str | None]:
    """The registered name for data definition `key`: `base` when it is free, or already holds this definition
    (or was registered before definitions were recorded: it is adopted), else `<base>-<key[:8]>`; and the log
    line that says why when it is not `base`."""
    from mlflow.exceptions import MlflowException

    try:
        owner = client.get_registered_model(base).tags.get(DEFINITION_TAG)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return base, None
    if owner in (None, key):
        return base, None
    name = f"{base}-{key[:8]}"
    return name, (f"this run's data definition {key} (test split, classes, task, input shape) is not the one of "
                  f"models:/{base} ({owner}): registered as {name}, which has its own champion")


def _ensure(client, name: str, definition: dict, kind: str) -> None:
    """Registered model `name` exists and carries its data definition (created, or adopted when it has none)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        model = client.create_registered_model(name, tags={DEFINITION_TAG: definition["key"]}, description=(
            f"medspark {kind} models trained and tested on data definition {definition['key']}: "
            f"{definition['task']}, classes {definition['classes']}, input {definition['input_shape']}, "
            f"{definition['test_n']} test images."))
    if DEFINITION_TAG not in model.tags:
        client.set_registered_model_tag(name, DEFINITION_TAG, definition["key"])


def version_tags(definition: dict, run_id: str, kind: str) -> dict:
    return {DEFINITION_TAGS[k]: str(v) for k, v in definition.items()} | {"medspark.run_id": run_id, KIND_TAG: kind}


def register(client, run_id: str, base: str, definition: dict, sources: dict) -> dict:
    """Both models of run `run_id` (`sources`: {"model": uri, "classifier": uri}) registered under the name of its
    data definition (name_for) and `<name>-classifier`, tagged. `client` reads and tags the registry; the versions
    are created by mlflow.register_model (the active registry: the same one), which also links each logged model
    to its version. Returns {name, version, classifier_name, classifier_version}."""
    import mlflow

    from .tracking import classifier_registered_name

    name, note = name_for(client, base, definition["key"])
    if note:
        log.warning(note)
    out = {}
    for kind, reg in (("keras", name), ("classifier", classifier_registered_name(name))):
        source = sources["model" if kind == "keras" else "classifier"]
        _ensure(client, reg, definition, kind)
        mv = mlflow.register_model(source, reg, tags=version_tags(definition, run_id, kind))
        out |= {"name" if kind == "keras" else "classifier_name": reg,
                "version" if kind == "keras" else "classifier_version": str(mv.version)}
    return out


def register_logged(models, cfg, definition: dict) -> None:
    """What a training run does after logging its two models (tracking.log_models): register them, or record why
    not. Sets `registered_model_name` and `registered_model_version` on each ModelInfo (None when not registered)
    and `registration` (the URI, or the reason) on the Keras one; tags the run with it."""
    import mlflow
    from mlflow import MlflowClient

    keras_info, classifier_info = models
    for info in models:
        info.registered_model_name, info.registered_model_version = None, None
    base = base_name(cfg)
    why = not_registering(cfg.tracking)
    if why is None:
        got = register(MlflowClient(), keras_info.run_id, base, definition,
                       {"model": keras_info.model_uri, "classifier": classifier_info.model_uri})
        keras_info.registered_model_name, keras_info.registered_model_version = got["name"], got["version"]
        classifier_info.registered_model_name = got["classifier_name"]
        classifier_info.registered_model_version = got["classifier_version"]
        keras_info.registration = f"models:/{got['name']}/{got['version']}"
    else:
        keras_info.registration = f"not registered: {why}"
        log.info("models not registered: %s", why)
    mlflow.set_tag(REGISTRATION_TAG, keras_info.registration)


def register_run(client, run_id: str, tracking, metric: str, value: float) -> dict:
    """Register a finished run's logged `model` and `classifier` (a sweep's best job, medspark.sweep) under the
    name and data definition it recorded (record_definition), and offer it to the champion. Returns promote's
    decision, with `registration`."""
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    base, definition = run.data.tags.get(BASE_TAG), definition_from_tags(run.data.tags)
    if not base or not definition["key"]:
        return {"decision": "skipped", "reason": f"run {run_id} records no registered-model name or data definition"}
    found = {m.name: m.model_uri for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")}
    from .tracking import CLASSIFIER_NAME

    if not {"model", CLASSIFIER_NAME} <= set(found):
        return {"decision": "skipped", "reason": f"run {run_id} has no logged `model` and `classifier`"}
    got = register(client, run_id, base, definition, {"model": found["model"], "classifier": found[CLASSIFIER_NAME]})
    registration = f"models:/{got['name']}/{got['version']}"
    client.log_batch(run_id, tags=[RunTag(REGISTRATION_TAG, registration)])
    return promote_registered(client, tracking, run_id, got, definition, metric, value) | {
        "registration": registration}


# ---------------------------------------------------------------- the champion

def promote(tracking, models, metric: str, value: float, client=None) -> dict:
    """What train() calls after logging its models (`models`: log_models' (model, classifier) infos): describe the
    registered versions with the objective and offer them to the champion (promote_if_better), with the `tracking`
    config (champion_alias, champion_mode). A registry error (e.g. a server without aliases, no permission) is
    recorded and logged, not raised: the run trained, evaluated and registered its models; only the alias did not
    move."""
    from mlflow import MlflowClient

    keras_info, classifier_info = models
    name, version = getattr(keras_info, "registered_model_name", None), keras_info.registered_model_version
    if not name or version is None:
        why = getattr(keras_info, "registration", "") or "the model was not registered"
        return {"decision": "skipped", "reason": "tracking.champion_alias is null" if not tracking.get(
            "champion_alias") else why.removeprefix("not registered: ")}
    client = client or MlflowClient()
    got = {"name": name, "version": str(version), "classifier_name": classifier_info.registered_model_name,
           "classifier_version": str(classifier_info.registered_model_version)}
    definition = definition_from_tags(client.get_run(keras_info.run_id).data.tags)
    return promote_registered(client, tracking, keras_info.run_id, got, definition, metric, value)


def promote_registered(client, tracking, run_id: str, got: dict, definition: dict, metric: str, value: float) -> dict:
    """The registered versions `got` (register's answer) of run `run_id`: described, then offered to the champion."""
    from mlflow.exceptions import MlflowException

    alias = tracking.get("champion_alias")
    try:
        describe(client, got, run_id, definition, metric, value)
        if not alias:
            return {"decision": "skipped", "reason": "tracking.champion_alias is null"}
        return promote_if_better(client, got["name"], got["version"], run_id, metric, value,
                                 str(tracking.get("champion_mode") or "max"), alias=str(alias),
                                 classifier=(got["classifier_name"], got["classifier_version"]),
                                 definition=definition.get("key") or None)
    except MlflowException as e:
        log.warning("could not update models:/%s@%s: %s", got["name"], alias, e)
        decision = {"decision": "error", "reason": f"{type(e).__name__}: {e}"[:500], "alias": alias,
                    "name": got["name"], "version": got["version"], "metric": metric}
        try:
            client.set_tag(run_id, TAG, "error")
            client.set_tag(run_id, f"{TAG}.reason", decision["reason"])
        except MlflowException:
            pass
        return decision


def describe(client, got: dict, run_id: str, definition: dict, metric: str, value: float) -> None:
    """Both versions tagged with the objective and its value, and a description a person reads in the UI."""
    value = _float(value)
    where = (f"on the test split of data definition {definition.get('key')} ({definition.get('task')}; classes "
             f"{definition.get('classes')}; input {definition.get('input_shape')}; {definition.get('test_n')} test "
             f"images; data fingerprint {definition.get('fingerprint')})")
    for name, version, kind in ((got["name"], got["version"], "Keras model (takes preprocessed arrays)"),
                                (got["classifier_name"], got["classifier_version"], "classifier (takes image files)")):
        client.set_model_version_tag(name, version, "medspark.objective", metric)
        client.set_model_version_tag(name, version, "medspark.objective_value", _fmt(value))
        client.update_model_version(name, version, description=f"medspark {kind} of run {run_id}: {metric} = "
                                                               f"{value:.4g} {where}.")


def promote_if_better(client, name: str, version, run_id: str, metric: str, value: float, mode: str = "max",
                      alias: str = "champion", classifier: tuple[str, str] | None = None,
                      definition: str | None = None) -> dict:
    """Point `alias` of registered model `name` at `version` (and of `classifier` = (name, version) at its version,
    together) when `value` (this run's `metric`) is strictly better than the current champion's run's value for the
    same metric, or when there is no champion yet. A champion on another data `definition` (its version's tag) is
    never compared with: the alias stays. Records the decision as tags on `run_id` and returns it:
    {decision: promoted|kept, reason, alias, name, version, metric, mode, value,
     previous_version, previous_value, previous_run_id, champion_version, champion_uri, classifier_champion_uri}."""
    if mode not in MODES:
        raise ValueError(f"tracking.champion_mode={mode!r} must be one of {', '.join(MODES)}")
    version, value = str(version), _float(value)
    held = client.get_registered_model(name).aliases.get(alias)  # {alias: version}
    current = client.get_model_version(name, str(held)) if held is not None else None
    previous = {"previous_version": str(current.version) if current else None, "previous_run_id":
                current.run_id if current else None, "previous_value": None}
    theirs = (current.tags or {}).get(DEFINITION_TAG) if current else None
    if current is None:
        promote, reason = True, "no champion yet"
    elif str(current.version) == version:
        promote, reason = True, "this version is already the champion"
    elif definition and theirs and theirs != definition:
        promote, reason = False, (f"champion version {current.version} is trained and tested on data definition "
                                  f"{theirs}, this version on {definition}: not comparable, the alias stays")
    elif definition and not theirs:
        promote, reason = True, (f"champion version {current.version} records no data definition (registered before "
                                 "medspark recorded them), so it cannot be compared: replaced")
    else:
        previous["previous_value"] = _champion_value(client, current.run_id, metric)
        promote, reason = _better(value, previous["previous_value"], mode, metric, current.version)
    if promote:
        client.set_registered_model_alias(name, alias, version)
        if classifier:
            client.set_registered_model_alias(classifier[0], alias, str(classifier[1]))
    decision = {"decision": "promoted" if promote else "kept", "reason": reason, "alias": alias, "name": name,
                "version": version, "metric": metric, "mode": mode, "value": value, **previous,
                "champion_version": version if promote else str(current.version),
                "champion_uri": f"models:/{name}@{alias}"}
    if classifier:
        decision["classifier_champion_uri"] = f"models:/{classifier[0]}@{alias}"
    _tag(client, run_id, decision)
    log.info("%s: version %s %s (%s)", decision["champion_uri"], version, decision["decision"], reason)
    return decision


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _champion_value(client, run_id: str | None, metric: str) -> float | None:
    """The champion run's value of `metric`; None when the run or the metric is gone."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.metrics.get(metric)
    except MlflowException:
        return None


def _better(value: float, champion: float | None, mode: str, metric: str, champion_version) -> tuple[bool, str]:
    if math.isnan(value):
        return False, f"this run has no finite {metric}"
    if champion is None or math.isnan(champion):
        return True, f"champion version {champion_version} has no {metric} to compare"
    wins = value > champion if mode == "max" else value < champion
    op = ("<=" if mode == "max" else ">=") if not wins else (">" if mode == "max" else "<")
    return wins, f"{metric} {value:.6g} {op} {champion:.6g} of version {champion_version} ({mode} is better)"


def _tag(client, run_id: str, d: dict) -> None:
    tags = {TAG: d["decision"], f"{TAG}.reason": d["reason"], f"{TAG}.alias": d["alias"],
            f"{TAG}.metric": d["metric"], f"{TAG}.mode": d["mode"], f"{TAG}.value": _fmt(d["value"]),
            f"{TAG}.version": d["version"], f"{TAG}.name": d["name"], f"{TAG}.champion_version": d["champion_version"],
            f"{TAG}.previous_version": d["previous_version"] or "none",
            f"{TAG}.previous_value": _fmt(d["previous_value"]),
            f"{TAG}.previous_run_id": d["previous_run_id"] or "none"}
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _fmt(v) -> str:
    return "none" if v is None else repr(float(v))
