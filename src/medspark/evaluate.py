"""Post-training evaluation: MLflow-safe metrics and the figures/reports logged as artifacts.

Binary and multiclass (softmax): `evaluate`. Multilabel (a sigmoid per finding): `evaluate_multilabel`, with
per-finding decision thresholds chosen on the validation split (THRESHOLD_RULE) and applied to the test split.
`evaluate_split` picks by the dataset's task.

sklearn and matplotlib are imported inside the functions so that importing this module stays cheap
(numpy only; never TensorFlow). Figures are built on `matplotlib.figure.Figure`, never pyplot, so no
global figure registry grows across many runs and no display backend is needed.
"""
from __future__ import annotations

import json
import math
import posixpath
import re
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DPI = 120
_MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")  # MLflow's rule, ASCII-only to be safe on every backend
_ROW_SUM_TOL = 1e-2  # float16/float32 softmax drifts ~1e-3 at most; more than this is not a probability row
_LR_KEYS = {"lr", "learning_rate"}


# ---------------------------------------------------------------------------------------------------------
# validation and key names

def _check_labels(y: np.ndarray | Sequence[int], k: int, what: str) -> np.ndarray:
    """Integer labels in [0, k); (n, 1) columns are accepted because Keras label arrays often look like that."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot? pass labels.argmax(1))" if y.ndim == 2 and y.shape[1] == k else ""
        raise ValueError(f"{what} must be integer class labels of shape (n,), got shape {y.shape}{hint}")
    if y.size == 0:
        raise ValueError(f"{what} is empty: nothing to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{what} must hold integer class labels, got dtype {y.dtype} with non-integer values")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= k)
    if bad.any():
        raise ValueError(f"{what} has labels outside [0, {k - 1}] for {k} classes: "
                         f"{sorted(set(y[bad].tolist()))[:10]} ({int(bad.sum())} rows)")
    return y


def _check_names(class_names: Sequence[str], minimum: int = 2) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) < minimum:
        raise ValueError(f"need at least {minimum} class names, got {names}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"class_names must be unique, duplicated: {dup}")
    return names


def _check_probs(probs: np.ndarray, n: int, k: int) -> np.ndarray:
    """Float64 rows renormalized to sum to 1; anything that is clearly not softmax output is refused."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, k) = ({n}, {k}), got shape {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"y_true has {n} rows but probs has {p.shape[0]}")
    if p.shape[1] != k:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {k} class_names; they must match "
                         "(a binary sigmoid output of shape (n, 1) must be stacked to [1 - p, p])")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs contains NaN or inf in {int((~np.isfinite(p)).any(1).sum())} rows")
    if (p < 0).any():
        raise ValueError("probs contains negative values: pass softmax probabilities, not logits")
    s = p.sum(axis=1)
    off = np.abs(s - 1) > _ROW_SUM_TOL
    if off.any():
        raise ValueError(f"probs rows must sum to 1 (softmax output); {int(off.sum())} rows sum to values in "
                         f"[{s.min():.4g}, {s.max():.4g}]: logits or sigmoid outputs?")
    return p / s[:, None]


def _path_safe(name: str) -> bool:
    """MLflow also rejects names that change under posixpath.normpath ('a//b', 'a/', 'a/../b')."""
    return posixpath.normpath(name) == name


def _check_prefix(prefix: str) -> None:
    if not _MLFLOW_KEY.match(f"{prefix}accuracy") or not _path_safe(f"{prefix}accuracy"):
        raise ValueError(f"prefix {prefix!r} is not MLflow-safe (allowed: alphanumerics, _ - . space /)")


def metric_key_names(class_names: Sequence[str]) -> list[str]:
    """Unique MLflow-key fragments for class names: ASCII-folded ('ü' -> 'u'), disallowed chars -> '_'.

    Collisions after sanitizing get the class index appended, so every class keeps its own keys; 'ovr' is
    reserved because `roc_auc_ovr` is the macro AUC and a class must not overwrite it."""
    used, out = {"ovr"}, []
    for i, raw in enumerate(class_names):
        s = unicodedata.normalize("NFKD", str(raw)).encode("ascii", "ignore").decode()
        s = re.sub(r"[^A-Za-z0-9_\-. /]", "_", s).strip() or f"class{i}"
        if not _path_safe(f"x_{s}"):
            s = s.replace("/", "_")
        while s in used:
            s = f"{s}_{i}"
        used.add(s)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# metrics

