"""Bootstrap confidence intervals of the test metrics: how sure we are of each number evaluation logs.

Percentile intervals (`evaluate.bootstrap: {resamples, level, seed}`; resamples 0 = off) for accuracy, balanced
accuracy, macro F1, the macro AUC and, per class, AUC, sensitivity and specificity (multilabel: per finding AUC and
the mean AUC), plus sensitivity/specificity/PPV/NPV at a binary operating point when one is given. Logged as
`test_<metric>_ci_low` / `test_<metric>_ci_high` and written to evaluation/intervals.csv (INTERVAL_COLUMNS).

What is resampled: test PATIENTS when the test rows carry a patient (several images of one patient are not
independent evidence: all of a patient's images go in or out together; a row without a patient is its own unit),
else test images. Resampling is stratified by class for binary and multiclass (each class keeps its number of
images, or of patients, a patient's class being the label of its first test image), so every resample holds every
class the test split holds; multilabel resamples are not stratified (findings overlap).

Vectorised: a resample is a row of per-image weights (how many times each image was drawn), so every metric is a
weighted metric over the same arrays, computed for a chunk of resamples at once (`resample_weights`,
`single_label_stats`, `multilabel_stats`; 1,000 resamples of 1,000 images take well under a second).

Degenerate resamples: a metric undefined in a resample (an AUC without positives or negatives, the sensitivity of a
class without images, the PPV when nothing is called positive) is NaN in that resample only and the interval is the
percentile of the resamples where it is defined; `resamples` in intervals.csv says how many. Fewer than half of
them defined: no interval (an empty row in intervals.csv, no metric), never a NaN in MLflow. F1 follows evaluate.py
(zero_division=0), so it is always defined.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INTERVAL_COLUMNS = ("metric", "value", "ci_low", "ci_high", "resamples", "unit")
DEFAULTS = {"resamples": 1000, "level": 0.95, "seed": 0}
MIN_DEFINED = 0.5  # fraction of resamples in which a metric must be defined to get an interval
_CHUNK_CELLS = 2_000_000  # resamples x images per chunk: bounds memory (16 MB of float64 weights)


@dataclass(frozen=True)
class Interval:
    """One metric's point estimate (on the test split as it is) and its bootstrap interval (None: not enough
    resamples defined it); resamples: how many resamples defined it; unit: images | patients."""
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    resamples: int
    unit: str


def check_options(options: Mapping | None) -> dict:
    """The `evaluate.bootstrap` mapping with its defaults; ValueError naming the key for anything wrong."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"evaluate.bootstrap={options!r} must be a mapping: {{resamples: 1000, level: 0.95, "
                         "seed: 42}")
    opts = dict(DEFAULTS)
    unknown = set(options or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown evaluate.bootstrap option(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    opts.update({k: v for k, v in (options or {}).items() if v is not None})
    r, level, seed = opts["resamples"], opts["level"], opts["seed"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"evaluate.bootstrap.resamples={r!r} must be an integer >= 0 (0 = no intervals; 1000 is "
                         "usual)")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"evaluate.bootstrap.level={level!r} must be a number in (0, 1), e.g. 0.95")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"evaluate.bootstrap.seed={seed!r} must be an integer")
    return opts


# ---------------------------------------------------------------------------------------------------------
# resampling

def units_of(patients: Sequence | None, n: int) -> tuple[np.ndarray, str]:
    """(unit id per row, "patients" | "images"): rows sharing a non-empty patient share a unit; a row without a
    patient ("" or None) is its own unit. No patient at all: one unit per image."""
    if patients is None:
        return np.arange(n), "images"
    pats = np.asarray(["" if v is None else str(v) for v in patients], dtype=object)
    if len(pats) != n:
        raise ValueError(f"patients has {len(pats)} rows but there are {n} predictions")
    has = pats != ""
    if not has.any():
        return np.arange(n), "images"
    keys = [f"p:{v}" if v else f"i:{i}" for i, v in enumerate(pats)]
    _, ids = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    return ids.ravel(), "patients"


def resample_weights(units: np.ndarray, strata: np.ndarray | None, resamples: int, seed: int,
                     chunk: int | None = None) -> Iterator[np.ndarray]:
    """Chunks of (r, n) float64 per-image weights, `resamples` rows in all: each row draws as many units as there
    are, with replacement, within each stratum (strata: one value per unit; None = one stratum), and gives each
    image its unit's draw count. Deterministic for a seed."""
    units = np.asarray(units)
    n_units = int(units.max()) + 1 if units.size else 0
    strata = np.zeros(n_units, np.int64) if strata is None else np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(resamples, _CHUNK_CELLS // max(1, units.size)))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        w = np.zeros((r, n_units))
        for g in groups:
            w[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=r)
        yield w[:, units]


def unit_strata(units: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each unit's stratum: the label of its first row."""
    n_units = int(units.max()) + 1
    first = np.full(n_units, -1)
    order = np.arange(len(units))[::-1]  # assigned last-to-first: the first row wins
    first[units[order]] = order
    return np.asarray(labels)[first]


# ---------------------------------------------------------------------------------------------------------
# weighted metrics: w (r, n) -> (r,) per metric

def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, NaN where b is 0 (undefined in that resample)."""
    out = np.full(np.broadcast(a, b).shape, np.nan)
    return np.divide(a, b, out=out, where=b > 0)


def weighted_auc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC-AUC of each weight row (ties count one half, as sklearn's roc_auc_score); NaN where a row has no
    positive or no negative weight. positive: (n,) bool, score: (n,), w: (r, n)."""
    order = np.argsort(score, kind="stable")
    s, pos = np.asarray(score)[order], np.asarray(positive, bool)[order]
    w = np.atleast_2d(w)[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each run of equal scores
    ends = np.r_[starts[1:], len(s)] - 1
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
    wneg = w * ~pos
    cneg = np.cumsum(wneg, axis=1)
    below = np.where(starts > 0, cneg[:, np.maximum(starts - 1, 0)], 0.0)  # negatives scored lower than the run
    credit = below + 0.5 * (cneg[:, ends] - below)                        # ties: half
    wpos = w * pos
    return _div((wpos[:, pos] * credit[:, group[pos]]).sum(1), wpos.sum(1) * wneg.sum(1))


def single_label_stats(y: np.ndarray, probs: np.ndarray, keys: Sequence[str], w: np.ndarray) -> dict[str, np.ndarray]:
    """Binary and multiclass metrics of each weight row, named as evaluate.classification_metrics names them
    (accuracy, balanced_accuracy, macro_f1, roc_auc_ovr, roc_auc_<key>) plus sensitivity_<key> and
    specificity_<key> (one-vs-rest); argmax decisions. keys: evaluate.metric_key_names of the classes."""
    y, p = np.asarray(y, np.int64), np.asarray(probs, np.float64)
    k = p.shape[1]
    pred = p.argmax(1)
    cells = np.zeros((len(y), k * k))
    cells[np.arange(len(y)), y * k + pred] = 1
    cm = (w @ cells).reshape(len(w), k, k)  # (r, true, predicted)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, called, total = cm.sum(2), cm.sum(1), cm.sum((1, 2))[:, None]
    recall = _div(tp, support)
    f1 = np.divide(2 * tp, support + called, out=np.zeros_like(tp), where=support + called > 0)
    present = support > 0
    out = {"accuracy": _div(tp.sum(1), total[:, 0]),
           "balanced_accuracy": _div(np.where(present, recall, 0).sum(1), present.sum(1).astype(float)),
           "macro_f1": f1.mean(1)}
    classes = [1] if k == 2 else range(k)
    auc = {c: weighted_auc(y == c, p[:, c], w) for c in classes}
    if k == 2:
        out["roc_auc_ovr"] = auc[1]
        auc[0] = auc[1]  # p0 = 1 - p1: class 0's one-vs-rest AUC is the same number
    else:
        stacked = np.stack([auc[c] for c in range(k)], 1)
        defined = np.isfinite(stacked)
        out["roc_auc_ovr"] = _div(np.where(defined, stacked, 0).sum(1), defined.sum(1).astype(float))
    for c, key in enumerate(keys):
        out[f"roc_auc_{key}"] = auc[c]
        out[f"sensitivity_{key}"] = recall[:, c]
        out[f"specificity_{key}"] = _div(total[:, 0] - support[:, c] - called[:, c] + tp[:, c],
                                         total[:, 0] - support[:, c])
    return out


def threshold_stats(positive: np.ndarray, score: np.ndarray, threshold: float, w: np.ndarray,
                    prefix: str = "op_", suffix: str = "") -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV of the decision score >= threshold, per weight row."""
    pos = np.asarray(positive, bool)
    called = np.asarray(score) >= threshold
    tp, fp = w @ (pos & called), w @ (~pos & called)
    fn, tn = w @ (pos & ~called), w @ (~pos & ~called)
    return {f"{prefix}sensitivity{suffix}": _div(tp, tp + fn), f"{prefix}specificity{suffix}": _div(tn, tn + fp),
            f"{prefix}ppv{suffix}": _div(tp, tp + fp), f"{prefix}npv{suffix}": _div(tn, tn + fn)}


def multilabel_stats(y: np.ndarray, probs: np.ndarray, keys: Sequence[str], w: np.ndarray) -> dict[str, np.ndarray]:
    """Per finding roc_auc_<key> and mean_auc (over the findings defined in each resample) of each weight row."""
    y, p = np.asarray(y), np.asarray(probs, np.float64)
    out = {f"roc_auc_{key}": weighted_auc(y[:, j] == 1, p[:, j], w) for j, key in enumerate(keys)}
    stacked = np.stack(list(out.values()), 1)
    defined = np.isfinite(stacked)
    out["mean_auc"] = _div(np.where(defined, stacked, 0).sum(1), defined.sum(1).astype(float))
    return out


# ---------------------------------------------------------------------------------------------------------
# intervals

def intervals(y_true, probs, class_names: Sequence[str], task: str, patients: Sequence | None = None,
              resamples: int = 1000, level: float = 0.95, seed: int = 0,
              operating_point: float | None = None) -> list[Interval]:
    """Bootstrap intervals of the test metrics (see the module docstring); [] when resamples is 0.
    y_true: class indices (n,), or multi-hot (n, K) for multilabel; probs: (n, K). operating_point: a binary
    model's threshold on p(class 1): adds op_sensitivity, op_specificity, op_ppv, op_npv."""
    from .evaluate import _check_labels, _check_multi_hot, _check_probs, _check_scores, metric_key_names

    if resamples == 0:
        return []
    keys = metric_key_names(class_names)
    multilabel, k = task == "multilabel", len(keys)
    if multilabel:  # validated as evaluate.py validates them; rows renormalized as it does, so the points agree
        y = _check_multi_hot(y_true, k, "y_true")
        p = _check_scores(probs, len(y), k)
    else:
        y = _check_labels(y_true, k, "y_true")
        p = _check_probs(probs, len(y), k)
    units, unit = units_of(patients, len(y))
    strata = None if multilabel else unit_strata(units, y)

    def stats(w):
        if multilabel:
            return multilabel_stats(y, p, keys, w)
        out = single_label_stats(y, p, keys, w)
        if operating_point is not None and p.shape[1] == 2:
            out |= threshold_stats(y == 1, p[:, 1], operating_point, w)
        return out

    point = {m: float(v[0]) for m, v in stats(np.ones((1, len(y)))).items()}
    chunks = [stats(w) for w in resample_weights(units, strata, resamples, seed)]
    tail = (1 - level) / 2 * 100
    out = []
    for m, value in point.items():
        draws = np.concatenate([c[m] for c in chunks])
        draws = draws[np.isfinite(draws)]
        if not np.isfinite(value):
            continue  # undefined on the test split itself (an AUC of a class without test images): no row
        low = high = None
        if len(draws) >= MIN_DEFINED * resamples:
            low, high = (float(q) for q in np.percentile(draws, [tail, 100 - tail]))
        out.append(Interval(m, value, low, high, int(len(draws)), unit))
    return out


def as_metrics(rows: Sequence[Interval], prefix: str = "test_") -> dict[str, float]:
    """`{prefix}<metric>_ci_low` / `_ci_high` for every row with an interval."""
    out = {}
    for r in rows:
        if r.ci_low is not None:
            out[f"{prefix}{r.metric}_ci_low"] = r.ci_low
            out[f"{prefix}{r.metric}_ci_high"] = r.ci_high
    return out


def write_csv(rows: Sequence[Interval], path) -> Path:
    """evaluation/intervals.csv: INTERVAL_COLUMNS, one row per metric (empty ci_low/ci_high: no interval)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(INTERVAL_COLUMNS)
        for r in rows:
            wr.writerow([r.metric, repr(r.value), "" if r.ci_low is None else repr(r.ci_low),
                         "" if r.ci_high is None else repr(r.ci_high), r.resamples, r.unit])
    return path
