"""`medspark compare`: the runs of an experiment side by side, best first.

    medspark compare                                        # this checkout's store, medspark-synthetic, test_accuracy
    medspark compare --experiment medspark-brain_mri --sort test_macro_f1 --limit 10
    medspark compare --filter "params.model.name = 'small_cnn' and tags.medspark.backend != 'single'"
    medspark compare --uri http://mlflow.internal:5000 --metrics test_macro_f1,epochs_run --format csv

    medspark compare --paired RUN_A RUN_B                   # is A better than B on the same test images?

Paired (`--paired`, each run an MLflow run id or a test_predictions.csv path): both runs' test predictions
(evaluation/test_predictions.csv, written by evaluate.evaluate_split: sha1, label(s), probabilities, never a path)
joined on the image's sha1; refused in one line when the runs' test splits differ. Prints the difference in
accuracy (multilabel: mean AUC) with a paired bootstrap interval (images resampled together for both runs,
stratified by class), and for a binary task the AUC difference with DeLong's test:
    accuracy A - B = +0.031 [0.012, 0.050] (95%, 1000 paired resamples of 412 images): differs beyond chance
"within chance" when the interval holds 0 (DeLong: when p >= 1 - level).

Columns: run name, then what differs between the listed runs (model and backend when they do, then the params
whose values differ; paths, tracking settings and the override string left out), the sort metric, the metrics
asked for (default: train_seconds, train_images_per_second, speedup_vs_single; a column only when some run has
it), status and run id. Markdown rounds numbers (4 significant digits for params, 4 decimals for metrics); csv
keeps them exact. The parent run of a sweep (tag medspark.sweep=parent: a summary of its jobs, not a training
run) is left out unless --all. Defaults (store, experiment, objective) come from conf/config.yaml, as training
resolves them.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from pathlib import Path

import numpy as np

DEFAULT_METRICS = ("train_seconds", "train_images_per_second", "speedup_vs_single")
NOISE = ("overrides", "data_url", "data_fingerprint", "classes", "paths.", "tracking.", "hydra.")  # never "key"
PARAM_ORDER = ("train.", "model.", "backend.", "backend_", "preprocess.", "dataset.", "split.", "cluster.")
SWEEP_TAG = "medspark.sweep"  # "parent" on a sweep's parent run (medspark.sweep)
MAX_PARAM_COLUMNS = 10  # markdown only; csv gets every differing param
RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


class CompareError(Exception):
    """A request that cannot be answered; the message is the whole one-line error."""


def defaults() -> dict:
    """tracking.uri, tracking.experiment and train.objective of the project's config (conf/local included)."""
    from .config import compose_project_config

    cfg = compose_project_config()
    return {"uri": str(cfg.tracking.uri), "experiment": str(cfg.tracking.experiment),
            "objective": str(cfg.train.objective)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medspark compare", description="Compare the runs of an MLflow experiment.")
    p.add_argument("--experiment", help="experiment name (default: tracking.experiment, medspark-synthetic)")
    p.add_argument("--uri", help="tracking URI (default: tracking.uri, sqlite:///<checkout>/mlruns.db)")
    p.add_argument("--sort", help="metric to sort by (default: train.objective; auto = the metric the runs "
                                  "were judged on, test_accuracy or test_mean_auc for multilabel)")
    p.add_argument("--order", choices=("desc", "asc"), help="default: asc for *loss/*error/*seconds, else desc")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.model.name = 'small_cnn'\"")
    p.add_argument("--metrics", help="comma-separated metric columns after the sort metric "
                                     f"(default: {','.join(DEFAULT_METRICS)} where present)")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--all", action="store_true", help="also list the parent runs of sweeps (left out by default)")
    p.add_argument("--all-params", action="store_true", help="show every param that differs (markdown caps at "
                                                             f"{MAX_PARAM_COLUMNS})")
    p.add_argument("--paired", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="paired test of two runs on the same test images (run ids or test_predictions.csv paths)")
    p.add_argument("--resamples", type=int, default=1000, help="--paired: bootstrap resamples (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="--paired: interval level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="--paired: bootstrap seed (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    retries = os.environ.get(RETRIES)
    os.environ.setdefault(RETRIES, "2")  # a server that is down: an error in seconds, not minutes of retries
    try:
        print(paired(args) if args.paired else compare(args), end="")
    except CompareError as e:
        print(f"medspark compare: error: {e}", file=sys.stderr)
        return 2
    finally:
        if retries is None:
            os.environ.pop(RETRIES, None)
    return 0


def compare(args) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .config import runs_objective

    if args.limit < 1:
        raise CompareError(f"--limit {args.limit} must be >= 1")
    conf = defaults() if not (args.uri and args.experiment and args.sort) else {}
    uri, name = args.uri or conf["uri"], args.experiment or conf["experiment"]
    sort = args.sort or conf["objective"]
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"no experiment {name!r} in {uri} (experiments there: {', '.join(known) or 'none'})")
        runs = _search(client, exp.experiment_id, args.filter)
    except MlflowException as e:
        raise CompareError(f"{_first_line(e.message)} (store {uri})") from None
    except OSError as e:  # a server that is down or unreachable
        raise CompareError(f"cannot reach {uri}: {_first_line(str(e))}") from None
    parents = [] if args.all else [r for r in runs if r.data.tags.get(SWEEP_TAG) == "parent"]
    runs = [r for r in runs if args.all or r.data.tags.get(SWEEP_TAG) != "parent"]
    if not runs:
        return (f"no runs in experiment {name!r}" + (f" match {args.filter!r}" if args.filter else "")
                + (f" ({len(parents)} sweep parent run(s) left out: --all lists them)" if parents else "") + "\n")
    sort = _metric_name(runs_objective(sort, runs))
    logged = {k for r in runs for k in r.data.metrics}
    wanted = [_metric_name(m) for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    for m in [sort, *(wanted or [])]:
        if m not in logged:
            raise CompareError(f"no run in experiment {name!r} has metric {m!r} (metrics logged there: "
                               f"{_listing(sorted(logged))})")
    metrics = [m for m in (wanted if wanted is not None else [m for m in DEFAULT_METRICS if m in logged]) if m != sort]
    descending = (args.order or _default_order(sort)) == "desc"
    runs.sort(key=lambda r: _sort_key(r.data.metrics.get(sort), descending))
    runs = runs[:args.limit]
    params = differing_params(runs)
    hidden = []
    if args.format == "markdown" and not args.all_params and len(params) > MAX_PARAM_COLUMNS:
        params, hidden = params[:MAX_PARAM_COLUMNS], params[MAX_PARAM_COLUMNS:]
    identity = [c for c, get in (("model", _model), ("backend", _backend)) if len({get(r) for r in runs}) > 1]
    header = ["run_name", *identity, *params, sort, *metrics, "status", "run_id"]
    rows = [[r.info.run_name or "", *(_model(r) if c == "model" else _backend(r) for c in identity),
             *(_param(r.data.params.get(p, ""), args.format) for p in params),
             *(_fmt(r.data.metrics.get(m), args.format) for m in [sort, *metrics]),
             r.info.status, r.info.run_id if args.format == "csv" else r.info.run_id[:8]] for r in runs]
    if args.format == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue()
    left_out = f"; {len(parents)} sweep parent run(s) left out (--all lists them)" if parents else ""
    lines = [f"experiment {name!r} in {uri}: {len(rows)} run(s), sorted by {sort} "
             f"({'descending' if descending else 'ascending'}){left_out}", "", _md_row(header),
             _md_row(["---"] * (1 + len(identity) + len(params)) + ["---:"] * (1 + len(metrics)) + ["---"] * 2)]
    lines += [_md_row(r) for r in rows]
    if hidden:
        lines += ["", f"(+{len(hidden)} more differing params, see --all-params or --format csv: {_listing(hidden)})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# paired comparison of two runs on the same test images

PREDICTIONS = "evaluation/test_predictions.csv"


def write_predictions(path, sha1, y_true, probs, class_names, task: str):
    """evaluation/test_predictions.csv: sha1, then `label` (class index) or one `true_<finding>` 0/1 column per
    finding (multilabel), then `prob_<class>` per class, one row per test image in evaluation order. No path, no
    patient: a file name can carry a patient's name."""
    import pandas as pd


    y, p = np.asarray(y_true), np.asarray(probs, np.float64)
    cols = {"sha1": np.asarray(sha1).astype(str)}
    if task == "multilabel":
        cols |= {f"true_{c}": y[:, j].astype(np.int64) for j, c in enumerate(class_names)}
    else:
        cols["label"] = y.astype(np.int64)
    cols |= {f"prob_{c}": p[:, j] for j, c in enumerate(class_names)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(cols).to_csv(path, index=False, float_format="%.9g")
    return path


def read_predictions(source: str, uri: str | None = None):
    """A run's test predictions as a DataFrame: `source` a test_predictions.csv path (or a folder holding
    evaluation/test_predictions.csv), else an MLflow run id whose artifact it is."""
    import pandas as pd


    path = Path(source)
    if path.is_dir():
        path = next((c for c in (path / PREDICTIONS, path / Path(PREDICTIONS).name) if c.is_file()), path / PREDICTIONS)
    if not path.is_file():
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        try:
            path = Path(download_artifacts(run_id=source, artifact_path=PREDICTIONS, tracking_uri=uri))
        except MlflowException as e:
            if "not found" in e.message.lower() and "run" in e.message.lower():
                raise CompareError(f"run {source}: no such run in {uri} (nor a test_predictions.csv path)") from None
            raise CompareError(f"run {source}: no {PREDICTIONS} (runs evaluated before paired comparisons existed "
                               "have none: re-run them)") from None
        except OSError as e:
            raise CompareError(f"run {source}: cannot read {PREDICTIONS} from {uri}: {_first_line(str(e))}") from None
    df = pd.read_csv(path, dtype={"sha1": str})
    if "sha1" not in df or not any(c.startswith("prob_") for c in df):
        raise CompareError(f"{source}: not a test_predictions.csv (needs sha1 and prob_<class> columns)")
    return df


def join_predictions(a, b, names=("A", "B")):
    """(labels, probs A, probs B, class names, task) of two runs' predictions joined on sha1 (a repeated sha1
    pairs by order of appearance); CompareError if the test splits, labels or classes differ."""
    classes = [c[5:] for c in a.columns if c.startswith("prob_")]
    if classes != [c[5:] for c in b.columns if c.startswith("prob_")]:
        raise CompareError(f"runs {names[0]} and {names[1]} predict different classes: "
                           f"{_listing(classes)} vs {_listing(c[5:] for c in b.columns if c.startswith('prob_'))}")
    keyed = [d.assign(_k=d.groupby("sha1").cumcount()) for d in (a, b)]
    only_a = len(keyed[0].merge(keyed[1][["sha1", "_k"]], on=["sha1", "_k"], how="left", indicator=True)
                 .query("_merge == 'left_only'"))
    j = keyed[0].merge(keyed[1], on=["sha1", "_k"], suffixes=("_a", "_b"))
    if only_a or len(j) != len(b):
        raise CompareError(f"runs {names[0]} and {names[1]} were not evaluated on the same test split ({only_a} test "
                           f"image(s) only in {names[0]}, {len(b) - len(j)} only in {names[1]}): a paired comparison "
                           "needs the same test images")
    multilabel = "label" not in a
    truth = [f"true_{c}" for c in classes] if multilabel else ["label"]
    ya, yb = (j[[f"{c}_a" for c in truth]].to_numpy(), j[[f"{c}_b" for c in truth]].to_numpy())
    if not np.array_equal(ya, yb):
        raise CompareError(f"runs {names[0]} and {names[1]} label the same test images differently: not the same "
                           "data definition")
    pa = j[[f"prob_{c}_a" for c in classes]].to_numpy(np.float64)
    pb = j[[f"prob_{c}_b" for c in classes]].to_numpy(np.float64)
    task = "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass")
    return (ya if multilabel else ya[:, 0]).astype(np.int64), pa, pb, classes, task


def paired_bootstrap(y, pa, pb, task: str, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """(metric, A, B, A - B, low, high) of the difference in accuracy (multilabel: mean AUC) between two runs'
    predictions of the same images: a percentile interval over resamples that draw the same images for both
    runs (stratified by class, single-label)."""
    from . import uncertainty

    n = len(y)
    strata = None if task == "multilabel" else y
    if task == "multilabel":
        keys = [str(j) for j in range(y.shape[1])]
        stat = lambda p, w: uncertainty.multilabel_stats(y, p, keys, w)["mean_auc"]  # noqa: E731
        metric = "mean_auc"
    else:
        stat = lambda p, w: (w @ (p.argmax(1) == y)) / w.sum(1)  # noqa: E731
        metric = "accuracy"
    ones = np.ones((1, n))
    va, vb = float(stat(pa, ones)[0]), float(stat(pb, ones)[0])
    diffs = np.concatenate([stat(pa, w) - stat(pb, w)
                            for w in uncertainty.resample_weights(np.arange(n), strata, resamples, seed)])
    diffs = diffs[np.isfinite(diffs)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return metric, va, vb, va - vb, float(low), float(high)


def _midranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=-1)


def delong(y, score_a, score_b) -> tuple[float, float, float, float]:
    """DeLong's test of two correlated ROC-AUCs on the same images (DeLong et al. 1988, in Sun & Xu's 2014 fast
    midrank form, vectorised): (AUC A, AUC B, z, two-sided p). y: 0/1 labels (1 = positive); ValueError without
    positives or negatives. Identical scores: z 0, p 1."""
    from scipy.stats import norm

    pos = np.asarray(y) == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if not m or not n:
        raise ValueError("DeLong's test needs positives and negatives in the test split")
    s = np.stack([np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)])
    x, yneg = s[:, pos], s[:, ~pos]
    tx, ty, tz = _midranks(x), _midranks(yneg), _midranks(np.concatenate([x, yneg], 1))
    auc = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:, :m] - tx) / n            # per positive: fraction of negatives scored below it
    v10 = 1 - (tz[:, m:] - ty) / m        # per negative: fraction of positives scored above it
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if var <= 1e-15:
        return float(auc[0]), float(auc[1]), 0.0, 1.0
    z = float((auc[0] - auc[1]) / np.sqrt(var))
    return float(auc[0]), float(auc[1]), z, float(2 * norm.sf(abs(z)))