@contextmanager
def _quiet():
    """Degenerate splits (one class present, a class never predicted) are expected, not news: keep logs clean."""
    from sklearn.exceptions import UndefinedMetricWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*(y_pred contains classes not in y_true|"
                                "Only one class|No positive samples|No negative samples).*")
        yield


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _ovr_auc(y_true: np.ndarray, p: np.ndarray) -> dict[int, float]:
    """Per-class one-vs-rest AUC, only for classes with both positives and negatives (else undefined)."""
    from sklearn.metrics import roc_auc_score
    out = {}
    for c in range(p.shape[1]):
        pos = y_true == c
        if pos.any() and not pos.all():
            out[c] = float(roc_auc_score(pos, p[:, c]))
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                           prefix: str = "test_") -> dict[str, float]:
    """Flat `{prefix}<metric>` floats ready for `mlflow.log_metrics`.

    Aggregates: accuracy, macro_f1, weighted_f1, macro_precision, macro_recall, balanced_accuracy,
    roc_auc_ovr, log_loss, n. Per class (sanitized name, see `metric_key_names`): precision_, recall_, f1_,
    roc_auc_, support_. Precision/recall/F1 run over all k classes with zero_division=0, matching
    classification_report.txt. A class absent from y_true has no ROC-AUC: its key is omitted and the macro
    covers the defined classes (omitted too when none is defined), so no NaN ever reaches MLflow.
    balanced_accuracy is the mean recall over the classes present in y_true (sklearn's definition).
    """
    from sklearn.metrics import log_loss, precision_recall_fscore_support, roc_auc_score

    names = _check_names(class_names)
    k = len(names)
    y = _check_labels(y_true, k, "y_true")
    p = _check_probs(probs, len(y), k)
    _check_prefix(prefix)
    pred = p.argmax(axis=1)
    labels = list(range(k))
    cm = _confusion(y, pred, k)
    support = cm.sum(axis=1)

    with _quiet():
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
        m = {
            "accuracy": float(np.trace(cm) / len(y)),
            "macro_f1": float(f1.mean()),
            "weighted_f1": float(np.average(f1, weights=support)),
            "macro_precision": float(prec.mean()),
            "macro_recall": float(rec.mean()),
            "balanced_accuracy": float(np.mean(np.diag(cm)[support > 0] / support[support > 0])),
            "log_loss": float(log_loss(y, p, labels=labels)),
            "n": float(len(y)),
        }
        auc = _ovr_auc(y, p)
        if k == 2:
            if 1 in auc:  # ordinary binary AUC; equals class 0's OvR AUC since p0 = 1 - p1
                m["roc_auc_ovr"] = float(roc_auc_score(y, p[:, 1]))
        elif auc:
            m["roc_auc_ovr"] = float(np.mean(list(auc.values())))

    for c, key in enumerate(metric_key_names(names)):
        m[f"precision_{key}"] = float(prec[c])
        m[f"recall_{key}"] = float(rec[c])
        m[f"f1_{key}"] = float(f1[c])
        m[f"support_{key}"] = float(support[c])
        if c in auc:
            m[f"roc_auc_{key}"] = auc[c]
    return {f"{prefix}{name}": v for name, v in m.items()}


# ---------------------------------------------------------------------------------------------------------
# figures

def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # Agg canvas on savefig; no pyplot, no GUI backend, nothing global
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()  # drop artists now rather than whenever the GC gets to the figure
    return path


def _label(name: str, width: int = 18) -> str:
    """Long class names wrap onto lines instead of pushing the matrix off the canvas."""
    import textwrap
    return "\n".join(textwrap.wrap(str(name), width, break_long_words=True)[:3]) or str(name)


def _percent_grid(counts, totals, names, cmap: str, label: str, decimals: int):
    """A k x k grid of counts coloured by their percentage of the row's total, count and percentage in every cell
    (up to 60 classes: past that the numbers are unreadable anyway; the colour still tells the story), names as
    ticks on both axes. Returns (figure, axes) for the caller's labels and title."""
    k = len(names)
    rows = np.asarray(totals)[:, None]
    pct = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0) * 100
    side = min(2.5 + 0.6 * k, 36.0)
    fs = max(4.0, min(10.0, (side - 2.5) / k * 72 / 5))  # two text lines must fit in one cell
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(pct, cmap=cmap, vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    if k <= 60:
        for i in range(k):
            for j in range(k):
                txt = f"{counts[i, j]}\n{pct[i, j]:.{decimals}f}%" if rows[i, 0] else "0\n–"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs, color="white" if pct[i, j] > 55 else "black")
    tick = [_label(c) for c in names]
    ax.set_xticks(range(k), tick, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center",
                  fontsize=max(6.0, fs))
    ax.set_yticks(range(k), tick, fontsize=max(6.0, fs))
    return fig, ax


