"""The data stage alone: list the images, preprocess them on Spark and write the Petastorm splits; no training.

    python -m medspark.preprocess_only [overrides]        (`mlflow run . -e preprocess -P overrides=...`)

Same config and same fingerprinted data URL as `medspark`: a training run with the same dataset, preprocess
and split settings afterwards reuses what this wrote (its run logs data_reused=1). It records an MLflow run
(tag medspark.stage=preprocess) with the resolved config, the data counts and timings, data/rejected.csv and
data/splits.json, and prints the data URL and the counts.
"""
from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from . import pipeline
from .cli import command_errors
from .config import config_dir, exit_on_bad_overrides

log = logging.getLogger("medspark")


def preprocess(cfg: DictConfig, overrides: list[str] | tuple = (), spark=None) -> dict:
    """Materialize the dataset `cfg` describes and return what `summary.json` records."""
    tags = pipeline.run_tags(cfg, overrides) | {"medspark.stage": "preprocess"}
    with pipeline.data_run(cfg, overrides, spark, run_name=cfg.tracking.get("run_name") or
                           f"preprocess-{cfg.dataset.name}", tags=tags,
                           app_name=f"medspark-preprocess-{cfg.dataset.name}") as stage:
        import mlflow

        stage.stop_spark()
        run, data, timings = stage.run, stage.data, stage.timings
        mlflow.log_metrics(dict(timings))
        summary = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "data_url": data.url,
                   "fingerprint": data.fingerprint, "reused": data.reused, "classes": list(data.classes),
                   "counts": data.summary(), "sizes": data.sizes,
                   "seconds": {k: round(v, 1) for k, v in timings.items()}}
        mlflow.log_dict(summary, "summary.json")
    print("\n=== medspark preprocess finished ===", flush=True)
    print(json.dumps(summary, indent=2))
    print(f"data:     {data.url}  ({'reused' if data.reused else 'written'}; "
          f"train/val/test = {data.sizes['train']}/{data.sizes['val']}/{data.sizes['test']}, "
          f"{len(data.rejected)} rejected)")
    print(f"run id:   {summary['run_id']}", flush=True)
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with command_errors():  # SIGTERM: an unfinished dataset has no manifest and is rebuilt by the next run
        preprocess(cfg, overrides=list(HydraConfig.get().overrides.task))


def main() -> None:
    exit_on_bad_overrides()  # backend=nope: one line naming the group's options, before Hydra composes
    _hydra_main()


if __name__ == "__main__":
    main()
