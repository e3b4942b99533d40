"""The training entrypoint: config -> Spark -> Petastorm -> backend -> evaluation -> MLflow.

    python -m medspark.train [overrides]      (also installed as `medspark`)

`train(cfg)` is importable (tests, sweeps, notebooks); `main()` is only the Hydra wrapper.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import registry, resume, tracking
from .config import ConfigError, check, config_dir, exit_on_bad_overrides, project_root
from .data import loader, materialize as mat
from .data.preprocess import PreprocessConfig
from .data.splits import check_listing
from .data.sources import DatasetError, Listing, list_images
from .interrupts import EXIT_CODE as TERMINATED_EXIT, Terminated

log = logging.getLogger("medspark")


def list_dataset(dcfg):
    """The dataset's listing; the built-in synthetic set is generated first (once per parameters)."""
    if dcfg.get("generate"):
        from .data import synthetic

        g = dcfg.generate
        synthetic.generate(dcfg.root, per_class=int(g.per_class), size=int(g.size), seed=int(g.seed))
    return list_images(dcfg)


def train(cfg: DictConfig, overrides: list[str] | tuple = (), spark=None) -> float:
    """Run one training job end to end and return the objective metric (for sweepers)."""
    resume.check(cfg)
    with data_run(cfg, overrides, spark, run_name=cfg.tracking.get("run_name") or
                  f"{cfg.model.name}-{_backend_name(cfg)}", tags=_tags(cfg, overrides),
                  app_name=f"medspark-{cfg.dataset.name}") as stage, \
            tempfile.TemporaryDirectory(prefix="medspark-") as tmp:
        import mlflow

        run, data, timings = stage.run, stage.data, stage.timings
        checkpoint = resume.prepare(cfg, data, run.info.run_id)  # train.resume: see medspark.resume
        result = _fit(cfg, stage.spark, data, checkpoint=checkpoint)
        baseline = None
        if cfg.train.get("measure_baseline") and _backend_name(cfg) != "single":
            log.info("train.measure_baseline=true: training the `single` baseline on the same data")
            baseline = _fit(cfg, stage.spark, data, backend_cfg=OmegaConf.create({
                "name": "single", "_target_": "medspark.backends.single.Single"}))
        stage.stop_spark()
        timings.update(train_seconds=result.train_seconds, train_images_per_second=result.images_per_second)
        tracking.log_training(result)
        key = tracking.baseline_key(data.fingerprint, OmegaConf.to_container(cfg.model, resolve=True), cfg.train.epochs)
        speed = tracking.log_speedup(result, _backend_name(cfg), key, baseline)
        with timings("evaluate_seconds"):
            metrics = _evaluate(result, data, Path(tmp))
        with timings("log_model_seconds"):
            example, _ = loader.read_arrays(data.split_url("test"), limit=2)
            info = tracking.log_model(result.model, example.astype("float32"), cfg.tracking.get("registered_model"))
            classifier = tracking.log_classifier(
                result.model, PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess)), data.classes,
                example, cfg.tracking.get("registered_model"))
        mlflow.log_metrics(dict(timings))
        objective = float(metrics.get(cfg.train.objective, float("nan")))
        summary = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                   "model_uri": (f"models:/{cfg.tracking.registered_model}/{info.registered_model_version}"
                                 if info.registered_model_version else info.model_uri),
                   "classifier_uri": tracking.model_uri(
                       classifier, tracking.classifier_registered_name(cfg.tracking.get("registered_model"))),
                   "objective": {cfg.train.objective: objective},
                   "test": {k: round(v, 4) for k, v in metrics.items() if k in
                            ("test_accuracy", "test_macro_f1", "test_roc_auc_ovr", "test_n")},
                   "training": {"backend": _backend_name(cfg), "workers": result.workers,
                                "images_per_second": round(result.images_per_second, 1),
                                **{k: round(v, 3) for k, v in speed.items()}},
                   "seconds": {k: round(v, 1) for k, v in timings.items() if k.endswith("seconds")}}
        summary["champion"] = registry.promote(cfg.tracking, info, cfg.train.objective, objective)
        mlflow.log_dict(summary, "summary.json")
    _print_summary(summary, cfg.tracking.uri)
    return objective


