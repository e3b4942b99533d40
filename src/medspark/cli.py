"""The `medspark` command: training with Hydra overrides by default, plus a few subcommands.

    medspark [overrides]                   train (python -m medspark.train)
    medspark compare [options]             table of an experiment's runs (medspark.compare)
    medspark predict model=... input=...   predictions CSV from a logged/registered model (medspark.predict)
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"compare": "medspark.compare", "predict": "medspark.predict"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        sys.exit(module.main(argv[1:]))
    from .train import main as train_main

    train_main()  # checks group options (one line for backend=nope), then Hydra reads sys.argv
