"""Calibration: can the probabilities be trusted as probabilities? Measured (ECE, Brier, reliability diagram) and
improved by temperature scaling fitted on the validation split, the scale the packaged classifier then ships with.

What is compared (`outcomes`):
  binary, multiclass  the top class's probability (confidence) against whether that class is right (accuracy)
  multilabel          every (image, finding) probability against whether the finding is present, pooled over findings
ECE (expected calibration error): the count-weighted mean |accuracy - confidence| over bins of the confidence:
`bins` equal-width bins over [0, 1], or (adaptive) `bins` bins holding equal numbers of predictions.
Brier score: binary, the mean squared error of the positive class's probability; multiclass, the multi-class Brier
(the squared distance of the probability row to the one-hot label, summed over classes: 0..2); multilabel, the binary
Brier of each finding averaged over the findings.

Temperature scaling: the network's outputs as logits (softmax: log p; sigmoid: logit(p), clipped away from 0 and 1)
divided by one scalar T, fitted by minimising the validation split's negative log-likelihood (never the test split's);
T > 1 softens an over-confident model. It changes no argmax and no ranking within a finding, so accuracy, F1 and the
single-label and per-finding AUCs of a run are untouched; the packaged classifier (medspark.serving) applies the same
T to its outputs. numpy here; scipy inside `fit_temperature`; matplotlib inside `reliability_png`.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import tta
from .evaluate import _check_labels, _check_multi_hot, _check_probs, _check_scores, _figure, _save

DEFAULT_BINS = 15
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))  # a temperature outside this says something is broken, not overconfident
_SOFTMAX_EPS = 1e-12  # float32 softmax outputs can be exactly 0: log p needs a floor
_SIGMOID_EPS = 1e-7   # float32 sigmoid outputs saturate at exactly 0 and 1: logit(p) needs both clipped
log = logging.getLogger("medspark.calibration")
CSV_COLUMNS = ("split", "temperature", "binning", "bin", "lower", "upper", "count", "confidence", "accuracy")


@dataclass(frozen=True)
class Options:
    """The calibration and test-time augmentation keys of the run's `evaluate:` config."""
    bins: int = DEFAULT_BINS
    temperature: bool = True
    tta: str = "none"

    @classmethod
    def from_mapping(cls, options: Mapping | None) -> "Options":
        """evaluate: {calibration: {bins}, temperature, tta} (other keys belong to other parts: ignored); a bad value
        is a one-line error naming its key."""
        o = dict(options or {})
        cal = o.get("calibration") or {}
        if not isinstance(cal, Mapping):
            raise ValueError(f"evaluate.calibration={cal!r} must be a mapping such as {{bins: {DEFAULT_BINS}}}")
        unknown = set(cal) - {"bins"}
        if unknown:
            raise ValueError(f"unknown evaluate.calibration option(s) {sorted(unknown)}; valid: ['bins']")
        bins = cal.get("bins", DEFAULT_BINS)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 1000:
            raise ValueError(f"evaluate.calibration.bins={bins!r} must be an integer from 2 to 1000 (15 is usual)")
        temperature = o.get("temperature", True)
        if not isinstance(temperature, bool):
            raise ValueError(f"evaluate.temperature={temperature!r} must be true (fit a temperature on the validation "
                             "split and ship it) or false")
        return cls(bins=bins, temperature=temperature, tta=tta.check_mode(o.get("tta", "none")))


# ---------------------------------------------------------------------------------------------------------
# measuring

def _checked(y, probs, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(labels, float64 probabilities) validated as evaluate.py validates them."""
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, k), got shape {p.shape}")
    n, k = p.shape
    if multilabel:
        return _check_multi_hot(y, k, "y_true"), _check_scores(p, n, k)
    y = _check_labels(y, k, "y_true")
    return y, _check_probs(p, len(y), k)


def outcomes(y, probs, multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct as 0/1) per prediction: one per image (top class), or per (image, finding) pair."""
    y, p = _checked(y, probs, multilabel)
    if multilabel:
        return p.ravel(), y.ravel().astype(np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def reliability(confidence, correct, bins: int = DEFAULT_BINS, adaptive: bool = False) -> list[dict]:
    """One row per non-empty bin: bin, lower, upper, count, confidence (mean), accuracy (mean of correct).
    Equal-width bins are (lower, upper] (the first includes 0); adaptive bins split the sorted confidences into
    `bins` runs of equal size (sizes differ by one at most), lower/upper being the run's smallest and largest."""
    conf, ok = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, np.float64).ravel()
    if conf.shape != ok.shape or conf.size == 0:
        raise ValueError(f"need as many outcomes as confidences, and at least one: got {conf.size} and {ok.size}")
    if adaptive:
        order = np.argsort(conf, kind="stable")
        groups = [g for g in np.array_split(order, bins) if g.size]
        edges = [(float(conf[g[0]]), float(conf[g[-1]])) for g in groups]
    else:
        cut = np.linspace(0.0, 1.0, bins + 1)
        idx = np.searchsorted(cut[1:-1], conf, side="left")  # conf == an edge belongs to the lower bin
        groups = [np.flatnonzero(idx == b) for b in range(bins)]
        edges = [(float(cut[b]), float(cut[b + 1])) for b in range(bins)]
    return [{"bin": b, "lower": lo, "upper": hi, "count": int(g.size), "confidence": float(conf[g].mean()),
             "accuracy": float(ok[g].mean())} for b, (g, (lo, hi)) in enumerate(zip(groups, edges)) if g.size]


def ece_of(rows: list[dict]) -> float:
    """Expected calibration error of `reliability` rows."""
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n)