@dataclass
class DataStage:
    """What `data_run` yields: the MLflow run, the listing, the materialized splits, the Spark session and the
    timings so far (list_seconds, preprocess/materialize_seconds)."""
    run: Any
    listing: Listing
    data: mat.Materialized | None
    spark: Any
    timings: "Timings"
    own_spark: bool = False

    def stop_spark(self) -> None:
        """Stop the session when data_run started it (idempotent; a session passed in is left running)."""
        if self.own_spark and self.spark is not None:
            self.spark.stop()
        self.spark = None


@contextmanager
def data_run(cfg: DictConfig, overrides=(), spark=None, *, run_name: str, tags: dict, app_name: str):
    """The opening every entry point shares (training, `preprocess_only`): check the config, point MLflow at the
    store, start the run (ended FINISHED, FAILED or KILLED by tracking.run) with the resolved config, list the
    dataset, and materialize it on Spark: `spark`, or a session of `cfg.cluster` started here and stopped on
    leaving (or earlier, `stage.stop_spark()`). Yields a DataStage."""
    check(cfg)
    tracking.configure(cfg.tracking)
    with tracking.run(run_name, tags) as run:
        resume.end_dead_runs(run.info.run_id)  # RUNNING runs of this experiment whose process was SIGKILLed
        tracking.log_config(cfg, overrides)
        timings = Timings()
        with timings("list_seconds"):
            listing = list_dataset(cfg.dataset)
        log.info("listed %d files in %d classes %s", len(listing.records), len(listing.classes), listing.counts())
        tracking.log_listing(listing)  # data/ignored.csv: recorded even when a check below fails the run
        check_listing(listing, float(cfg.split.val), float(cfg.split.test))  # before Spark starts
        from .spark import session

        stage = DataStage(run, listing, None, spark or session(cfg.cluster, app_name=app_name), timings,
                          own_spark=spark is None)
        try:
            t0 = time.perf_counter()
            stage.data = _materialize(cfg, stage.spark, listing)
            timings.update(data_timings(stage.data, time.perf_counter() - t0))
            tracking.log_data(stage.data)
            yield stage
        finally:
            stage.stop_spark()


class Timings(dict):
    """Named wall times: `with timings("x_seconds"): ...`."""

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[key] = time.perf_counter() - t0


def _backend_name(cfg) -> str:
    return cfg.backend.name


def _tags(cfg, overrides) -> dict:
    tags = {"medspark.model": cfg.model.name, "medspark.backend": _backend_name(cfg),
            "medspark.cluster": cfg.cluster.name, "medspark.dataset": cfg.dataset.name,
            "medspark.overrides": " ".join(overrides)[:5000],
            resume.PROCESS_TAG: resume.process_id()}  # host:pid:start, so a later run can tell this one died
    commit = tracking.git_commit(project_root())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _materialize(cfg, spark, listing) -> mat.Materialized:
    pre = PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess))
    split = {"val": float(cfg.split.val), "test": float(cfg.split.test), "seed": int(cfg.split.seed)}
    with _data_lock(cfg):
        data = mat.materialize(spark, listing, pre, split, cfg.paths.data_url, cfg.dataset.name,
                               row_group_size_mb=int(cfg.materialize.row_group_size_mb),
                               rebuild=bool(cfg.materialize.rebuild))
    for name in ("train", "val", "test"):
        if not data.sizes[name]:
            raise DatasetError(f"the {name} split is empty after preprocessing ({len(data.rejected)} files rejected, "
                               f"see data/rejected.csv in the run); check dataset.root and split.*")
    return data


