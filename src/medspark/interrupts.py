"""SIGTERM as an exception, so that a terminated run cleans up and says so instead of vanishing.

By default SIGTERM (`kill <pid>`, a scheduler's preemption, `docker stop`, Kubernetes) ends Python at once:
no `finally`, so the MLflow run would stay RUNNING forever and Spark would not be stopped. Inside
`terminate_raises()` (tracking.run installs it around every run) the first SIGTERM raises `Terminated` in the
main thread instead: the run ends KILLED with the reason on it, Spark stops, and the command exits with 143.
A second SIGTERM during that clean-up kills at once (the default action is restored first).

`deferred()` marks a few lines that must not be cut in half (an epoch's checkpoint and its MLflow tag): a
SIGTERM that arrives inside is raised when the block ends. SIGKILL cannot be caught; see medspark.resume for
how the next run finds and ends a run that died that way.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM: 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM. A KeyboardInterrupt (a stop request from outside, not a failure), so code
    that treats Ctrl-C as an interruption treats it alike: tracking.run ends the run KILLED, not FAILED."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}: the job was asked to stop")


_state = {"installed": 0, "depth": 0, "pending": None}


def _raise(signum: int):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while cleaning up: die at once
    raise Terminated(signum)


def _handler(signum, frame):
    if _state["depth"]:
        _state["pending"] = signum
        return
    _raise(signum)


@contextmanager
def terminate_raises():
    """Within the block, SIGTERM raises Terminated in the main thread. No-op outside the main thread (Python only
    lets the main thread install handlers) and when an enclosing block already installed it."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    _state["installed"] += 1
    try:
        yield
    finally:
        _state["installed"] -= 1
        _state["pending"] = None
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def deferred():
    """A SIGTERM arriving inside the block is raised when it ends, so the block runs whole."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"]
        if pending is not None and not _state["depth"]:
            _state["pending"] = None
            _raise(pending)
