"""Where a benchmark's result files (tables, JSON, plots) go. By default a temporary folder: the files reach the
benchmark's MLflow run as artifacts (with its metrics) and nowhere else, so a run never overwrites the committed
results. `--save-results` (or `-P save_results=true` through `mlflow run`) also writes them to benchmarks/results/,
the files the docs cite; `--out PATH` writes them to PATH."""
from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "")


def yes_no(value: str) -> bool:
    if str(value).lower() in TRUE + FALSE:
        return str(value).lower() in TRUE
    raise argparse.ArgumentTypeError(f"{value!r}: say true or false")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the result files (default: a temporary one; the files go to the MLflow run)")
    ap.add_argument("--save-results", type=yes_no, nargs="?", const=True, default=False, metavar="true|false",
                    help=f"write the result files to {RESULTS} too (the committed results the docs cite)")


def folder(args: argparse.Namespace) -> Path:
    """--out, else benchmarks/results with --save-results, else a temporary folder removed at exit (created)."""
    if args.out is not None:
        out = Path(args.out)
    elif args.save_results:
        out = RESULTS
    else:
        out = Path(tempfile.mkdtemp(prefix="medspark-bench-"))
        atexit.register(shutil.rmtree, out, True)
    out.mkdir(parents=True, exist_ok=True)
    return out
