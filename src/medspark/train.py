"""The training entrypoint: config -> Spark -> Petastorm -> backend -> evaluation -> MLflow.

    python -m medspark.train [overrides]      (also installed as `medspark`)

`train(cfg)` is importable (tests, sweeps, notebooks); `main()` is only the Hydra wrapper.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from . import evaluate, pipeline, registry, report, resume, tracking
from .cli import command_errors
from .config import OBJECTIVE_TAG, config_dir, exit_on_bad_overrides, objective_metric

log = logging.getLogger("medspark")


def train(cfg: DictConfig, overrides: list[str] | tuple = (), spark=None) -> float:
    """Run one training job end to end and return the objective metric (for sweepers):
    check -> data stage (medspark.pipeline) -> backend fit -> evaluate the test split -> track in MLflow."""
    from .backends import build, snapshots
    from .backends.api import TrainJob
    from .backends.keras_fit import LiveMetrics
    from .config import ConfigError, TrainConfig

    backend = build(cfg.backend)  # a bad backend option is one line, before Spark starts
    resume.check(cfg, backend)
    train_cfg = TrainConfig.from_cfg(cfg.train)
    snapshots.check(train_cfg, backend)
    if train_cfg.mixup and not getattr(backend, "supports_mixup", False):
        raise ConfigError(f"train.mixup={train_cfg.mixup} but backend={backend.name} does not mix its batches "
                          "(backends that do: single, mirrored); set train.mixup=0 or use one of those")
    with pipeline.data_run(cfg, overrides, spark, run_name=None, tags=pipeline.run_tags(cfg, overrides),
                           app_name=f"medspark-{cfg.dataset.name}") as stage, \
            tempfile.TemporaryDirectory(prefix="medspark-") as tmp:
        import mlflow

        from .cli import import_tensorflow

        import_tensorflow()  # TensorFlow's start-up noise filtered (cli.import_tensorflow), before a backend loads it
        data, timings = stage.data, stage.timings
        key = objective_metric(cfg.train.objective, data.task)
        mlflow.set_tag("mlflow.note.content", tracking.describe_run(cfg, data, key, overrides))
        checkpoint = resume.prepare(cfg, data, stage.run.info.run_id, backend)  # train.resume: see medspark.resume
        with LiveMetrics() as live:  # per-epoch metrics on the run as epochs end (fits in this process)
            result = backend.fit(TrainJob.from_config(cfg, data, spark=stage.spark, checkpoint=checkpoint))
        baseline = None
        if cfg.train.get("measure_baseline") and backend.name != "single":
            log.info("train.measure_baseline=true: training the `single` baseline on the same data")
            baseline = build(baseline_backend(cfg)).fit(TrainJob.from_config(cfg, data, spark=stage.spark))
        stage.stop_spark()
        timings.update(train_seconds=result.train_seconds, train_images_per_second=result.images_per_second)
        tracking.log_training(result, live)
        same = tracking.baseline_key(data.fingerprint, OmegaConf.to_container(cfg.model, resolve=True),
                                     cfg.train.epochs)
        speed = tracking.log_speedup(result, backend.name, same, baseline)
        with timings("evaluate_seconds"):
            metrics, shipped = evaluate.evaluate_split(result.model, data, Path(tmp), history=result.history,
                                                       options=OmegaConf.to_container(cfg.evaluate, resolve=True))
        with timings("log_model_seconds"):
            models = tracking.log_models(result.model, data, cfg, shipped=shipped)
        mlflow.log_metrics(dict(timings))
        mlflow.set_tag(OBJECTIVE_TAG, key)
        objective = float(metrics.get(key, float("nan")))
        champion = registry.promote(cfg.tracking, models, key, objective)  # both models' alias together
        summary = tracking.run_summary(cfg, stage.run, models, metrics, result, speed, timings, champion, key)
        summary["report"] = report.log_report(Path(tmp), metrics, data, cfg, summary)  # report.html
        mlflow.log_dict(summary, "summary.json")
    tracking.print_summary(summary, cfg.tracking.uri, json_path=tracking.write_summary(summary),
                           print_json=bool(cfg.tracking.get("print_summary_json")))
    return objective


def baseline_backend(cfg: DictConfig) -> DictConfig:
    """conf/backend/single.yaml resolved in this run's config (its threads follow cluster.cores), so that
    train.measure_baseline measures the speedup against the training `backend=single` would run."""
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.backend = OmegaConf.load(Path(config_dir()) / "backend" / "single.yaml")
    return OmegaConf.create(OmegaConf.to_container(run.backend, resolve=True))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hint = (" The same command with train.resume=true continues from the last completed epoch."
            if resume.supports(cfg.backend) else "")  # SIGTERM keeps the checkpoint of the last completed epoch
    with command_errors(stopped_hint=hint):
        return train(cfg, overrides=list(HydraConfig.get().overrides.task))


def main() -> None:
    import sys

    from .cli import exit_on_help, quiet_native_logs, resolve_cfg_by_default

    exit_on_help(sys.argv[1:])  # medspark's own --help: subcommands, groups, options, docs
    sys.argv[1:] = resolve_cfg_by_default(sys.argv[1:])  # --cfg job prints the config resolved
    quiet_native_logs()
    exit_on_bad_overrides()  # backend=nope, train.epoch=2: one line (valid options, "did you mean"), before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