def confusion_matrix_png(y_true, y_pred, class_names, path) -> Path:
    """Counts and row-normalized % per cell; colour is the row %, so rare classes are as readable as common ones."""
    names = _check_names(class_names)
    k = len(names)
    y = _check_labels(y_true, k, "y_true")
    yp = _check_labels(y_pred, k, "y_pred")
    if len(y) != len(yp):
        raise ValueError(f"y_true has {len(y)} rows but y_pred has {len(yp)}")
    cm = _confusion(y, yp, k)
    fig, ax = _percent_grid(cm, cm.sum(axis=1), names, "Blues", "% of true class", decimals=1)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(f"Confusion matrix (n={len(y)}, accuracy={np.trace(cm) / len(y):.3f})")
    return _save(fig, path)


def _families(history: Mapping[str, Sequence[float]]) -> dict[str, dict[str, np.ndarray]]:
    """Group 'x' and 'val_x' into one family; loss first, accuracy second, the rest in Keras order."""
    fam: dict[str, dict[str, np.ndarray]] = {}
    for key, vals in history.items():
        v = np.asarray(list(vals) if not isinstance(vals, np.ndarray) else vals, dtype=np.float64).ravel()
        if v.size == 0:
            continue
        base = key[4:] if key.startswith("val_") and len(key) > 4 else key
        fam.setdefault(base, {})["val" if base != key else "train"] = v
    order = {"loss": 0, "accuracy": 1, "acc": 1}
    return dict(sorted(fam.items(), key=lambda kv: order.get(kv[0], 2)))  # stable: keeps the rest in order


def training_curves_png(history: Mapping[str, Sequence[float]], path) -> Path:
    """One panel per metric family, train and val overlaid, epochs from 1; the best val_loss epoch is marked
    because that is the checkpoint early stopping restores."""
    from matplotlib.ticker import MaxNLocator

    fam = _families(history or {})
    if not fam:
        fig = _figure(5, 3)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no history\n(training recorded no epochs)", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        ax.set_title("Training curves")
        return _save(fig, path)

    ncol = min(3, len(fam))
    nrow = math.ceil(len(fam) / ncol)
    fig = _figure(4.8 * ncol, 3.6 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (name, series) in zip(axes, fam.items()):
        for split, style in (("train", "-o"), ("val", "--s")):
            if split in series:
                v = series[split]
                ax.plot(np.arange(1, len(v) + 1), v, style, ms=3, lw=1.5, label=split)
        if name == "loss" and "val" in series and np.isfinite(series["val"]).any():
            e = int(np.nanargmin(series["val"]))
            ax.plot(e + 1, series["val"][e], "*", ms=12, color="tab:red", label=f"best val (epoch {e + 1})")
        if name in _LR_KEYS and all(np.all(s[np.isfinite(s)] > 0) for s in series.values()):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(fam):]:
        ax.set_axis_off()
    fig.suptitle("Training curves")
    return _save(fig, path)


def roc_curves_png(y_true, probs, class_names, path) -> Path:
    """One-vs-rest ROC per class with its AUC; classes without positives (or negatives) are listed as undefined.
    A binary problem shows the positive class (index 1) only: class 0's curve is its mirror image."""
    names = _check_names(class_names)
    k = len(names)
    y = _check_labels(y_true, k, "y_true")
    p = _check_probs(probs, len(y), k)
    with _quiet():
        auc = _ovr_auc(y, p)
    classes = [1] if k == 2 else range(k)
    curves = [(c, names[c], y == c, p[:, c], auc.get(c)) for c in classes]
    defined = [auc[c] for c in classes if c in auc]
    macro = f", macro AUC={np.mean(defined):.3f}" if defined and k > 2 else ""
    title = ("ROC (positive class: " + names[1] + ")" if k == 2 else "ROC one-vs-rest") + macro
    return _roc_png(curves, k, title, "ROC undefined:\ny_true holds a single class", path)