def ece(y, probs, multilabel: bool = False, bins: int = DEFAULT_BINS, adaptive: bool = False) -> float:
    """Expected calibration error (module docstring) of probabilities against labels."""
    return ece_of(reliability(*outcomes(y, probs, multilabel), bins=bins, adaptive=adaptive))


def brier(y, probs, multilabel: bool = False) -> float:
    """Brier score (module docstring): 0 is perfect."""
    y, p = _checked(y, probs, multilabel)
    if multilabel:
        return float(((p - y) ** 2).mean(axis=0).mean())
    if p.shape[1] == 2:
        return float(((p[:, 1] - (y == 1)) ** 2).mean())
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


# ---------------------------------------------------------------------------------------------------------
# temperature scaling

def logits(probs, multilabel: bool = False) -> np.ndarray:
    """The network's outputs back as logits: log p (softmax; up to a constant per row, which softmax ignores) or
    logit(p) (sigmoid), clipped so that saturated float32 outputs stay finite."""
    p = np.asarray(probs, np.float64)
    if multilabel:
        p = np.clip(p, _SIGMOID_EPS, 1 - _SIGMOID_EPS)
        return np.log(p) - np.log1p(-p)
    return np.log(np.maximum(p, _SOFTMAX_EPS))


def apply_temperature(probs, temperature: float, multilabel: bool = False) -> np.ndarray:
    """Probabilities of the logits divided by `temperature` (float64); temperature 1 returns them unchanged."""
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if t == 1.0:
        return np.asarray(probs)
    z = logits(probs, multilabel) / t
    if multilabel:
        return 1 / (1 + np.exp(-z))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def scale_thresholds(thresholds: Mapping, temperature: float, task: str, classes) -> dict[str, float]:
    """Decision thresholds chosen on the network's own probabilities, moved to the temperature-scaled scale, where
    they make the same decisions (T is monotonic per output): multilabel {finding: t} -> sigmoid(logit(t) / T);
    binary {positive class: t} -> the positive class's scaled probability of the row (1 - t, t)."""
    names = list(thresholds)
    t = np.array([[float(thresholds[c]) for c in names]])
    if task == "multilabel":
        return {c: float(v) for c, v in zip(names, apply_temperature(t, temperature, True)[0])}
    if task == "binary" and len(names) == 1:
        return {names[0]: float(apply_temperature(np.array([[1 - t[0, 0], t[0, 0]]]), temperature)[0, 1])}
    raise ValueError(f"thresholds of a {task} model cannot be scaled: {dict(thresholds)!r}")


def nll(y, z: np.ndarray, temperature: float, multilabel: bool = False) -> float:
    """Mean negative log-likelihood of labels y under logits z / temperature (per finding for multilabel)."""
    z = z / temperature
    if multilabel:
        return float((np.logaddexp(0, z) - y * z).mean())
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).mean())


