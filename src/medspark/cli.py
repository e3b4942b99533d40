"""The `medspark` command: training with Hydra overrides by default, plus a few subcommands.

    medspark [overrides]                   train (python -m medspark.train)
    medspark compare [options]             table of an experiment's runs (medspark.compare)
    medspark predict model=... input=...   predictions CSV from a logged/registered model (medspark.predict)
"""
from __future__ import annotations

import importlib
import logging
import sys
from contextlib import contextmanager

SUBCOMMANDS = {"compare": "medspark.compare", "predict": "medspark.predict"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        sys.exit(module.main(argv[1:]))
    from .train import main as train_main

    train_main()  # checks group options (one line for backend=nope), then Hydra reads sys.argv


@contextmanager
def command_errors(stopped_hint: str = ""):
    """What a command's main does with the errors a user can fix: a bad config or dataset is one line on stderr
    and exit status 2; a SIGTERM (the run already ended KILLED) is one line and exit status 143."""
    from .config import ConfigError
    from .data.sources import DatasetError
    from .interrupts import EXIT_CODE as TERMINATED_EXIT, Terminated

    try:
        yield
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        logging.getLogger("medspark").error("%s", e)
        print(f"medspark: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated as e:
        print(f"medspark: stopped: {e}; the MLflow run ended KILLED.{stopped_hint}", file=sys.stderr)
        sys.exit(TERMINATED_EXIT)
