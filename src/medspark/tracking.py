"""Everything MLflow: where runs go, what a run records, how it ends, and the registered model."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import traceback
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
SECRET = re.compile(r"password|passwd|token|secret|key|credential", re.I)  # never logged in clear
MASK = "***"
PARAM_MAX = 6000  # MLflow's limit on a param value


def mask_secrets(flat: dict) -> dict:
    return {k: (MASK if SECRET.search(k.rsplit(".", 1)[-1]) and v not in (None, "") else v) for k, v in flat.items()}


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def configure(tracking) -> str:
    """Point MLflow at the configured store and return the experiment id (created with its artifact root,
    which otherwise defaults to the current directory)."""
    import mlflow

    mlflow.set_tracking_uri(str(tracking.uri))
    if tracking.get("registry_uri"):
        mlflow.set_registry_uri(str(tracking.registry_uri))
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is None:
        location = tracking.get("artifact_location")
        if location and "://" not in str(location):
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        exp_id = mlflow.create_experiment(tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def run(run_name: str | None = None, tags: dict | None = None):
    """An MLflow run that always ends: FINISHED, or FAILED with the error and traceback recorded on it."""
    import mlflow

    active = mlflow.start_run(run_name=run_name, tags=tags or {})
    try:
        yield active
    except BaseException as e:
        try:
            mlflow.set_tags({"error": f"{type(e).__name__}: {e}"[:5000], "error_type": type(e).__name__})
            mlflow.log_text("".join(traceback.format_exception(e)), "error/traceback.txt")
        finally:
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params(params: dict) -> None:
    import mlflow

    clean = {k: str(v)[:PARAM_MAX] for k, v in mask_secrets(params).items()}
    items = sorted(clean.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
        mlflow.log_params(dict(items[i:i + 100]))


def log_config(cfg, overrides) -> None:
    """The resolved config as flat params (secrets masked) and as YAML, plus the command-line overrides."""
    import mlflow
    from omegaconf import OmegaConf

    log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    mlflow.log_param("overrides", " ".join(overrides)[:PARAM_MAX] or "(none)")
    masked = OmegaConf.create(mask_nested(OmegaConf.to_container(cfg, resolve=True)))
    mlflow.log_text(OmegaConf.to_yaml(masked), "config/resolved.yaml")


def mask_nested(d):
    return {k: (mask_nested(v) if isinstance(v, dict) else
                (MASK if SECRET.search(str(k)) and v not in (None, "") else v)) for k, v in d.items()}


def log_data(data) -> None:
    """What the data stage did: counts, duplicates, where the Petastorm data is, and every rejected file."""
    import mlflow
    from .data.materialize import rejected_csv

    mlflow.log_metrics(data.summary())
    mlflow.log_params({"data_url": data.url, "data_fingerprint": data.fingerprint, "classes": ",".join(data.classes)})
    mlflow.log_text(rejected_csv(data.rejected), "data/rejected.csv")
    mlflow.log_dict({"sizes": data.sizes, "per_class": data.per_class, "reused": data.reused, "seconds": data.seconds,
                     "duplicate_groups": data.duplicate_groups, "duplicate_files": data.duplicate_files,
                     "label_conflicts": data.label_conflicts, "moved_to_test": data.moved_to_test},
                    "data/splits.json")
    if data.reused:
        mlflow.set_tag("medspark.data_reused", "true")
        log.info("reused the materialized dataset at %s", data.url)


def log_training(result) -> None:
    """Per-epoch curves and what the backend reports about itself (workers, batch, its own metrics)."""
    import mlflow

    log_history(result.history, result.epoch_seconds)
    mlflow.log_params({f"backend_{k}": v for k, v in result.params.items()} |
                      {"workers": result.workers, "global_batch_size": result.global_batch_size})
    mlflow.log_metrics(result.metrics | {"epochs_run": len(result.epoch_seconds)})


def baseline_key(data_fingerprint: str, model_cfg: dict, epochs: int) -> str:
    """Runs with equal keys trained the same model on the same data for the same epochs: comparable speeds."""
    import hashlib
    import json

    blob = json.dumps({"data": data_fingerprint, "model": model_cfg, "epochs": int(epochs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def log_speedup(result, backend: str, key: str, measured=None) -> dict:
    """speedup_vs_single = this run's training images/s over the `single` baseline's, for the same key:
    measured in this run (train.measure_baseline=true), else the newest finished `single` run with the key
    in this experiment; parallel_efficiency = speedup / workers. Logs nothing when there is no baseline."""
    import mlflow

    mlflow.set_tag("medspark.baseline_key", key)
    if backend == "single":
        base, source = result.images_per_second, "self"
    elif measured is not None:
        base, source = measured.images_per_second, "measured in this run"
        mlflow.log_metrics({"baseline_train_seconds": measured.train_seconds,
                            "baseline_train_images_per_second": measured.images_per_second})
    else:
        run = mlflow.active_run()
        found = mlflow.search_runs(
            experiment_ids=[run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`medspark.baseline_key` = '{key}' and tags.`medspark.backend` = 'single' "
                          "and attributes.status = 'FINISHED'", output_format="list")
        if not found or "train_images_per_second" not in found[0].data.metrics:
            log.info("no `single` run with the same data, model and epochs in this experiment: no speedup logged "
                     "(run backend=single first, or pass train.measure_baseline=true)")
            return {}
        base, source = found[0].data.metrics["train_images_per_second"], found[0].info.run_id
    if not base:
        return {}
    speedup = result.images_per_second / base
    out = {"speedup_vs_single": speedup, "parallel_efficiency": speedup / max(1, result.workers)}
    mlflow.log_metrics(out)
    mlflow.set_tag("medspark.baseline", source)
    return out


def log_history(history: dict, epoch_seconds: list[float]) -> None:
    """Per-epoch curves, step = epoch index (0-based, as Keras counts)."""
    import mlflow
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    metrics = [Metric(f"epoch_{k}" if k in ("learning_rate",) else k, float(v), now, step)
               for k, vals in history.items() for step, v in enumerate(vals)]
    metrics += [Metric("epoch_seconds", float(v), now, step) for step, v in enumerate(epoch_seconds)]
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_model(model, example, registered_name: str | None):
    """The Keras model with signature and input example; registered when a name is configured.
    (mlflow.keras.log_model fails on input examples with Keras 3.15 here; mlflow.tensorflow works.)"""
    import mlflow
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(example, verbose=0))
    info = mlflow.tensorflow.log_model(model, name="model", signature=signature, input_example=example,
                                       registered_model_name=registered_name or None)
    return info


def store_uri_for_ui(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if uri else "mlflow ui"


def disable_autologging_noise() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
