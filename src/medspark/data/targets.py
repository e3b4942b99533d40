"""What a label is, per task: the one place that knows how targets are encoded.

binary, multiclass: one class per image; `label` is its index, the model ends in a softmax over the classes.
multilabel: zero or more findings per image (NIH ChestX-ray14's 14 findings; "No Finding" is the empty set);
`label` is the findings' bitmask (bit i = classes[i], 0 = no finding), compact and hashable on the driver and in
Spark tasks; Petastorm rows also hold the multi-hot `targets` vector the model trains on (sigmoid per finding).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

TASKS = ("binary", "multiclass", "multilabel")
MAX_FINDINGS = 31  # bits of the int32 `label` column


def task_of(task: str | None, classes: Sequence[str]) -> str:
    """The task a dataset declares, or from its class count (2: binary, more: multiclass)."""
    if not task:
        return "binary" if len(classes) == 2 else "multiclass"
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {', '.join(TASKS)}")
    if task == "multilabel" and len(classes) > MAX_FINDINGS:
        raise ValueError(f"{len(classes)} findings: multilabel datasets hold at most {MAX_FINDINGS}")
    return task


def bits(indices: Iterable[int]) -> int:
    """The bitmask of a set of finding indices."""
    out = 0
    for i in indices:
        out |= 1 << int(i)
    return out


def indices(label: int, task: str) -> list[int]:
    """The class indices a label stands for: [label] for one class, the set bits for multilabel."""
    if task != "multilabel":
        return [int(label)]
    return [i for i in range(MAX_FINDINGS) if (int(label) >> i) & 1]


def names(label: int, task: str, classes: Sequence[str], negative: str = "No Finding") -> str:
    """A label as text: the class, or the findings joined by '|' (the NIH CSV's own format; `negative` if none)."""
    found = [classes[i] for i in indices(label, task)]
    return "|".join(found) if found else negative


def multi_hot(labels, k: int) -> np.ndarray:
    """(N,) bitmasks -> (N, k) uint8 multi-hot rows."""
    labels = np.asarray(labels, np.int64).reshape(-1, 1)
    return ((labels >> np.arange(k, dtype=np.int64)) & 1).astype(np.uint8)


def one_hot(labels, k: int) -> np.ndarray:
    """(N,) class indices -> (N, k) uint8 one-hot rows."""
    return np.eye(k, dtype=np.uint8)[np.asarray(labels, np.int64)]


def target_rows(labels, task: str, k: int) -> np.ndarray:
    """The (N, k) `targets` a Petastorm row stores: multi-hot findings, or the one-hot class."""
    return multi_hot(labels, k) if task == "multilabel" else one_hot(labels, k)