def data_lock_path(cfg) -> Path:
    """The lock file `_data_lock` holds while a dataset of `cfg.dataset.name` is looked up or written."""
    return Path(cfg.paths.work_dir) / "locks" / f"materialize-{cfg.dataset.name}.lock"


@contextmanager
def _data_lock(cfg):
    """Jobs of a parallel sweep (hydra/launcher=parallel) start together and would all write the same new
    dataset (one deleting another's unfinished write): one writes, the others wait, then reuse it. A file
    lock in the local work dir, so it covers the jobs of one machine, which is where a joblib sweep runs."""
    import fcntl

    path = data_lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


def data_timings(data: mat.Materialized, wall: float) -> dict[str, float]:
    """This run's preprocessing and writing times; a reused dataset cost only the lookup (`wall`)."""
    if data.reused:  # same keys as a fresh write (the compare view lines runs up); NaN = no images processed
        return {"preprocess_seconds": 0.0, "materialize_seconds": wall, "preprocess_images_per_second": float("nan")}
    out = {"preprocess_seconds": data.seconds.get("hash", 0) + data.seconds.get("preprocess", 0),
           "materialize_seconds": data.seconds.get("write", 0)}
    if out["preprocess_seconds"]:
        out["preprocess_images_per_second"] = data.listed / out["preprocess_seconds"]
    return out


def _fit(cfg, spark, data, backend_cfg=None, checkpoint=None):
    from .backends import build
    from .backends.base import TrainJob

    backend = build(backend_cfg or cfg.backend)
    return backend.fit(TrainJob(
        data=data, train=cfg.train, spark=spark, seed=int(cfg.seed), checkpoint=checkpoint,
        build_model=lambda **overrides: instantiate(cfg.model, input_shape=data.shape, num_classes=len(data.classes),
                                                    **overrides)))


def _evaluate(result, data, tmp: Path) -> dict[str, float]:
    """Predict the test split batch by batch (never all in memory), then metrics, reports and plots."""
    import mlflow
    import numpy as np

    from .evaluate import evaluate

    probs, labels = [], []
    for x, y in loader.dataset(data.split_url("test"), data.shape, 128, training=False):
        probs.append(result.model.predict_on_batch(x))
        labels.append(y.numpy())
    metrics, files = evaluate(np.concatenate(labels), np.concatenate(probs), data.classes, tmp / "evaluation",
                              history=result.history)
    mlflow.log_metrics(metrics)
    for f in files:
        mlflow.log_artifact(str(f), "evaluation")
    return metrics


def _print_summary(summary: dict, uri: str) -> None:
    print("\n=== medspark run finished ===", flush=True)
    print(json.dumps(summary, indent=2))
    print(f"run id:   {summary['run_id']}")
    print(f"model:    {summary['model_uri']}")
    print(f"MLflow UI: {tracking.store_uri_for_ui(uri)}   (then open http://127.0.0.1:5000)", flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hint = (" The same command with train.resume=true continues from the last completed epoch."
            if resume.supports(cfg.backend) else "")  # SIGTERM keeps the checkpoint of the last completed epoch
    with command_errors(stopped_hint=hint):
        return train(cfg, overrides=list(HydraConfig.get().overrides.task))


@contextmanager
def command_errors(stopped_hint: str = ""):
    """What a command's main does with the errors a user can fix: a bad config or dataset is one line on stderr
    and exit status 2; a SIGTERM (the run already ended KILLED) is one line and exit status 143."""
    try:
        yield
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        log.error("%s", e)
        print(f"medspark: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated as e:
        print(f"medspark: stopped: {e}; the MLflow run ended KILLED.{stopped_hint}", file=sys.stderr)
        sys.exit(TERMINATED_EXIT)


def main() -> None:
    exit_on_bad_overrides()  # backend=nope: one line naming the group's options, before Hydra composes
    _hydra_main()


if __name__ == "__main__":
    main()
