"""Time to accuracy: test accuracy against wall-clock training minutes, epoch by epoch, one curve per recipe.

    .venv/bin/python benchmarks/time_to_accuracy.py \
        --recipe current="experiment=brain_mri_small_cnn" --recipe res_cnn="experiment=brain_mri_res_cnn" \
        --seeds 42 43 44 --budget-minutes 30 --save-results --resume -- dataset.root=../shared/datasets/brain-tumor-mri
    mlflow run . -e bench_time_to_accuracy -P seeds="42 43 44" --env-manager local     # the same defaults

Each (recipe, seed) trains in its own process (a fresh TensorFlow) through the real pipeline: the dataset is listed,
preprocessed on Spark and read from Petastorm as `medspark` does, the model is built from `conf/model/` and trained
by the one fit path (backends/keras_fit.fit, as backend=single). A recipe with another backend (backend=ensemble:
bagging, its members trained at once as Spark tasks) is trained by that backend and scored once, at the end of its
fit (one point at its wall-clock minutes). After every epoch the test split is predicted (its
time is not counted as training time) and recorded: training minutes so far, test accuracy, recall per class, and the
sensitivity for "any lesion" (--negative names the class whose confusion with the others is the costly error:
`notumor` calls a tumour "no tumour"). Training stops after --budget-minutes of training time. The model's
multiply-adds per image and parameters go with it. The first recipe is the reference: the table gives every recipe's
minutes to reach the reference's final accuracy and the ratio. Machines differ by 2-3x in speed: compare recipes
measured in the same invocation.

Results: one MLflow run per (recipe, seed) in the experiment `medspark-bench-time-to-accuracy` (per-epoch metrics
`curve_*` with step = epoch) and a summary run with the table (markdown), the plot (PNG) and every run's curve
(JSON); to benchmarks/results/ only with --save-results (results_folder.py). Each finished (recipe, seed) is kept in
the results folder's <name>_runs/ as it ends (--name, default time_to_accuracy: one name per comparison, e.g.
time_to_accuracy_chest); --resume reuses those, so an hours-long comparison can be run
in parts (the table and plot are remade from all of them).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import results_folder  # benchmarks/results_folder.py: where the result files go

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "medspark-bench-time-to-accuracy"


# ---------------------------------------------------------------- one (recipe, seed): runs in its own process

def train_one(name: str, seed: int, given: list[str], budget_minutes: float, negative: str | None,
              out: Path, data_seed: int = 42, uri: str | None = None, subsets: dict | None = None) -> dict:
    """Train one recipe through the real pipeline, predicting the test split after every epoch. `seed` varies the
    weights and the batches; the split stays the same for every recipe and seed (`data_seed`). `subsets`: name ->
    a path fragment; the final weights are also scored on the test rows whose source path contains it."""
    from medspark import pipeline, tracking, tta
    from medspark.backends import keras_fit
    from medspark.backends.api import TrainJob
    from medspark.backends.schedule import snapshot_ends
    from medspark.cli import import_tensorflow
    from medspark.config import compose_project_config
    from medspark.data import loader
    from medspark.models import flops_per_image

    overrides = [*given, *([f"tracking.uri={uri}"] if uri else []), f"seed={seed}", f"split.seed={data_seed}",
                 "tracking.register=never", f"tracking.experiment={EXPERIMENT}", f"tracking.run_name=tta-{name}-s{seed}"]
    cfg = compose_project_config(overrides)
    tags = pipeline.run_tags(cfg, overrides) | {"medspark.bench": "time_to_accuracy", "medspark.recipe": name}
    with pipeline.data_run(cfg, overrides, run_name=None, tags=tags, app_name=f"bench-tta-{name}") as stage:
        import mlflow

        data = stage.data
        spread = str(cfg.backend.name) != "single"  # e.g. ensemble: trains in Spark tasks, scored once, at its end
        if not spread:
            stage.stop_spark()
        import_tensorflow()
        job = TrainJob.from_config(cfg, data, spark=stage.spark)
        test = loader.read_split(data.split_url("test"), ("image", "label", "path"))  # one pass: rows aligned
        x_test, y_test = test["image"], test["label"].astype("int32")
        if spread:
            from medspark.backends import build

            result = build(cfg.backend).fit(job)
        else:
            curve = _curve_callback(x_test, y_test, data.classes, negative, budget_minutes,
                                    snapshot_ends(job.train))
            bs = job.train.batch_size
            train_ds = job.dataset("train", True, bs)
            val_ds = job.dataset("val", False, bs) if data.sizes["val"] else None
            result = keras_fit.fit(job, train_ds, val_ds, batch_size=bs, extra_callbacks=(curve,))
        predict = functools.partial(result.model.predict, batch_size=128, verbose=0)
        probs = np.asarray(predict(x_test))
        final = _scores(probs, y_test, data.classes, negative)  # the weights fit() kept (early stopping: the best)
        if spread:  # one point: the backend's whole fit (its wall time: parallel members overlap)
            rows = [{"epoch": job.train.epochs, "minutes": result.train_seconds / 60, **final,
                     "val_accuracy": float("nan")}]
            _log_point(rows[0])
        else:
            rows = curve.rows
        final_subsets = {}
        for sub, fragment in (subsets or {}).items():
            keep = np.array([fragment in str(p) for p in test["path"]])
            if not keep.any():
                raise SystemExit(f"--subset {sub}={fragment}: no test image's path contains {fragment!r}")
            final_subsets[sub] = {"images": int(keep.sum()), **_scores(probs[keep], y_test[keep], data.classes,
                                                                         negative)}
        # test-time augmentation measured on the same weights (a paired comparison, no training): evaluate.tta's views
        final_tta = {mode: _scores(tta.predict(predict, x_test, mode), y_test, data.classes, negative)
                     for mode in tta.MODES if mode != "none"}
        summary = {"recipe": name, "seed": seed, "given": given, "overrides": overrides, "run_id": stage.run.info.run_id,
                   "flops_per_image": flops_per_image(result.model), "params": int(result.model.count_params()),
                   "image_size": int(data.shape[0]), "train_images": int(data.sizes["train"]),
                   "test_images": int(len(y_test)), "curve": rows, "final": final, "final_tta": final_tta,
                   "final_subsets": final_subsets,
                   "train_minutes": rows[-1]["minutes"] if rows else 0.0, "budget_minutes": budget_minutes}
        mlflow.log_metrics({"flops_per_image": summary["flops_per_image"], "params": summary["params"],
                            **{f"final_{k}": v for k, v in final.items() if isinstance(v, float)}})
        mlflow.log_dict(summary, "time_to_accuracy.json")
        tracking.log_training(result)
    out.write_text(json.dumps(summary))
    return summary


def _scores(probs: np.ndarray, y: np.ndarray, classes, negative: str | None) -> dict:
    """The test metrics medspark logs for a run (evaluate.classification_metrics): accuracy, balanced accuracy,
    one-vs-rest AUC (binary: the ordinary AUC), recall per class; plus the sensitivity for "any lesion"."""
    from medspark.evaluate import classification_metrics, metric_key_names

    m = classification_metrics(y, probs, classes, prefix="")
    out = {"test_accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
           "auc": m.get("roc_auc_ovr", float("nan")),  # absent when a class is missing from the test split
           **{f"recall_{c}": m[f"recall_{key}"] if m[f"support_{key}"] else float("nan")  # absent: no recall
              for c, key in zip(classes, metric_key_names(classes))}}
    if negative in classes:
        n = list(classes).index(negative)
        pred, sick = probs.argmax(1), y != n
        out["lesion_sensitivity"] = float((pred[sick] != n).mean()) if sick.any() else float("nan")
    return out


def _log_point(row: dict) -> None:
    """One point of the curve into the run: every score as `curve_<name>`, step = the epoch."""
    import mlflow

    mlflow.log_metrics({f"curve_{k}": float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def _curve_callback(x_test, y_test, classes, negative, budget_minutes: float, ends=()):
    """Keras callback: test scores after every epoch against training minutes (its own time excluded); stops training
    once the budget is spent. With train.snapshots (`ends`: the cycles' last epochs) the scores are those of the
    model fit would return if training stopped there: the vote of the snapshots so far and the current weights."""
    import keras

    class Curve(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows, self.train_seconds, self.kept = [], 0.0, []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.train_seconds += time.perf_counter() - self.t0
            probs = np.asarray(self.model.predict(x_test, batch_size=128, verbose=0))
            if epoch + 1 in ends:
                self.kept.append(probs)
            probs = np.mean([*self.kept, *([] if epoch + 1 in ends else [probs])], axis=0)
            row = {"epoch": epoch + 1, "minutes": self.train_seconds / 60, **_scores(probs, y_test, classes, negative),
                   "val_accuracy": float((logs or {}).get("val_accuracy", float("nan")))}
            self.rows.append(row)
            _log_point(row)
            print(f"[time-to-accuracy] epoch {row['epoch']}: {row['minutes']:.2f} min, test accuracy "
                  f"{row['test_accuracy']:.4f}", flush=True)
            if self.train_seconds >= budget_minutes * 60:
                self.model.stop_training = True

    return Curve()


# ---------------------------------------------------------------- the comparison

def minutes_to(rows: list[dict], target: float) -> float:
    """Training minutes at the first epoch whose test accuracy reaches target (NaN: never)."""
    return next((r["minutes"] for r in rows if r["test_accuracy"] >= target - 1e-12), float("nan"))


def table(results: list[dict]) -> str:
    """One row per recipe (mean and spread over seeds): final test accuracy (the model fit returned), the same with
    flip test-time augmentation (same weights), balanced accuracy, AUC, the best epoch's accuracy, training minutes;
    the minutes to reach the reference's (first recipe's) mean final accuracy, over the seeds that reached it, and
    their ratio to the reference's mean training minutes (its whole run: "the current recipe's accuracy in what
    fraction of its time"); FLOPs, parameters, recall per class, lesion sensitivity. Then, with --subset, the final
    scores on each subset of the test split."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)
    ref_name = results[0]["recipe"]
    ref_acc = float(np.mean([r["final"]["test_accuracy"] for r in by[ref_name]]))
    ref_min = float(np.mean([r["train_minutes"] for r in by[ref_name]]))
    classes = [k[len("recall_"):] for k in results[0]["final"] if k.startswith("recall_")]
    head = ["recipe", "seeds", "test accuracy", "with flip TTA", "balanced acc.", "AUC", "best epoch acc", "train min",
            f"min to {ref_acc:.3f} (seeds)", f"÷ {ref_min:.1f} min", "MFLOPs/img", "params",
            *[f"recall {c}" for c in classes], "lesion sens."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in by.items():
        acc = [r["final"]["test_accuracy"] for r in rs]
        reach = [minutes_to(r["curve"], ref_acc) for r in rs]
        got = [m for m in reach if not np.isnan(m)]
        balanced = [r["final"].get("balanced_accuracy", np.nanmean([r["final"][f"recall_{c}"] for c in classes]))
                    for r in rs]
        flip = [r["final_tta"]["flip"]["test_accuracy"] for r in rs if "final_tta" in r]  # runs before it: none
        cells = [name, str(len(rs)), _pm(acc), _pm(flip) if flip else "-", _pm(balanced),
                 _pm([r["final"].get("auc", float("nan")) for r in rs]),
                 _pm([max(x["test_accuracy"] for x in r["curve"]) for r in rs]),
                 _pm([r["train_minutes"] for r in rs], "{:.1f}"),
                 f"{_pm(got, '{:.1f}')} ({len(got)}/{len(rs)})",
                 f"{np.mean(got) / ref_min:.2f}" if got and ref_min else "-",
                 f"{rs[0]['flops_per_image'] / 1e6:.0f}", f"{rs[0]['params']:,}",
                 *[_pm([r["final"][f"recall_{c}"] for r in rs]) for c in classes],
                 _pm([r["final"].get("lesion_sensitivity", float("nan")) for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    subsets = sorted({k for r in results for k in r.get("final_subsets", {})})
    if subsets:
        lines += ["", "| recipe | seeds | test subset | images | accuracy | balanced acc. | AUC |",
                  "|---|---|---|---|---|---|---|"]
        for name, rs in by.items():
            for sub in subsets:
                got = [r["final_subsets"][sub] for r in rs if sub in r.get("final_subsets", {})]
                if got:
                    lines.append(f"| {name} | {len(got)} | {sub} | {got[0]['images']} | "
                                 f"{_pm([g['test_accuracy'] for g in got])} | "
                                 f"{_pm([g['balanced_accuracy'] for g in got])} | {_pm([g['auc'] for g in got])} |")
    return "\n".join(lines) + "\n"


def _pm(values, fmt: str = "{:.3f}") -> str:
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "-"
    return fmt.format(np.nanmean(v)) + (f" ± {fmt.format(np.nanstd(v))}" if len(v) > 1 else "")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in results:
        c = colors.setdefault(r["recipe"], f"C{len(colors)}")
        one = len(r["curve"]) == 1  # a backend scored once, at its end (ensemble): a square
        ax.plot([x["minutes"] for x in r["curve"]], [x["test_accuracy"] for x in r["curve"]], "s" if one else "-o",
                ms=7 if one else 2.5, color=c,
                label=r["recipe"] if sum(1 for q in results if q["recipe"] == r["recipe"]) == 1 or r["seed"] ==
                min(q["seed"] for q in results if q["recipe"] == r["recipe"]) else None)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="extend", nargs="+", default=[], metavar="NAME=OVERRIDES",
                    help="named recipes, each its Hydra overrides in one string; the first is the reference")
    ap.add_argument("--seeds", nargs="+", default=["42"], help="seeds (also as one string: '42 43 44')")
    ap.add_argument("--data-seed", type=int, default=42, help="split.seed of every run: one test split for all")
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="training minutes after which a run stops")
    ap.add_argument("--negative", default="notumor", help="the 'no lesion' class (lesion sensitivity); none: off")
    ap.add_argument("--uri", default=f"sqlite:///{ROOT}/mlruns.db")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the runs already in the results folder's <name>_runs/ whose overrides are "
                         "the same (with --out or --save-results): a long comparison can go on where it stopped")
    results_folder.add_arguments(ap)
    ap.add_argument("--name", default="time_to_accuracy",
                    help="the comparison's file names: <name>.md, .png, .json and <name>_runs/")
    ap.add_argument("--subset", action="append", default=[], metavar="NAME=PATH_FRAGMENT",
                    help="also score the final weights on the test images whose path contains PATH_FRAGMENT, e.g. "
                         "official=/test/ (a dataset's own test folder among the images moved into the test split)")
    ap.add_argument("--one", nargs=3, metavar=("NAME", "SEED", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    negative = None if args.negative == "none" else args.negative
    args.seeds = [int(s) for word in args.seeds for s in word.split()]
    if any("=" not in s for s in args.subset):
        sys.exit(f"--subset takes NAME=PATH_FRAGMENT, got {args.subset}")
    subsets = dict(s.split("=", 1) for s in args.subset)
    if args.one:
        name, seed, out = args.one
        train_one(name, int(seed), common, args.budget_minutes, negative, Path(out), args.data_seed, args.uri,
                  subsets)
        return
    recipes = [r.split("=", 1) if "=" in r else (r, "") for r in args.recipe] or [("current", "")]
    if len({n for n, _ in recipes}) < len(recipes):
        sys.exit("two --recipe share a name: give each its own NAME=")
    out_dir = results_folder.folder(args)  # a temporary folder unless --save-results or --out
    runs_dir = out_dir / f"{args.name}_runs"
    runs_dir.mkdir(exist_ok=True)
    parent = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run -e bench_time_to_accuracy`: its run is the summary
    env = dict(os.environ, MEDSPARK_PARENT_RUN_ID=parent) if parent else None  # the (recipe, seed) runs: its children
    results, failed = [], []
    # seed-major: an interrupted comparison still has every recipe at the seeds it finished
    for seed in args.seeds:
        for name, over in recipes:
            out = runs_dir / f"{name}-s{seed}.json"
            overrides = [*over.split(), *common]
            if args.resume and out.exists():
                done = json.loads(out.read_text())
                if done.get("given") == overrides and done.get("budget_minutes") == args.budget_minutes:
                    print(f"### {name} seed {seed}: reused {out}", flush=True)
                    results.append(done)
                    continue
            cmd = [sys.executable, __file__, "--one", name, str(seed), str(out), "--uri", args.uri,
                   "--budget-minutes", str(args.budget_minutes), "--negative", args.negative,
                   "--data-seed", str(args.data_seed), *[f"--subset={s}" for s in args.subset], "--", *overrides]
            print(f"\n### {name} seed {seed}: {' '.join(overrides)}", flush=True)
            t = time.perf_counter()
            out.unlink(missing_ok=True)
            if subprocess.run(cmd, cwd=ROOT, env=env).returncode or not out.exists():
                failed.append(f"{name}/{seed}")
                continue
            results.append(json.loads(out.read_text()))
            print(f"### {name} seed {seed}: {time.perf_counter() - t:.0f} s wall", flush=True)
    if not results:
        sys.exit(f"every run failed: {', '.join(failed)}")
    order = {n: i for i, (n, _) in enumerate(recipes)}
    results.sort(key=lambda r: (order[r["recipe"]], r["seed"]))  # the reference first: the table's first row
    md = table(results)
    print("\n" + md)
    files = [out_dir / f"{args.name}.{ext}" for ext in ("md", "png")]  # the curves themselves: <name>_runs/
    files[0].write_text(md)
    plot(results, files[1])
    import mlflow

    mlflow.set_tracking_uri(args.uri)
    if not parent:
        mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_id=parent, run_name=f"bench-{args.name}-summary".replace("_", "-"),
                          tags={"medspark.bench": "summary"}):
        given = mlflow.active_run().data.params  # `mlflow run` logged its own -P values: params cannot change
        mlflow.log_params({(f"bench_{k}" if k in given else k): v for k, v in {
            "recipes": " | ".join(f"{n}: {o}" for n, o in recipes)[:6000], "seeds": " ".join(map(str, args.seeds)),
            "budget_minutes": args.budget_minutes, "common_overrides": " ".join(common)[:6000]}.items()})
        for r in results:
            mlflow.log_metric(f"{r['recipe']}_s{r['seed']}_test_accuracy", r["final"]["test_accuracy"])
        for f in files:
            mlflow.log_artifact(str(f))
        mlflow.log_dict(results, f"{args.name}.json")
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