def paired(args) -> str:
    """`--paired RUN_A RUN_B`: the difference of two runs on the same test images, beyond chance or not."""
    run_a, run_b = args.paired
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr stays the one-line error
    if args.resamples < 1 or not 0 < args.level < 1:
        raise CompareError(f"--resamples {args.resamples} must be >= 1 and --level {args.level} in (0, 1)")
    uri = args.uri
    if uri is None and not all(os.path.exists(r) for r in (run_a, run_b)):
        uri = defaults()["uri"]
    y, pa, pb, classes, task = join_predictions(read_predictions(run_a, uri), read_predictions(run_b, uri))
    metric, va, vb, diff, low, high = paired_bootstrap(y, pa, pb, task, args.resamples, args.level, args.seed)
    verdict = "differs beyond chance" if low > 0 or high < 0 else "within chance"
    lines = [f"A = {run_a}, B = {run_b}: {len(y)} test images in common ({task})",
             f"{metric} A = {va:.4f}, B = {vb:.4f}",
             f"{metric} A - B = {diff:+.3f} [{low:.3f}, {high:.3f}] ({args.level:.0%}, {args.resamples} paired "
             f"resamples of {len(y)} images): {verdict}"]
    if task == "binary":
        try:
            auc_a, auc_b, z, p = delong(y, pa[:, 1], pb[:, 1])
        except ValueError as e:
            lines.append(f"roc_auc: {e}")
        else:
            beyond = "differs beyond chance" if p < 1 - args.level else "within chance"
            lines.append(f"roc_auc A = {auc_a:.4f}, B = {auc_b:.4f}, A - B = {auc_a - auc_b:+.3f}, "
                         f"DeLong z = {z:+.2f}, p = {p:.3g}: {beyond}")
    return "\n".join(lines) + "\n"