def fit_temperature(y_val, probs_val, multilabel: bool = False) -> float:
    """The T that minimises the validation NLL of the temperature-scaled probabilities (a bounded search on log T,
    LOG_T_BOUNDS). Give it the validation split only: a temperature chosen on test would flatter test ECE."""
    from scipy.optimize import minimize_scalar

    y, p = _checked(y_val, probs_val, multilabel)
    z = logits(p, multilabel)
    res = minimize_scalar(lambda log_t: nll(y, z, float(np.exp(log_t)), multilabel), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def at_bound(y_val, probs_val, temperature: float, multilabel: bool = False) -> bool:
    """True when a bound of LOG_T_BOUNDS fits the validation split as well as `temperature` does (within float
    noise): the likelihood kept improving towards it, e.g. a split the model gets all right with confidence."""
    y, p = _checked(y_val, probs_val, multilabel)
    z = logits(p, multilabel)
    best = nll(y, z, temperature, multilabel)
    return any(nll(y, z, float(np.exp(b)), multilabel) <= best + 1e-9 * (1 + abs(best)) for b in LOG_T_BOUNDS)


# ---------------------------------------------------------------------------------------------------------
# the evaluation's calibration part

@dataclass
class Calibrated:
    """What `calibrate` measured: the temperature, the calibrated probabilities, metrics and files written."""
    temperature: float
    test: np.ndarray
    val: np.ndarray | None
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    note: str = ""


def calibrate(y_test, p_test, y_val, p_val, multilabel: bool, options: Options, out_dir) -> Calibrated:
    """Fit T on (y_val, p_val) when options.temperature and a validation split exist (else T = 1), apply it to both
    splits, and measure before and after. Metrics: temperature, test_ece, test_ece_adaptive, test_brier (after T),
    test_ece_before_temperature, test_brier_before_temperature, and with a validation split
    val_ece_before_temperature, val_ece_after_temperature. Files in out_dir: reliability.png (test, before and
    after T), calibration.csv (every bin of both binnings, both splits, before and after T)."""
    has_val = y_val is not None and len(y_val) > 0
    if options.temperature and has_val:
        t, note = fit_temperature(y_val, p_val, multilabel), "fitted on the validation split"
        if at_bound(y_val, p_val, t, multilabel):
            log.warning("evaluate.temperature: the validation likelihood kept improving up to T=%.3g, the search's "
                        "bound (a validation split the model gets all right and sure, or all wrong): it cannot pin "
                        "down a temperature, so none is applied (T=1); a larger validation split gives one", t)
            t, note = 1.0, f"not applied: the validation split drove T to the search's bound ({t:.3g})"
    else:
        t = 1.0
        note = "evaluate.temperature=false" if not options.temperature else "no validation split: not fitted"
    cal = Calibrated(t, apply_temperature(p_test, t, multilabel),
                     apply_temperature(p_val, t, multilabel) if has_val else None, note=note)
    splits = {"test": (y_test, p_test, cal.test)} | ({"val": (y_val, p_val, cal.val)} if has_val else {})
    rows, csv_rows = {}, []
    for split, (y, before, after) in splits.items():
        for stage, p in (("before", before), ("after", after)):
            conf, ok = outcomes(y, p, multilabel)
            for binning, adaptive in (("equal_width", False), ("adaptive", True)):
                r = reliability(conf, ok, options.bins, adaptive)
                rows[split, stage, binning] = r
                csv_rows += [{"split": split, "temperature": stage, "binning": binning, **row} for row in r]
    m = {"temperature": t,
         "test_ece": ece_of(rows["test", "after", "equal_width"]),
         "test_ece_adaptive": ece_of(rows["test", "after", "adaptive"]),
         "test_brier": brier(y_test, cal.test, multilabel),
         "test_ece_before_temperature": ece_of(rows["test", "before", "equal_width"]),
         "test_brier_before_temperature": brier(y_test, p_test, multilabel)}
    if has_val:
        m["val_ece_before_temperature"] = ece_of(rows["val", "before", "equal_width"])
        m["val_ece_after_temperature"] = ece_of(rows["val", "after", "equal_width"])
    cal.metrics = m
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows)
    what = "finding probability vs frequency, pooled over findings" if multilabel else "top-class confidence"
    png = reliability_png(rows["test", "before", "equal_width"], rows["test", "after", "equal_width"], t, note,
                          out / "reliability.png", what)
    cal.files = [png, path]
    return cal


def reliability_png(before: list[dict], after: list[dict], temperature: float, note: str, path, what: str) -> Path:
    """Two panels, before and after temperature scaling: per bin, the accuracy (bar) against the mean confidence
    (dot) with the bin's count over the bar; the diagonal is perfect calibration."""
    fig = _figure(11, 5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, rows, title in ((axes[0], before, "before temperature scaling"),
                            (axes[1], after, f"after (T = {temperature:.3f}, {note})")):
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
        lo = np.array([r["lower"] for r in rows])
        width = np.array([r["upper"] for r in rows]) - lo
        acc = np.array([r["accuracy"] for r in rows])
        ax.bar(lo, acc, width=width, align="edge", color="tab:blue", alpha=0.6, edgecolor="tab:blue",
               label="accuracy (observed)")
        ax.plot([r["confidence"] for r in rows], [r["confidence"] for r in rows], "o", color="tab:red", ms=4,
                label="mean confidence")
        for r, x in zip(rows, lo + width / 2):
            ax.text(x, min(r["accuracy"] + 0.02, 0.97), str(r["count"]), ha="center", va="bottom", fontsize=7,
                    rotation=90 if len(rows) > 10 else 0)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel(f"confidence ({what})")
        ax.set_title(f"{title}\nECE = {ece_of(rows):.4f}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy (numbers: predictions in the bin)")
    fig.suptitle("Reliability diagram (test split)")
    return _save(fig, path)
