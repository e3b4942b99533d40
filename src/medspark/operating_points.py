"""Operating points: the decision threshold a binary model (or each finding of a multilabel one) ships with.

A score p(positive) >= threshold means positive. The positive class of a binary task is class index 1 (the second
class name: PNEUMONIA of NORMAL/PNEUMONIA, yes of no/yes, tumor of no_tumor/tumor in sorted folder order). The
threshold is chosen on the VALIDATION split's (calibrated) probabilities by `evaluate.operating_point`:

    youden           max sensitivity + specificity - 1 (Youden's J)
    sensitivity:0.95 the highest threshold whose validation sensitivity is >= 0.95 (best specificity at that)
    specificity:0.90 the lowest threshold whose validation specificity is >= 0.90 (best sensitivity at that)
    f1               max F1 (evaluate.THRESHOLD_RULE: what multilabel findings used before operating points)
    auto             youden for binary, f1 for multilabel (so multilabel metrics are as before); multiclass: none

The threshold is placed halfway between the chosen validation score and the next lower one (evaluate._f1_cut does
the same), so the validation decisions are exactly the chosen ones. Then on the test split: sensitivity,
specificity, PPV and NPV at it, and the sensitivity at fixed specificities 0.90 and 0.95 read off the test ROC
(the best sensitivity among thresholds whose test specificity reaches the target): `operating_point_metrics`,
written to evaluation/operating_points.csv (OP_COLUMNS): `threshold` on the network's own probabilities, where it
was chosen and the metrics are computed, and `shipped_threshold`, the same decision on the temperature-scaled
probabilities the packaged classifier answers (calibration.scale_thresholds; equal without calibration).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RULES = ("auto", "youden", "f1", "sensitivity:<target>", "specificity:<target>")
FIXED_SPECIFICITIES = (0.90, 0.95)
DEFAULT_THRESHOLD = 0.5  # no validation split, or no positive (negative) in it
OP_COLUMNS = ("class", "key", "rule", "threshold", "shipped_threshold", "val_sensitivity", "val_specificity", "sensitivity", "specificity",
              "ppv", "npv", "tp", "fp", "fn", "tn", "sensitivity_at_spec_90", "sensitivity_at_spec_95")


def parse_rule(rule) -> tuple[str, float | None]:
    """`evaluate.operating_point` -> (kind, target); ValueError naming the key for anything else."""
    text = str(rule).strip().lower()
    kind, _, target = text.partition(":")
    if kind in ("auto", "youden", "f1") and not target:
        return kind, None
    if kind in ("sensitivity", "specificity") and target:
        try:
            value = float(target)
        except ValueError:
            value = float("nan")
        if 0 < value <= 1:
            return kind, value
    raise ValueError(f"evaluate.operating_point={rule!r} is not a rule; use youden, f1, auto, sensitivity:<0-1> or "
                     "specificity:<0-1>, e.g. evaluate.operating_point=sensitivity:0.95")


def resolve(rule, task: str) -> str | None:
    """The rule a task applies: auto -> youden (binary), f1 (multilabel); None for multiclass (argmax decides)."""
    kind, target = parse_rule(rule)
    if task not in ("binary", "multilabel"):
        return None
    if kind == "auto":
        return "youden" if task == "binary" else "f1"
    return kind if target is None else f"{kind}:{target:g}"


def _cuts(positive: np.ndarray, score: np.ndarray):
    """Descending scores and, at the last row of each run of equal scores (calling it and everything above
    positive), the cumulative true and false positives: (sorted scores, cut rows, tp, fp)."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    s, pos = np.asarray(score, np.float64)[order], np.asarray(positive, bool)[order]
    cuts = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    return s, cuts, np.cumsum(pos)[cuts], np.cumsum(~pos)[cuts]


def _place(s: np.ndarray, row: int) -> float:
    """The threshold for calling rows 0..row of the descending scores positive: halfway to the next lower score."""
    if row + 1 == len(s):
        return float(s[row])
    mid = (s[row] + s[row + 1]) / 2
    return float(mid if mid > s[row + 1] else s[row])  # adjacent floats: keep the cut's own score