def differing_params(runs) -> list[str]:
    """Params with at least two different values among the runs that log them (a param only some runs have, e.g.
    a backend's own setting, counts only where it varies), minus the noise and `_target_`s, key groups first
    (train, model, backend, preprocess, dataset, split, cluster), then the rest, alphabetically."""
    keys = {k for r in runs for k in r.data.params}
    diff = [k for k in keys if not k.startswith(NOISE) and k not in ("model.name", "backend.name")
            and not k.endswith("_target_") and len({r.data.params[k] for r in runs if k in r.data.params}) > 1]

    def rank(k):
        return (next((i for i, p in enumerate(PARAM_ORDER) if k.startswith(p)), len(PARAM_ORDER)), k)
    return sorted(diff, key=rank)


def _search(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string or "", max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _metric_name(m: str) -> str:
    m = m.strip()
    return m[len("metrics."):] if m.startswith("metrics.") else m


def _default_order(metric: str) -> str:
    return "asc" if metric.endswith(("loss", "error", "seconds")) else "desc"


def _sort_key(v, descending: bool):
    """Runs without the metric (or NaN) last, whatever the order."""
    if v is None or math.isnan(v):
        return (1, 0.0)
    return (0, -v if descending else v)


def _model(run) -> str:
    return run.data.tags.get("medspark.model") or run.data.params.get("model.name", "")


def _backend(run) -> str:
    return run.data.tags.get("medspark.backend") or run.data.params.get("backend.name", "")


def _param(v: str, fmt: str) -> str:
    """A param value as the table shows it: markdown rounds a long float (an Optuna trial's 0.0003162277660168379)
    to 4 significant digits; csv keeps it as logged."""
    if fmt == "csv" or len(v) <= 6 or not any(c in v for c in ".eE"):
        return v
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


def _fmt(v, fmt: str) -> str:
    if v is None:
        return ""
    if fmt == "csv":
        return repr(float(v))
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _listing(items, n: int = 12) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _first_line(s: str) -> str:
    return (str(s).strip().splitlines() or [""])[0][:300]


if __name__ == "__main__":
    sys.exit(main())
