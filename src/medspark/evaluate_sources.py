"""Test metrics per source of a merged dataset (data/sources/merged.py): each source's test images scored apart.

Public sets differ in scanners, resolution and preprocessing, so a model can be good on one source and poor on
another while the pooled figure looks fine. For each source in the test split: `test_source_<name>_n`,
`_accuracy` and `_balanced_accuracy` (single-label; `_roc_auc` too, for binary when the source's test images hold
both classes), or for multilabel `_mean_auc` and `_mean_ap`, computed by evaluate.py's own functions on the
source's rows, logged as metrics and as evaluation/per_source.json. A single-source dataset gets nothing.
"""
from __future__ import annotations

import numpy as np

SINGLE_LABEL = {"n": "n", "accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "roc_auc_ovr": "roc_auc"}
MULTILABEL = {"n": "n", "mean_auc": "mean_auc", "mean_ap": "mean_ap"}


def per_source(y_true, probs, sources, class_names, task: str = "") -> dict[str, dict[str, float]]:
    """Source name -> its metrics, for each source named in `sources` (one per row; "" = no source). y_true and
    probs as evaluate.classification_metrics takes them (multilabel: evaluate.multilabel_metrics). The binary AUC
    is left out for a source whose rows hold one class (undefined), the macro AUC of 3+ classes always (over the
    classes one source happens to hold it would mislead)."""
    from . import evaluate

    sources = np.asarray(sources).astype(str)
    y, p = np.asarray(y_true), np.asarray(probs)
    if not len(sources) == len(y) == len(p):
        raise ValueError(f"sources ({len(sources)}), y_true ({len(y)}) and probs ({len(p)}) must have one row each")
    multilabel = task == "multilabel"
    keep = MULTILABEL if multilabel else SINGLE_LABEL
    out = {}
    for name in sorted(set(sources.tolist()) - {""}):
        rows = sources == name
        if multilabel:
            m = evaluate.multilabel_metrics(y[rows], p[rows], class_names, prefix="")
        else:
            m = evaluate.classification_metrics(y[rows], p[rows], class_names, prefix="")
            if len(class_names) > 2:
                m.pop("roc_auc_ovr", None)
        out[name] = {new: float(m[old]) for old, new in keep.items() if old in m}
    return out


def flat(table: dict[str, dict[str, float]], prefix: str = "test_") -> dict[str, float]:
    """`{prefix}source_<name>_<metric>` keys for MLflow."""
    return {f"{prefix}source_{name}_{metric}": v for name, m in table.items() for metric, v in m.items()}


def split_columns(data, y_true, columns, split: str = "test", what: str = "evaluation") -> dict[str, np.ndarray]:
    """Columns of a split (loader.read_split) row by row beside the labels `y_true` that predict_split read from it
    (file order), checked to line up with them: RuntimeError if they do not."""
    from .data import loader
    from .data.targets import target_rows

    cols = loader.read_split(data.split_url(split), ["label", *columns])
    y = np.asarray(y_true)
    expected = target_rows(cols["label"], data.task, len(data.classes)) if y.ndim == 2 else cols["label"]
    if expected.shape != y.shape or not np.array_equal(expected, y):
        raise RuntimeError(f"{what}: the {split} split's rows ({len(cols['label'])}) do not line up with "
                           f"the {len(y)} labels evaluated; read the split in file order (loader.read_split)")
    return cols


def log_source_metrics(data, y_true, probs, prefix: str = "test_", split: str = "test") -> dict[str, float]:
    """The per-source metrics of a split that `y_true`/`probs` score row by row in file order (as evaluate_split
    reads it), logged to the active MLflow run (metrics, evaluation/per_source.json); {} without sources."""
    if not (getattr(data, "per_source", None) or {}).get(split):
        return {}
    import mlflow

    cols = split_columns(data, y_true, ["source"], split, "per-source metrics")
    table = per_source(np.asarray(y_true), probs, cols["source"], data.classes, data.task)
    metrics = flat(table, prefix)
    mlflow.log_metrics(metrics)
    mlflow.log_dict(table, "evaluation/per_source.json")
    return metrics
