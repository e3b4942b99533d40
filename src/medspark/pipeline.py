"""The data stage every entry point shares (training, `preprocess_only`): run, listing, lock, materialize, timings."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import resume, tracking
from .config import check, project_root
from .data import materialize as mat
from .data import phi
from .data.preprocess import PreprocessConfig
from .data.sources import DatasetError, Listing, list_dataset
from .data.splits import check_listing

log = logging.getLogger("medspark")


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
def data_run(cfg: DictConfig, overrides=(), spark=None, *, run_name: str | None, tags: dict, app_name: str):
    """The opening every entry point shares (training, `preprocess_only`): check the config, point MLflow at the
    store, start the run (ended FINISHED, FAILED or KILLED by tracking.run) with the resolved config, list the
    dataset, and materialize it on Spark: `spark`, or a session of `cfg.cluster` started here and stopped on
    leaving (or earlier, `stage.stop_spark()`). Yields a DataStage. run_name None: tracking.run_name, made from
    the overrides."""
    check(cfg)
    tracking.configure(cfg.tracking)
    with tracking.run(run_name or tracking.run_name(cfg, overrides), tags) as run:
        resume.end_dead_runs(run.info.run_id)  # RUNNING runs of this experiment whose process was SIGKILLed
        tracking.log_config(cfg, overrides)
        timings = Timings()
        privacy = cfg.get("privacy") or {}
        phi.configure(privacy.get("phi_key"), bool(privacy.get("hash_paths", False)))  # before listing and Spark
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


def run_tags(cfg: DictConfig, overrides=()) -> dict:
    """The tags every medspark run starts with: its choices, its overrides, this process, the git commit."""
    tags = {"medspark.model": cfg.model.name, "medspark.backend": cfg.backend.name,
            "medspark.cluster": cfg.cluster.name, "medspark.dataset": cfg.dataset.name,
            "medspark.overrides": " ".join(overrides)[:5000],
            resume.PROCESS_TAG: resume.process_id()}  # host:pid:start, so a later run can tell this one died
    commit = tracking.git_commit(project_root())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _materialize(cfg, spark, listing) -> mat.Materialized:
    pre = PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess))
    split = {"val": float(cfg.split.val), "test": float(cfg.split.test), "seed": int(cfg.split.seed),
             "label_conflicts": str(cfg.split.get("label_conflicts", "reject"))}
    with _data_lock(cfg):
        data = mat.materialize(spark, listing, pre, split, cfg.paths.data_url, cfg.dataset.name,
                               row_group_size_mb=int(cfg.materialize.row_group_size_mb),
                               rebuild=bool(cfg.materialize.rebuild), path_key=phi.path_key())
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