def _roc_png(curves, k: int, title: str, empty_text: str, path) -> Path:
    """ROC curves, one per (colour index, name, positives mask, scores, AUC or None) in `curves`; an undefined
    AUC is a legend entry without a line, so the class (finding) is visibly accounted for."""
    from matplotlib import colormaps
    from sklearn.metrics import roc_curve

    legend_cols = 1 + k // 20
    fig = _figure(6.5 if k <= 10 else 6.0 + 3.1 * legend_cols, 5.5 if k <= 10 else 6.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    for c, name, pos, score, auc in curves:
        if auc is not None:
            fpr, tpr, _ = roc_curve(pos, score)
            ax.plot(fpr, tpr, lw=1.6, color=cmap(c % cmap.N), label=f"{name} (AUC={auc:.3f})")
    for c, name, _, _, auc in curves:
        if auc is None:
            ax.plot([], [], " ", label=f"{name} (AUC undefined)")
    if all(auc is None for *_, auc in curves):
        ax.text(0.5, 0.6, empty_text, ha="center", va="center", fontsize=13, color="dimgrey", transform=ax.transAxes)
    ax.set_xlim(-0.01, 1.01)  # margins keep perfect curves (along the axes) visible
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if k <= 10:
        ax.legend(loc="lower right", fontsize=8)
    else:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7, ncol=legend_cols)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# everything at once

def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def evaluate(y_true, probs, class_names, out_dir, history=None,
             prefix: str = "test_") -> tuple[dict[str, float], list[Path]]:
    """Metrics plus every artifact the pipeline logs after training, written to out_dir.

    Files: confusion_matrix.png, classification_report.txt, classification_report.json (sklearn's dict plus
    `confusion_matrix` rows=true/cols=pred and `class_names`), training_curves.png (only when history is
    not None; an empty history still gets a 'no history' figure), roc_curves.png.
    """
    from sklearn.metrics import classification_report

    metrics = classification_metrics(y_true, probs, class_names, prefix=prefix)  # validates everything
    names = _check_names(class_names)
    k = len(names)
    y = _check_labels(y_true, k, "y_true")
    p = _check_probs(probs, len(y), k)
    pred = p.argmax(axis=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written = [confusion_matrix_png(y, pred, names, out / "confusion_matrix.png")]
    kw = dict(labels=list(range(k)), target_names=names, zero_division=0)
    with _quiet():
        text = classification_report(y, pred, digits=4, **kw)
        report = classification_report(y, pred, output_dict=True, **kw)
    txt = out / "classification_report.txt"
    txt.write_text(text, encoding="utf-8")
    report["confusion_matrix"] = _confusion(y, pred, k).tolist()
    report["class_names"] = names
    js = out / "classification_report.json"
    js.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_jsonable), encoding="utf-8")
    written += [txt, js]
    if history is not None:
        written.append(training_curves_png(history, out / "training_curves.png"))
    written.append(roc_curves_png(y, p, names, out / "roc_curves.png"))
    return metrics, written


# ---------------------------------------------------------------------------------------------------------
# multi-label: zero or more findings per image, one sigmoid score per finding

DEFAULT_THRESHOLD = 0.5
THRESHOLD_RULE = ("per finding, the cut of the validation split's scores that maximizes F1 (ties: the higher cut), "
                  "placed halfway to the next lower validation score; a score >= the threshold means the finding "
                  f"is present; {DEFAULT_THRESHOLD} for a finding without positives in the validation split")
REPORT_COLUMNS = ("finding", "key", "threshold", "positives", "negatives", "prevalence", "predicted", "tp", "fp",
                  "fn", "tn", "roc_auc", "average_precision", "f1", "sensitivity", "specificity", "precision")


def _check_multi_hot(y, k: int, what: str) -> np.ndarray:
    """(n, k) rows of 0/1 (int, bool or float), one column per finding."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != k:
        raise ValueError(f"{what} must be multi-hot rows of shape (n, {k}) (one column per finding), got shape "
                         f"{y.shape}")
    if y.shape[0] == 0:
        raise ValueError(f"{what} is empty: nothing to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what} must hold only 0 and 1 (multi-hot findings), got values such as "
                         f"{sorted(set(np.unique(y[~np.isin(y, (0, 1))]).tolist()))[:5]}")
    return y.astype(np.int64)


def _check_scores(probs, n: int, k: int, what: str = "probs") -> np.ndarray:
    """(n, k) float64 independent per-finding probabilities in [0, 1] (sigmoid outputs)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"{what} must have shape (n, k) = ({n}, {k}) (one sigmoid output per finding), "
                         f"got shape {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"the labels have {n} rows but {what} has {p.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{what} contains NaN or inf in {int((~np.isfinite(p)).any(1).sum())} rows")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"{what} must be sigmoid probabilities in [0, 1], got values in [{p.min():.4g}, "
                         f"{p.max():.4g}]: logits?")
    return p


def _f1_cut(y: np.ndarray, s: np.ndarray) -> float | None:
    """THRESHOLD_RULE for one finding: None when y has no positive."""
    pos = int(y.sum())
    if pos == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], np.cumsum(y[order])
    cuts = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last row of each run of equal scores
    f1 = 2 * tp[cuts] / (tp[cuts] + cuts + 1 + pos)     # 2TP / (2TP + FP + FN), FP + TP = cut + 1
    best = cuts[int(np.argmax(f1))]                     # first maximum: the higher cut
    if best + 1 == len(s):
        return float(s[best])
    mid = (s[best] + s[best + 1]) / 2
    return float(mid if mid > s[best + 1] else s[best])  # adjacent floats: keep the cut's own score