def choose_threshold(positive, score, rule: str) -> float | None:
    """The threshold `rule` (youden | f1 | sensitivity:x | specificity:x) picks on these (validation) scores; None
    when the scores hold no positive or no negative (the caller falls back to DEFAULT_THRESHOLD)."""
    from .evaluate import _f1_cut

    kind, target = parse_rule(rule)
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    if kind == "f1":
        return _f1_cut(pos.astype(np.int64), np.asarray(score, np.float64))
    s, cuts, tp, fp = _cuts(pos, score)
    sens, spec = tp / n_pos, 1 - fp / n_neg
    if kind in ("youden", "auto"):
        best = int(np.argmax(sens + spec))  # first maximum: the higher threshold
    elif kind == "sensitivity":
        best = int(np.flatnonzero(sens >= target - 1e-12)[0])  # the highest threshold reaching it
    else:
        ok = np.flatnonzero(spec >= target - 1e-12)
        if not len(ok):  # even the top score's run has too many negatives: call nothing positive
            return float(np.nextafter(s[0], np.inf))
        best = int(ok[-1])  # the lowest threshold keeping it
    return _place(s, cuts[best])


def at_threshold(positive, score, threshold: float) -> dict[str, float | int | None]:
    """Counts and sensitivity, specificity, PPV, NPV of score >= threshold (None where undefined)."""
    pos = np.asarray(positive, bool)
    called = np.asarray(score) >= threshold
    tp, fp, fn, tn = (int(v) for v in ((pos & called).sum(), (~pos & called).sum(), (pos & ~called).sum(),
                                       (~pos & ~called).sum()))
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)}


def sensitivity_at_specificity(positive, score, specificity: float) -> float | None:
    """The best sensitivity among the thresholds whose specificity is >= `specificity` (calling nothing positive
    always qualifies: sensitivity 0); None without positives or negatives."""
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    _, _, tp, fp = _cuts(pos, score)
    ok = 1 - fp / n_neg >= specificity - 1e-12
    return float((tp[ok] / n_pos).max()) if ok.any() else 0.0


def operating_point_metrics(y_val, p_val, y_test, p_test, class_names: Sequence[str], task: str, rule,
                            thresholds: dict[str, float] | None = None) -> tuple[dict[str, float], list[dict], dict]:
    """Metrics, operating_points.csv rows and {class or finding: threshold} for a binary or multilabel model.

    Binary: labels (n,), probabilities (n, 2), one row for the positive class (index 1); multilabel: multi-hot
    (n, K) and sigmoid scores (n, K), one row per finding. y_val None: no validation split, DEFAULT_THRESHOLD.
    thresholds: already chosen ones ({name: t}: multilabel's f1 thresholds of evaluate_multilabel) used as they are.
    Metric names: test_op_sensitivity (…_specificity, _ppv, _npv), test_sensitivity_at_spec_90 / _95, with
    `_<finding key>` appended per finding for multilabel."""
    from .evaluate import metric_key_names

    chosen = resolve(rule, task)
    if chosen is None:
        return {}, [], {}
    keys = metric_key_names(class_names)
    if task == "binary":  # one column: the positive class
        cols = [(class_names[1], keys[1], "")]
        as_cols = lambda y, p: (np.asarray(y)[:, None] == 1, np.asarray(p, np.float64)[:, 1:2])  # noqa: E731
    else:
        cols = [(name, key, f"_{key}") for name, key in zip(class_names, keys)]
        as_cols = lambda y, p: (np.asarray(y) == 1, np.asarray(p, np.float64))  # noqa: E731
    yv, pv = as_cols(y_val, p_val) if y_val is not None and len(y_val) else (None, None)
    yt, pt = as_cols(y_test, p_test)
    metrics, rows, shipped = {}, [], {}
    for i, (name, key, suffix) in enumerate(cols):
        t = (thresholds or {}).get(name)
        if t is None and yv is not None:
            t = choose_threshold(yv[:, i], pv[:, i], chosen)
        t = DEFAULT_THRESHOLD if t is None else float(t)
        val = at_threshold(yv[:, i], pv[:, i], t) if yv is not None else {}
        test = at_threshold(yt[:, i], pt[:, i], t)
        at = {f"sensitivity_at_spec_{round(s * 100)}": sensitivity_at_specificity(yt[:, i], pt[:, i], s)
              for s in FIXED_SPECIFICITIES}
        rows.append({"class": name, "key": key, "rule": chosen, "threshold": t,
                     "val_sensitivity": val.get("sensitivity"), "val_specificity": val.get("specificity"),
                     **test, **at})
        for m in ("sensitivity", "specificity", "ppv", "npv"):
            if test[m] is not None:
                metrics[f"test_op_{m}{suffix}"] = float(test[m])
        metrics |= {f"test_{m}{suffix}": v for m, v in at.items() if v is not None}
        shipped[name] = t
    return metrics, rows, shipped


def write_csv(rows: Sequence[dict], path) -> Path:
    """evaluation/operating_points.csv: OP_COLUMNS, one row per positive class / finding (empty: undefined)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=OP_COLUMNS)
        w.writeheader()
        w.writerows({c: ("" if r.get(c) is None else r[c]) for c in OP_COLUMNS} for r in rows)
    return path
