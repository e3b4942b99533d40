"""The registry champion: an alias (`models:/<name>@champion`) that moves to a new model version only when its
run beats the current champion's run on the objective metric.

Every successful run registers a version (tracking.log_model); `promote` then decides, records the decision on
the run (tags `medspark.champion*`) and returns it for the run summary. The first version becomes champion.
Ties keep the current champion (a re-run that is only as good does not move the alias).
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
MODES = ("max", "min")  # max: higher is better (accuracy, F1, AUC); min: lower is better (a loss, an error rate)
TAG = "medspark.champion"


def promote_if_better(client, name: str, version, run_id: str, metric: str, value: float, mode: str = "max",
                      alias: str = "champion") -> dict:
    """Point `alias` of registered model `name` at `version` when `value` (this run's `metric`) is strictly better
    than the current champion's run's value for the same metric, or when there is no champion yet.
    Records the decision as tags on `run_id` and returns it:
    {decision: promoted|kept, reason, alias, name, version, metric, mode, value,
     previous_version, previous_value, previous_run_id, champion_version}."""
    if mode not in MODES:
        raise ValueError(f"tracking.champion_mode={mode!r} must be one of {', '.join(MODES)}")
    version, value = str(version), _float(value)
    held = client.get_registered_model(name).aliases.get(alias)  # {alias: version}
    current = client.get_model_version(name, str(held)) if held is not None else None
    previous = {"previous_version": str(current.version) if current else None, "previous_run_id":
                current.run_id if current else None, "previous_value": None}
    if current is None:
        promote, reason = True, "no champion yet"
    elif str(current.version) == version:
        promote, reason = True, "this version is already the champion"
    else:
        previous["previous_value"] = _champion_value(client, current.run_id, metric)
        promote, reason = _better(value, previous["previous_value"], mode, metric, current.version)
    if promote:
        client.set_registered_model_alias(name, alias, version)
    decision = {"decision": "promoted" if promote else "kept", "reason": reason, "alias": alias, "name": name,
                "version": version, "metric": metric, "mode": mode, "value": value, **previous,
                "champion_version": version if promote else str(current.version),
                "champion_uri": f"models:/{name}@{alias}"}
    _tag(client, run_id, decision)
    log.info("%s: version %s %s (%s)", decision["champion_uri"], version, decision["decision"], reason)
    return decision


def promote(tracking, info, metric: str, value: float) -> dict:
    """What train() calls after logging the model: promote_if_better with the `tracking` config
    (champion_alias, champion_mode, registered_model) and the logged model's `info`, on the active store.
    A registry error (e.g. a server without aliases, no permission) is recorded and logged, not raised:
    the run trained, evaluated and registered its model; only the alias did not move."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    alias, name = tracking.get("champion_alias"), tracking.get("registered_model")
    version = getattr(info, "registered_model_version", None)
    if not alias or not name or version is None:
        why = ("tracking.champion_alias is null" if not alias else
               "tracking.registered_model is null" if not name else "the model was not registered")
        return {"decision": "skipped", "reason": why}
    client = MlflowClient()
    try:
        return promote_if_better(client, str(name), version, info.run_id, metric, value,
                                 str(tracking.get("champion_mode") or "max"), alias=str(alias))
    except MlflowException as e:
        log.warning("could not update models:/%s@%s: %s", name, alias, e)
        decision = {"decision": "error", "reason": f"{type(e).__name__}: {e}"[:500], "alias": alias, "name": name,
                    "version": str(version), "metric": metric}
        try:
            client.set_tag(info.run_id, TAG, "error")
            client.set_tag(info.run_id, f"{TAG}.reason", decision["reason"])
        except MlflowException:
            pass
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
            f"{TAG}.version": d["version"], f"{TAG}.champion_version": d["champion_version"],
            f"{TAG}.previous_version": d["previous_version"] or "none",
            f"{TAG}.previous_value": _fmt(d["previous_value"]),
            f"{TAG}.previous_run_id": d["previous_run_id"] or "none"}
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _fmt(v) -> str:
    return "none" if v is None else repr(float(v))