def choose_thresholds(y_val, probs_val, finding_names) -> tuple[np.ndarray, list[str]]:
    """Per-finding decision thresholds from the validation split (THRESHOLD_RULE) and a note per fallback.
    y_val None or empty (no validation split): every finding gets DEFAULT_THRESHOLD, noted."""
    names = _check_names(finding_names, minimum=1)
    k = len(names)
    out = np.full(k, DEFAULT_THRESHOLD)
    if y_val is None or len(y_val) == 0:
        return out, [f"no validation split: every threshold is {DEFAULT_THRESHOLD}"]
    y = _check_multi_hot(y_val, k, "y_val")
    p = _check_scores(probs_val, len(y), k, "probs_val")
    notes = []
    for j in range(k):
        t = _f1_cut(y[:, j], p[:, j])
        if t is None:
            notes.append(f"{names[j]}: no positive in the validation split, threshold {DEFAULT_THRESHOLD}")
        else:
            out[j] = t
    return out, notes


def _check_thresholds(thresholds, k: int) -> np.ndarray:
    t = np.full(k, DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds, dtype=np.float64).ravel()
    if t.shape != (k,) or not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds must be {k} finite numbers (one per finding), got {np.asarray(thresholds)!r}")
    return t


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def multilabel_summary(y_true, probs, finding_names, thresholds=None) -> dict:
    """Everything the multi-label report says, unprefixed: {"per_finding": [row per finding (REPORT_COLUMNS;
    None where undefined)], "aggregates": {...}, "notes": [...]}.

    A finding is present when its score >= its threshold (None: DEFAULT_THRESHOLD for all). Undefined, and
    left out of the means (the counts n_auc_findings, n_ap_findings, n_f1_findings say how many were
    averaged): ROC-AUC without positives or without negatives, AP / F1 / sensitivity without positives,
    specificity without negatives. Micro AUC and AP pool every (image, finding) pair."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    names = _check_names(finding_names, minimum=1)
    k = len(names)
    y = _check_multi_hot(y_true, k, "y_true")
    p = _check_scores(probs, len(y), k)
    t = _check_thresholds(thresholds, k)
    pred = (p >= t).astype(np.int64)
    tp, fp = (pred & y).sum(0), (pred & (1 - y)).sum(0)
    fn, tn = ((1 - pred) & y).sum(0), ((1 - pred) & (1 - y)).sum(0)
    rows, notes = [], []
    with _quiet():
        for j, key in enumerate(metric_key_names(names)):
            pos, neg = int(y[:, j].sum()), int(len(y) - y[:, j].sum())
            both = pos and neg
            rows.append({
                "finding": names[j], "key": key, "threshold": float(t[j]), "positives": pos, "negatives": neg,
                "prevalence": pos / len(y), "predicted": int(pred[:, j].sum()), "tp": int(tp[j]), "fp": int(fp[j]),
                "fn": int(fn[j]), "tn": int(tn[j]),
                "roc_auc": float(roc_auc_score(y[:, j], p[:, j])) if both else None,
                "average_precision": float(average_precision_score(y[:, j], p[:, j])) if pos else None,
                "f1": _ratio(2 * int(tp[j]), 2 * int(tp[j]) + int(fp[j]) + int(fn[j])) if pos else None,
                "sensitivity": _ratio(int(tp[j]), pos), "specificity": _ratio(int(tn[j]), neg),
                "precision": _ratio(int(tp[j]), int(tp[j] + fp[j])) if pos or tp[j] + fp[j] else None})
            if not both:
                undefined = "ROC-AUC, AP, F1, sensitivity" if not pos else "ROC-AUC, specificity"
                notes.append(f"{names[j]}: no {'positive' if not pos else 'negative'} in the evaluated split; "
                             f"{undefined} undefined, left out of the means")
        flat_y, flat_p = y.ravel(), p.ravel()
        agg = {"n": float(len(y)), "n_findings": float(k)}
        for name, col in (("auc", "roc_auc"), ("ap", "average_precision"), ("f1", "f1")):
            vals = [r[col] for r in rows if r[col] is not None]
            agg[f"n_{name}_findings"] = float(len(vals))
            if vals:
                agg[f"{'macro_f1' if name == 'f1' else 'mean_' + name}"] = float(np.mean(vals))
        if 0 < flat_y.sum() < flat_y.size:
            agg["micro_auc"] = float(roc_auc_score(flat_y, flat_p))
        if flat_y.sum():
            agg["micro_ap"] = float(average_precision_score(flat_y, flat_p))
        stp, sfp, sfn = int(tp.sum()), int(fp.sum()), int(fn.sum())
        if 2 * stp + sfp + sfn:
            agg["micro_f1"] = 2 * stp / (2 * stp + sfp + sfn)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    agg |= {"label_cardinality": float(y.sum(1).mean()), "predicted_label_cardinality": float(pred.sum(1).mean()),
            "no_finding_rate": float((y.sum(1) == 0).mean()),
            "subset_accuracy": float((pred == y).all(1).mean()), "hamming_loss": float((pred != y).mean()),
            "log_loss": float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())}
    return {"per_finding": rows, "aggregates": agg, "notes": notes}


_PER_FINDING_KEYS = {"roc_auc": "roc_auc", "average_precision": "ap", "f1": "f1", "sensitivity": "sensitivity",
                     "specificity": "specificity", "precision": "precision", "positives": "support"}


def multilabel_metrics(y_true, probs, finding_names, thresholds=None, prefix: str = "test_") -> dict[str, float]:
    """Flat `{prefix}<metric>` floats ready for `mlflow.log_metrics`, never NaN (see `multilabel_summary`).

    Aggregates: mean_auc (macro ROC-AUC, the default champion objective), micro_auc, mean_ap (mAP), micro_ap,
    macro_f1, micro_f1, label_cardinality, predicted_label_cardinality, no_finding_rate, subset_accuracy,
    hamming_loss, log_loss (mean binary cross-entropy), n, n_findings, n_auc_findings, n_ap_findings,
    n_f1_findings. Per finding (sanitized name, see `metric_key_names`): roc_auc_, ap_, f1_, sensitivity_,
    specificity_, precision_ (at its threshold), support_ (positives); an undefined one is omitted."""
    _check_prefix(prefix)
    summary = multilabel_summary(y_true, probs, finding_names, thresholds)
    m = dict(summary["aggregates"])
    for r in summary["per_finding"]:
        for col, name in _PER_FINDING_KEYS.items():
            if r[col] is not None:
                m[f"{name}_{r['key']}"] = float(r[col])
    return {f"{prefix}{name}": v for name, v in m.items()}


def multilabel_roc_png(y_true, probs, finding_names, path) -> Path:
    """One ROC per finding with its AUC; findings without positives or negatives listed as undefined."""
    s = multilabel_summary(y_true, probs, finding_names)
    names = [r["finding"] for r in s["per_finding"]]
    y = _check_multi_hot(y_true, len(names), "y_true")
    p = _check_scores(probs, len(y), len(names))
    curves = [(j, names[j], y[:, j] == 1, p[:, j], r["roc_auc"]) for j, r in enumerate(s["per_finding"])]
    agg = s["aggregates"]
    mean = f", mean AUC={agg['mean_auc']:.3f} over {int(agg['n_auc_findings'])}" if "mean_auc" in agg else ""
    return _roc_png(curves, len(names), f"ROC per finding{mean}",
                    "ROC undefined:\nno finding has both\npositives and negatives", path)


def cooccurrence_png(y_true, finding_names, path) -> Path:
    """Finding co-occurrence: cell (i, j) counts images with both findings (the diagonal: images with finding i);
    colour is the % of finding i's images that also have finding j, so rare findings read as well as common ones."""
    names = _check_names(finding_names, minimum=1)
    k = len(names)
    y = _check_multi_hot(y_true, k, "y_true")
    co = y.T @ y
    fig, ax = _percent_grid(co, np.diag(co), names, "Purples", "% of the row finding's images", decimals=0)
    ax.set_xlabel("also has")
    ax.set_ylabel("finding")
    none = int((y.sum(1) == 0).sum())
    ax.set_title(f"Finding co-occurrence (n={len(y)}, {none} with no finding, "
                 f"{int((y.sum(1) > 1).sum())} with several)")
    return _save(fig, path)


