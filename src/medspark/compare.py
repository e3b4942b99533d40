"""`medspark compare`: the runs of an experiment side by side, best first.

    medspark compare                                        # this checkout's store, medspark-synthetic, test_accuracy
    medspark compare --experiment medspark-brain_mri --sort test_macro_f1 --limit 10
    medspark compare --filter "params.model.name = 'small_cnn' and tags.medspark.backend != 'single'"
    medspark compare --uri http://mlflow.internal:5000 --metrics test_macro_f1,epochs_run --format csv

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    retries = os.environ.get(RETRIES)
    os.environ.setdefault(RETRIES, "2")  # a server that is down: an error in seconds, not minutes of retries
    try:
        print(compare(args), end="")
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
