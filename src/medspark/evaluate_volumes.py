"""Test metrics per file of a dataset whose files give several rows (multi-frame DICOM, NIfTI volumes: one row per
frame or slice, data/tasks.py): each file's row probabilities aggregated into one prediction per volume.

A radiologist reads a study, not a slice: the slice-level test metrics (evaluate.py) are complemented by the same
metrics over volumes, `test_volume_<metric>` (evaluate.py's own functions on the aggregated rows), with the
probabilities of a volume's rows averaged (`evaluate.volume_aggregation: mean`) or their highest value taken (`max`:
a lesion seen on one slice is enough). evaluation/volume_predictions.csv has one line per volume, named by the
file's content hash (sha1: pseudonymous, never a path or a patient's name). A set of single-row files gets nothing.
"""
from __future__ import annotations

import csv
import io

import numpy as np

AGGREGATIONS = ("mean", "max")


def check_aggregation(how) -> str:
    if how not in AGGREGATIONS:
        raise ValueError(f"evaluate.volume_aggregation={how!r} must be one of {', '.join(AGGREGATIONS)}")
    return how


def aggregate(volume_ids, y_true, probs, how: str = "mean"):
    """(ids, y, probs, rows) per volume, in order of first appearance: a volume's label is its rows' (all equal),
    its probabilities their mean or max per class."""
    check_aggregation(how)
    ids = np.asarray(volume_ids).astype(str)
    y, p = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if not len(ids) == len(y) == len(p):
        raise ValueError(f"volume ids ({len(ids)}), y_true ({len(y)}) and probs ({len(p)}) must have one row each")
    order, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    n = len(order)
    reduce = np.maximum if how == "max" else np.add
    out = np.full((n,) + p.shape[1:], -np.inf if how == "max" else 0.0)
    reduce.at(out, inverse, p)
    rows = np.bincount(inverse, minlength=n)
    if how == "mean":
        out /= rows.reshape((-1,) + (1,) * (p.ndim - 1))
    if p.ndim == 2 and how == "max" and y.ndim == 1:  # single-label: max per class, renormalised to sum to 1
        out /= out.sum(axis=1, keepdims=True)
    keep = np.argsort(first)
    return order[keep], y[first][keep], out[keep], rows[keep]


def log_volume_metrics(data, y_true, probs, how: str = "mean", prefix: str = "test_",
                       split: str = "test") -> dict[str, float]:
    """The volume-level metrics of a split that `y_true`/`probs` score row by row in file order (as evaluate_split
    reads it), logged to the active MLflow run with evaluation/volume_predictions.csv; {} when no file of the
    dataset gave several rows."""
    if not getattr(data, "volumes", 0):
        return {}
    import mlflow

    from . import evaluate
    from .data import loader
    from .data.targets import target_rows

    cols = loader.read_split(data.split_url(split), ["label", "sha1", "frame"])
    y = np.asarray(y_true)
    expected = target_rows(cols["label"], data.task, len(data.classes)) if y.ndim == 2 else cols["label"]
    if expected.shape != y.shape or not np.array_equal(expected, y):
        raise RuntimeError(f"volume metrics: the {split} split's rows ({len(cols['label'])}) do not line up with the "
                           f"{len(y)} labels evaluated; read the split in file order (loader.read_split)")
    ids, yv, pv, rows = aggregate(cols["sha1"], y, probs, check_aggregation(how))
    vprefix = f"{prefix}volume_"
    if data.multilabel:
        metrics = evaluate.multilabel_metrics(yv, pv, data.classes, prefix=vprefix)
    else:
        metrics = evaluate.classification_metrics(yv, pv, data.classes, prefix=vprefix)
    metrics[f"{vprefix}rows_per_volume"] = float(rows.mean())
    mlflow.log_metrics(metrics)
    mlflow.log_text(predictions_csv(ids, yv, pv, rows, data.classes, data.multilabel),
                    "evaluation/volume_predictions.csv")
    return metrics


def predictions_csv(ids, y, probs, rows, classes, multilabel: bool) -> str:
    """volume (sha1), rows, label(s), predicted (single-label), prob_<class> per class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["volume", "rows", "label", *([] if multilabel else ["predicted"]), *[f"prob_{c}" for c in classes]])
    for i in range(len(ids)):
        label = "|".join(c for c, t in zip(classes, y[i]) if t) if multilabel else classes[int(y[i])]
        pred = [] if multilabel else [classes[int(np.argmax(probs[i]))]]
        w.writerow([ids[i], int(rows[i]), label, *pred, *[f"{v:.6f}" for v in probs[i]]])
    return buf.getvalue()