def evaluate_multilabel(y_true, probs, finding_names, out_dir, y_val=None, probs_val=None, history=None,
                        prefix: str = "test_",
                        thresholds=None) -> tuple[dict[str, float], list[Path], dict[str, float]]:
    """Multi-label metrics and artifacts in out_dir, with thresholds chosen on (y_val, probs_val) by
    THRESHOLD_RULE, or `thresholds` ({finding: t}, chosen by evaluate.operating_point) as given; returns
    (metrics, files, {finding: threshold}).

    Files: multilabel_report.json (rule, thresholds, aggregates, one row per finding, notes), multilabel_report.csv
    (the rows), thresholds.json ({finding: threshold}, what the packaged classifier uses), roc_curves.png,
    cooccurrence.png (of y_true), training_curves.png (only when history is not None)."""
    names = _check_names(finding_names, minimum=1)
    rule = THRESHOLD_RULE if thresholds is None else "evaluate.operating_point (operating_points.csv)"
    if thresholds is None:
        thresholds, notes = choose_thresholds(y_val, probs_val, names)
    else:
        thresholds, notes = _check_thresholds([thresholds[n] for n in names], len(names)), []
    metrics = multilabel_metrics(y_true, probs, names, thresholds, prefix=prefix)  # validates everything
    summary = multilabel_summary(y_true, probs, names, thresholds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {n: float(t) for n, t in zip(names, thresholds)}
    report = {"task": "multilabel", "findings": names, "n": len(np.asarray(y_true)), "threshold_rule": rule,
              "thresholds": by_name, "aggregates": summary["aggregates"], "per_finding": summary["per_finding"],
              "notes": notes + summary["notes"]}
    js, csv, th = out / "multilabel_report.json", out / "multilabel_report.csv", out / "thresholds.json"
    js.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_jsonable), encoding="utf-8")
    _write_csv(csv, summary["per_finding"])
    th.write_text(json.dumps(by_name, indent=2, ensure_ascii=False), encoding="utf-8")
    written = [js, csv, th]
    if history is not None:
        written.append(training_curves_png(history, out / "training_curves.png"))
    written.append(multilabel_roc_png(y_true, probs, names, out / "roc_curves.png"))
    written.append(cooccurrence_png(y_true, names, out / "cooccurrence.png"))
    return metrics, written, by_name


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        w.writeheader()
        w.writerows({c: ("" if r[c] is None else r[c]) for c in REPORT_COLUMNS} for r in rows)


