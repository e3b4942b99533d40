"""Print a markdown table of one medspark run's stage timings and test metrics, read from the MLflow store.

    .venv/bin/python benchmarks/run_report.py                       # newest run of medspark-synthetic
    .venv/bin/python benchmarks/run_report.py --experiment medspark-brain_mri [--run-id ID] [--uri URI]

The "Measured" tables of docs/performance.md are made with this script from the runs named there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medspark.config import project_root  # noqa: E402

STAGES = ["list_seconds", "preprocess_seconds", "materialize_seconds", "train_seconds", "evaluate_seconds",
          "log_model_seconds"]
RATES = ["preprocess_images_per_second", "train_images_per_second"]
QUALITY = ["test_accuracy", "test_macro_f1", "test_roc_auc_ovr", "test_n", "epochs_run", "data_listed",
           "data_accepted", "data_rejected", "data_duplicate_groups", "data_n_train", "data_n_val", "data_n_test"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default=f"sqlite:///{project_root()}/mlruns.db")
    ap.add_argument("--experiment", default="medspark-synthetic")
    ap.add_argument("--run-id")
    args = ap.parse_args(argv)
    import mlflow

    mlflow.set_tracking_uri(args.uri)
    if args.run_id:
        run = mlflow.get_run(args.run_id)
    else:
        runs = mlflow.search_runs(experiment_names=[args.experiment], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
        if not runs:
            sys.exit(f"no finished run in experiment {args.experiment} at {args.uri}")
        run = runs[0]
    m, p = run.data.metrics, run.data.params
    print(f"run `{run.info.run_id}`: model `{p.get('model.name')}`, backend `{run.data.tags.get('medspark.backend')}`, "
          f"image size {p.get('preprocess.image_size')}, epochs {p.get('train.epochs')} (max), "
          f"cluster `{p.get('cluster.name')}` cores {p.get('cluster.cores')}\n")
    print("| stage | seconds |\n|---|---:|")
    for k in STAGES:
        if k in m:
            print(f"| {k.removesuffix('_seconds')} | {m[k]:.1f} |")
    print(f"| **total (stages above)** | **{sum(m.get(k, 0) for k in STAGES):.1f}** |\n")
    print("| measure | value |\n|---|---:|")
    for k in RATES + QUALITY:
        if k in m:
            v = m[k]
            print(f"| {k} | {v:.4f} |" if k.startswith("test_") and k != "test_n" else f"| {k} | {v:,.0f} |")


if __name__ == "__main__":
    main()
