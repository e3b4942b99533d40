"""Every backend on the same data, model and epochs: a table and a plot of accuracy, time and speedup.

    .venv/bin/python benchmarks/backends.py                        # all backends, synthetic 4 x 300, 128 px
    .venv/bin/python benchmarks/backends.py --backends single elephas_sync --epochs 3 -- model=dense
    .venv/bin/python benchmarks/backends.py --per-class 40 --image-size 32 --epochs 1   # a quick check
    .venv/bin/python benchmarks/backends.py --save-results          # also rewrite benchmarks/results/backends.*

Each backend runs as its own `python -m medspark.train` process (a fresh TensorFlow, as a user runs it),
`single` first: the others' speedup_vs_single is against it (same data fingerprint, model and epochs).
--per-class and --image-size size the synthetic data (dataset.generate.per_class, dataset.generate.size and
preprocess.image_size; unset: conf/'s defaults). The table (markdown) and the plot are logged, with the
per-backend figures, to a summary run in the MLflow experiment `medspark-bench-backends`, and written to
benchmarks/results/ only with --save-results (results_folder.py). Arguments after `--` go to every run (they win).
Launched by `mlflow run . -e benchmark` (MLFLOW_RUN_ID set), that run is the summary run and the backends'
runs are its children, in its experiment.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import results_folder  # benchmarks/results_folder.py: where the result files go

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["single", "mirrored", "elephas_sync", "elephas_async", "elephas_hogwild", "spark_barrier", "ensemble"]
EXPERIMENT = "medspark-bench-backends"


def run_all(args, extra: list[str], env: dict | None = None) -> list[str]:
    failed = []
    for backend in args.backends:
        cmd = [sys.executable, "-m", "medspark.train", f"backend={backend}", f"train.epochs={args.epochs}",
               "train.early_stopping.patience=0", f"tracking.uri={args.uri}", f"tracking.experiment={EXPERIMENT}",
               f"tracking.run_name=bench-{backend}", "tracking.register=never", *extra]  # never the production name
        print(f"\n### {backend}: {' '.join(cmd[3:])}", flush=True)
        t = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
            failed.append(backend)
        print(f"### {backend}: {time.perf_counter() - t:.0f} s wall", flush=True)
    return failed


def data_size(per_class: int | None, image_size: int | None) -> list[str]:
    """The overrides that size the synthetic data of every backend's run."""
    out = [f"dataset.generate.per_class={per_class}"] if per_class else []
    if image_size:
        out += [f"dataset.generate.size={image_size}", f"preprocess.image_size={image_size}"]
    return out


def table(runs) -> tuple[str, list[dict]]:
    rows = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        rows.append({"backend": r.data.tags["medspark.backend"], "workers": p.get("workers", "?"),
                     "global batch": p.get("global_batch_size", "?"), "epochs": int(m.get("epochs_run", 0)),
                     "test accuracy": m.get("test_accuracy", float("nan")),
                     "train s": m.get("train_seconds", float("nan")),
                     "images/s": m.get("train_images_per_second", float("nan")),
                     "speedup": m.get("speedup_vs_single", float("nan")),
                     "efficiency": m.get("parallel_efficiency", float("nan"))})
    head = list(rows[0]) if rows else []
    fmt = {"test accuracy": "{:.3f}", "train s": "{:.1f}", "images/s": "{:.1f}", "speedup": "{:.2f}",
           "efficiency": "{:.2f}"}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.get(k, "{}").format(v) for k, v in row.items()) + " |")
    return "\n".join(lines) + "\n", rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["backend"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("test accuracy", "images/s", "speedup"),
                              ("test accuracy", "training images/s", "speedup vs single")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    axes[2].axhline(1.0, color="gray", lw=1, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=BACKENDS)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=None, help="synthetic images per class (default: conf's)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the images, generated and trained on")
    ap.add_argument("--uri", default=f"sqlite:///{ROOT}/mlruns.db")
    results_folder.add_arguments(ap)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    extra = data_size(args.per_class, args.image_size) + extra
    if args.backends[0] != "single":
        args.backends = ["single"] + [b for b in args.backends if b != "single"]
    started = time.time() * 1000
    parent = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run -e benchmark`: its run is the summary run
    env = dict(os.environ, MEDSPARK_PARENT_RUN_ID=parent) if parent else None  # the backends' runs: its children
    failed = run_all(args, extra, env)

    import mlflow

    mlflow.set_tracking_uri(args.uri)
    if parent:
        runs = mlflow.search_runs(experiment_ids=[mlflow.get_run(parent).info.experiment_id], output_format="list",
                                  order_by=["attributes.start_time"], filter_string=(
                                      f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'"))
    else:
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                  order_by=["attributes.start_time"], filter_string=(
                                      f"attributes.start_time >= {int(started)} and attributes.status = 'FINISHED'"))
    runs = [r for r in runs if r.data.tags.get("medspark.bench") != "summary"]
    md, rows = table(runs)
    args.out = results_folder.folder(args)  # a temporary folder unless --save-results or --out
    (args.out / "backends.md").write_text(md)
    plot(rows, args.out / "backends.png")
    print("\n" + md)
    with mlflow.start_run(run_id=parent, run_name="bench-backends-summary", tags={"medspark.bench": "summary"}) \
            if parent else mlflow.start_run(experiment_id=runs[0].info.experiment_id if runs else None,
                                            run_name="bench-backends-summary", tags={"medspark.bench": "summary"}):
        given = mlflow.active_run().data.params  # `mlflow run` logged its own -P values: params cannot change
        mlflow.log_params({(f"bench_{k}" if k in given else k): v for k, v in {
            "backends": " ".join(args.backends), "epochs": args.epochs, "overrides": " ".join(extra),
            "per_class": args.per_class or "default", "image_size": args.image_size or "default",
            "save_results": args.save_results}.items()})
        for r in rows:
            mlflow.log_metrics({f"{r['backend']}_{k.replace(' ', '_').replace('/', '_per_')}": float(r[k])
                                for k in ("test accuracy", "train s", "images/s", "speedup", "efficiency")})
        mlflow.log_artifact(str(args.out / "backends.md"))
        mlflow.log_artifact(str(args.out / "backends.png"))
    if failed:
        sys.exit(f"failed backends: {', '.join(failed)}")


if __name__ == "__main__":
    main()