def predict_split(model, data, split: str, tta_mode: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of one split of `data` (data.materialize.Materialized), predicted batch by batch
    (never all images in memory): labels (N,) class indices, or (N, K) multi-hot for multilabel. tta_mode: test-time
    augmentation (medspark.tta: none | flip | flip_shift), the probabilities averaged over its views."""
    from . import tta
    from .data import loader

    probs, labels = [], []
    k = len(data.classes) if data.multilabel else None
    for x, y in loader.dataset(data.split_url(split), data.shape, 128, training=False, num_classes=k):
        probs.append(tta.predict(model.predict_on_batch, x, tta_mode))
        labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def evaluate_split(model, data, out_dir, history=None, options: Mapping | None = None) -> tuple[dict[str, float], dict]:
    """A trained model on the test split of `data` (data.materialize.Materialized), then `evaluate` (binary,
    multiclass) or `evaluate_multilabel` (data.task multilabel: thresholds chosen on the validation split) into
    out_dir/evaluation; metrics and files are logged to the active MLflow run. options: the run's `evaluate:`
    config (a mapping; None = its defaults). Returns (metrics, shipped): what the packaged classifier ships with,
    chosen on the validation split (serving.log_model's `shipped`): {"thresholds": {finding: t}} for multilabel,
    "temperature" (medspark.calibration), "tta" (medspark.tta), and for binary {"thresholds": {positive class: t}}
    (medspark.operating_points). Also writes operating_points.csv (binary, multilabel), test_predictions.csv
    (medspark.compare), intervals.csv (medspark.uncertainty) and the Grad-CAM gallery (medspark.explain).

    Predictions use evaluate.tta's views. The temperature is fitted on the validation split and applied to both
    splits' probabilities (calibration metrics, reliability.png, calibration.csv). Everything else (the metrics that
    existed before calibration, the operating points chosen on validation, the intervals) is computed on the
    network's own probabilities, so its values do not change with calibration; thresholds ship converted to the
    calibrated scale (a temperature is monotonic per output), where they make exactly the same decisions."""
    import mlflow

    from . import calibration, compare, operating_points, uncertainty
    from .evaluate_sources import log_source_metrics, split_columns  # test metrics per source of a merged dataset
    from .explain import gallery

    options = dict(options or {})
    opts, rule = calibration.Options.from_mapping(options), options.get("operating_point", "auto")
    out = Path(out_dir) / "evaluation"
    y, p = predict_split(model, data, "test", opts.tta)
    y_val, p_val = predict_split(model, data, "val", opts.tta) if data.sizes.get("val") else (None, None)
    cal = calibration.calibrate(y, p, y_val, p_val, data.multilabel, opts, out)  # T from val only
    op_thresholds, chosen = None, operating_points.resolve(rule, data.task)  # on val, evaluate.operating_point
    if chosen and (data.task == "binary" or chosen != "f1"):  # multilabel f1: evaluate_multilabel's, as before
        _, _, op_thresholds = operating_points.operating_point_metrics(y_val, p_val, y, p, data.classes, data.task,
                                                                       rule)
    if data.multilabel:
        metrics, files, thresholds = evaluate_multilabel(y, p, data.classes, out, y_val=y_val, probs_val=p_val,
                                                         history=history, thresholds=op_thresholds)
    else:
        (metrics, files), thresholds = evaluate(y, p, data.classes, out, history=history), op_thresholds
    op_metrics, op_rows, _ = operating_points.operating_point_metrics(y_val, p_val, y, p, data.classes, data.task,
                                                                      rule, thresholds=thresholds)
    if op_rows:
        metrics |= op_metrics
        for r in op_rows:  # the same decision on the scale the classifier answers (calibrated probabilities)
            t = r.get("threshold")
            r["shipped_threshold"] = t if t is None or cal.temperature == 1.0 else calibration.scale_thresholds(
                {r["class"]: t}, cal.temperature, data.task, data.classes)[r["class"]]
        files.append(operating_points.write_csv(op_rows, out / "operating_points.csv"))
    metrics.update(cal.metrics)
    files += cal.files
    cols = split_columns(data, y, ["sha1", "patient"], "test", "test predictions")
    files.append(compare.write_predictions(out / "test_predictions.csv", cols["sha1"], y, p, data.classes,
                                           data.task))
    boot = uncertainty.check_options(options.get("bootstrap"))
    if boot["resamples"]:  # intervals, over patients where the test rows carry one
        binary_t = thresholds.get(data.classes[1]) if thresholds and data.task == "binary" else None
        rows = uncertainty.intervals(y, p, data.classes, data.task, cols["patient"], boot["resamples"],
                                     boot["level"], boot["seed"], operating_point=binary_t)
        metrics |= uncertainty.as_metrics(rows)
        files.append(uncertainty.write_csv(rows, out / "intervals.csv"))
    if opts.tta != "none":  # the same split without test-time augmentation, so that its gain is visible
        y0, p0 = predict_split(model, data, "test")
        if data.multilabel:
            plain = multilabel_metrics(y0, p0, data.classes, prefix="test_")
            metrics |= {"test_mean_auc_no_tta": plain["test_mean_auc"]} if "test_mean_auc" in plain else {}
        else:
            metrics["test_accuracy_no_tta"] = float((np.asarray(p0).argmax(axis=1) == y0).mean())
    gradcam_files, gradcam_metrics = gallery(model, data, y, p, out, options)  # most confident right/wrong images
    metrics.update(gradcam_metrics)
    if thresholds and cal.temperature != 1.0:  # the classifier compares calibrated probabilities with them
        thresholds = calibration.scale_thresholds(thresholds, cal.temperature, data.task, data.classes)
        if data.multilabel:
            (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2, ensure_ascii=False),
                                                 encoding="utf-8")
    mlflow.log_metrics(metrics)
    for f in files:
        mlflow.log_artifact(str(f), "evaluation")
    for f in gradcam_files:
        mlflow.log_artifact(str(f), "evaluation/gradcam")
    metrics.update(log_source_metrics(data, y, p))
    from .evaluate_volumes import log_volume_metrics  # files of several rows (DICOM frames, NIfTI slices)

    metrics.update(log_volume_metrics(data, y, p, options.get("volume_aggregation", "mean")))
    shipped = {"temperature": cal.temperature, "tta": opts.tta}
    return metrics, ({"thresholds": thresholds, **shipped} if thresholds is not None else shipped)
