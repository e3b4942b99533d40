"""The run report: one self-contained HTML file per training run (`report.html` at the run's root in MLflow).

Everything is inline (CSS, images as data: URIs); no JavaScript, no network: the file opens from the artifact
store, a mail attachment or a USB stick alike. It reads only what the run produced: the files under
`<out_dir>/evaluation/` (whatever evaluation parts exist in this version), the metrics dict and the
Materialized data summary. A section whose inputs are missing says "not measured in this run".

No protected health information: the report names no image file and no patient; rejected files are counted by
the kind of reason (the text before its first ':'), and everything that comes from data (class names, reasons,
CSV cells) is HTML-escaped.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

NOT_MEASURED = "not measured in this run"
SECTIONS = ("Data", "Model and training", "Metrics", "Calibration", "Operating points", "Confusion matrix", "ROC",
            "Grad-CAM gallery", "Model card")  # the <h2> headings, in order
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
CALIBRATION_KEYS = ("test_ece", "test_ece_adaptive", "test_brier", "temperature", "val_ece_before_temperature",
                    "val_ece_after_temperature")
OWN_SECTION = ("test_ece", "test_brier", "test_op_", "test_sensitivity_at_spec_", "test_pointing_game")  # shown apart
HEADLINE = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc_ovr", "test_mean_auc",
            "test_mean_ap", "test_subset_accuracy", "test_hamming_loss", "test_log_loss", "test_n")
CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #345}h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#eef}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.missing{color:#777;font-style:italic}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:240px}.gallery img{width:240px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}
"""


def esc(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as the report shows it: 4 significant decimals, counts as integers, nan as 'n/a'."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return str(int(value))
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return esc(value)


def image(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data: URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def missing(what: str = "") -> str:
    return f'<p class="missing">{esc(what + ": " if what else "")}{NOT_MEASURED}</p>'


def table(header: list, rows: list[list], numeric: bool = True) -> str:
    """An HTML table; cells escaped, numbers formatted (fmt)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{fmt(c)}</td>' if numeric and isinstance(c, (int, float))
                                    else f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(evaluation: Path, name: str, alt: str) -> str:
    path = evaluation / name
    return image(path, alt) if path.is_file() else missing(alt)


def read_csv(path: Path) -> list[dict[str, str]] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f))


def reason_kind(reason: str) -> str:
    """A rejection reason without its specifics (numbers, decoder messages that may quote a file name)."""
    kind = str(reason).split(":", 1)[0].strip() or "unknown"
    return "other" if "/" in kind or "\\" in kind else kind


# ---------------------------------------------------------------- sections

def data_section(data, run: Mapping) -> str:
    parts = [f"<p>Dataset <b>{esc(run.get('dataset', '?'))}</b>, task {esc(data.task)}, "
             f"{len(data.classes)} {'findings' if data.multilabel else 'classes'}; data fingerprint "
             f"<code>{esc(data.fingerprint)}</code>. {fmt(data.listed)} files listed, {fmt(data.accepted)} accepted, "
             f"{fmt(len(data.rejected))} rejected.</p>"]
    usual = ("train", "val", "test")
    splits = [s for s in usual if s in data.sizes] + sorted(set(data.sizes) - set(usual))
    rows = [[c] + [data.per_class.get(s, {}).get(c, 0) for s in splits] for c in data.classes]
    rows.append(["all images"] + [data.sizes.get(s, 0) for s in splits])
    parts.append("<h3>Images per split and " + ("finding (positives)" if data.multilabel else "class") + "</h3>"
                 + table(["class"] + splits, rows))
    reasons = Counter(reason_kind(why) for _, why in data.rejected)
    parts.append("<h3>Rejected files</h3>" + (table(["reason", "files"], [[k, n] for k, n in reasons.most_common()])
                                               if reasons else "<p>None: every listed file was accepted.</p>"))
    parts.append("<h3>Duplicates</h3>" + table(["", "count"], [
        ["contents present more than once (groups)", data.duplicate_groups],
        ["extra copies (files beyond the first of each content)", data.duplicate_files],
        ["contents filed under more than one label", data.label_conflicts],
        ["files moved to the test split with a copy or patient there", data.moved_to_test]]))
    stats = data.split_stats or {}
    patients = {k.removeprefix("split_patients_"): v for k, v in stats.items() if k.startswith("split_patients_")}
    if any(patients.values()):
        rows = [[s, patients[s]] for s in sorted(patients)]
        parts.append("<h3>Patients</h3><p>Splits are drawn by patient: no patient is in two splits (overlap "
                     f"{fmt(stats.get('split_patient_overlap', 0))}).</p>" + table(["split", "patients"], rows))
    else:
        parts.append("<h3>Patients</h3><p>No patient ids in this dataset: each image counts as its own patient, so "
                     "images of one person may sit in different splits.</p>")
    if "split_max_prevalence_diff" in stats:
        parts.append(f"<p>Largest prevalence difference between train and val/test over classes: "
                     f"{fmt(float(stats['split_max_prevalence_diff']))}.</p>")
    if data.per_source:
        sources = sorted({src for by in data.per_source.values() for src in by})
        rows = [[src] + [data.per_source.get(s, {}).get(src, 0) for s in splits] for src in sources]
        parts.append("<h3>Sources</h3>" + table(["source"] + splits, rows))
    else:
        parts.append(f"<h3>Sources</h3><p>One source: {esc(run.get('dataset', '?'))}.</p>")
    return "".join(parts)


def training_section(evaluation: Path, metrics: Mapping, run: Mapping) -> str:
    config = run.get("config") or {}
    rows = [[k, v] for k, v in config.items()]
    if "epochs_run" in metrics:
        rows.append(["epochs run", metrics["epochs_run"]])
    return ((table(["setting", "value"], rows, numeric=False) if rows else missing("configuration"))
            + figure(evaluation, "training_curves.png", "training curves"))


def metrics_section(evaluation: Path, metrics: Mapping) -> str:
    names = [k for k in metrics if k.startswith("test_") and not k.endswith((CI_LOW, CI_HIGH))
             and not k.startswith(OWN_SECTION)]
    if not names:
        return missing("test metrics")
    names.sort(key=lambda k: (HEADLINE.index(k) if k in HEADLINE else len(HEADLINE), k))
    rows = []
    for k in names:
        low, high = metrics.get(k + CI_LOW), metrics.get(k + CI_HIGH)
        interval = f"[{fmt(float(low))}, {fmt(float(high))}]" if low is not None and high is not None else ""
        value = float(metrics[k])
        count = k == "test_n" or k.startswith("test_support") or k.endswith("_n")  # images, not a rate
        rows.append([k.removeprefix("test_"), int(value) if count and value.is_integer() else value, interval])
    intervals = read_csv(evaluation / "intervals.csv")
    note = ("<p>No confidence intervals: " + NOT_MEASURED + ".</p>" if not any(r[2] for r in rows) else "")
    if intervals:
        units = sorted({r.get("unit", "") for r in intervals} - {""})
        resamples = sorted({r.get("resamples", "") for r in intervals} - {""})
        note = (f"<p>95% intervals: bootstrap over test {esc(', '.join(units) or 'images')}, "
                f"{esc(', '.join(resamples) or '?')} resamples.</p>")
    return note + table(["metric (test split)", "value", "95% interval"], rows)


def calibration_section(evaluation: Path, metrics: Mapping) -> str:
    rows = [[k, float(metrics[k])] for k in CALIBRATION_KEYS if k in metrics]
    if not rows and not (evaluation / "reliability.png").is_file():
        return missing("calibration")
    return ((table(["measure", "value"], rows) if rows else missing("ECE, Brier, temperature"))
            + figure(evaluation, "reliability.png", "reliability diagram"))


def operating_points_section(evaluation: Path, metrics: Mapping) -> str:
    rows = read_csv(evaluation / "operating_points.csv")
    at = [[k.removeprefix("test_"), float(v)] for k, v in sorted(metrics.items())
          if k.startswith(("test_op_", "test_sensitivity_at_spec_")) and not k.endswith((CI_LOW, CI_HIGH))]
    if not rows and not at:
        return missing("operating points")
    out = ""
    if rows:
        header = list(rows[0])
        out += "<h3>Thresholds chosen on the validation split</h3>" + table(header, [[r[h] for h in header]
                                                                                      for r in rows], numeric=False)
    if at:
        out += "<h3>On the test split</h3>" + table(["measure", "value"], at)
    return out


def confusion_section(evaluation: Path, multilabel: bool) -> str:
    if multilabel:  # no confusion matrix for independent findings: their co-occurrence in the test labels
        return ("<p>Multi-label: one decision per finding, no confusion matrix; the findings' co-occurrence in the "
                "test labels:</p>" + figure(evaluation, "cooccurrence.png", "co-occurrence of findings"))
    return figure(evaluation, "confusion_matrix.png", "confusion matrix")


def gradcam_section(evaluation: Path, metrics: Mapping) -> str:
    folder = evaluation / "gradcam"
    listing = folder / "gallery.json"
    if not listing.is_file():
        return missing("Grad-CAM gallery")
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except ValueError:
        return missing("Grad-CAM gallery (gallery.json unreadable)")
    cards = []
    for e in entries if isinstance(entries, list) else []:
        path = folder / Path(str(e.get("file", ""))).name  # the overlay's own file, never a path outside gradcam/
        if not path.is_file():
            continue
        prob = e.get("probability")
        caption = (f"{esc(str(e.get('kind', '')).replace('_', ' '))}: true {esc(e.get('true', '?'))}, predicted "
                   f"{esc(e.get('predicted', '?'))}" + (f" ({fmt(float(prob))})" if prob is not None else ""))
        cards.append(f"<figure>{image(path, 'Grad-CAM overlay')}<figcaption>{caption}</figcaption></figure>")
    point = (f"<p>Pointing game (Grad-CAM peak inside the lesion): {fmt(float(metrics['test_pointing_game']))}</p>"
             if "test_pointing_game" in metrics else "")
    return point + (f'<div class="gallery">{"".join(cards)}</div>' if cards else missing("Grad-CAM overlays"))


def model_card_section(data, metrics: Mapping, run: Mapping) -> str:
    dataset = str(run.get("dataset", "?"))
    sizes = ", ".join(f"{data.sizes.get(s, 0)} {s}" for s in ("train", "val", "test"))
    limits = ["Evaluated on a held-out split of the same dataset only; performance on other scanners, sites, "
              "populations or acquisition protocols is unknown."]
    if len({src for by in data.per_source.values() for src in by}) < 2:
        limits.append("Single-site data: trained and tested on one source; expect a drop elsewhere.")
    if dataset.startswith("synthetic"):
        limits.append("Synthetic phantoms are not patients: numbers on them say nothing about clinical performance.")
    if not any(v for k, v in (data.split_stats or {}).items() if k.startswith("split_patients_")):
        limits.append("No patient ids: images of one person may be in both training and test, which can make "
                      "the test numbers optimistic.")
    limits.append("Probabilities are " + ("temperature-scaled on the validation split" if "temperature" in metrics
                                          else "not calibrated") + "; thresholds are chosen on the validation split.")
    uri, keras = run.get("classifier_uri"), run.get("model_uri")
    load = (f"<pre>import mlflow\nclassifier = mlflow.pyfunc.load_model(\"{esc(uri)}\")  # image bytes in\n"
            f"# or: medspark predict model={esc(uri)} input=&lt;image or folder&gt;</pre>"
            if uri else missing("model URI"))
    if keras:
        load += f"<p>The Keras network alone (float32 arrays in): <code>{esc(keras)}</code>.</p>"
    return (f'<p class="warn"><b>Intended use: research only. This model is not a medical device</b> and must not '
            f"be used for diagnosis, triage or any clinical decision.</p>"
            f"<h3>Data it was trained on</h3><p>Dataset {esc(dataset)} ({esc(data.task)}; "
            f"{esc(', '.join(data.classes))}), data fingerprint <code>{esc(data.fingerprint)}</code>; "
            f"{esc(sizes)} images; input {esc('x'.join(str(d) for d in data.shape))}.</p>"
            f"<h3>Limitations</h3><ul>{''.join(f'<li>{esc(t)}</li>' for t in limits)}</ul>"
            f"<h3>How to load it</h3>{load}")


# ---------------------------------------------------------------- the page

def render(evaluation: Path, metrics: Mapping[str, float], data, run: Mapping[str, Any]) -> str:
    """The report's HTML. evaluation: the run's `<out_dir>/evaluation` folder; metrics: evaluate_split's dict;
    data: data.materialize.Materialized; run: run_name, run_id, dataset, model_uri, classifier_uri and `config`
    (setting -> value, see run_facts)."""
    evaluation = Path(evaluation)
    body = {"Data": data_section(data, run),
            "Model and training": training_section(evaluation, metrics, run),
            "Metrics": metrics_section(evaluation, metrics),
            "Calibration": calibration_section(evaluation, metrics),
            "Operating points": operating_points_section(evaluation, metrics),
            "Confusion matrix": confusion_section(evaluation, data.multilabel),
            "ROC": figure(evaluation, "roc_curves.png", "ROC curves"),
            "Grad-CAM gallery": gradcam_section(evaluation, metrics),
            "Model card": model_card_section(data, metrics, run)}
    title = f"medspark run report: {run.get('run_name') or run.get('run_id') or '?'}"
    sections = "".join(f'<section id="{esc(name.lower().replace(" ", "-"))}"><h2>{esc(name)}</h2>{body[name]}'
                       f"</section>" for name in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
            f"<p>Run id <code>{esc(run.get('run_id', '?'))}</code>, dataset {esc(run.get('dataset', '?'))}.</p>"
            f"{sections}</body></html>\n")


def run_facts(cfg, summary: Mapping) -> dict[str, Any]:
    """What the report says about the run, from the resolved config and tracking.run_summary's dict."""
    from omegaconf import OmegaConf

    keys = ("model.name", "backend.name", "train.epochs", "train.batch_size", "train.lr", "train.objective",
            "preprocess.image_size", "preprocess.channels", "seed")
    config = {k: OmegaConf.select(cfg, k) for k in keys if OmegaConf.select(cfg, k, default=None) is not None}
    return {"run_id": summary.get("run_id"), "run_name": summary.get("run_name"), "dataset": cfg.dataset.name,
            "model_uri": summary.get("model_uri"), "classifier_uri": summary.get("classifier_uri"), "config": config}


def write(out_dir: Path, metrics: Mapping[str, float], data, run: Mapping[str, Any]) -> Path:
    """`<out_dir>/report.html` from `<out_dir>/evaluation` (render); returns its path."""
    path = Path(out_dir) / "report.html"
    path.write_text(render(Path(out_dir) / "evaluation", metrics, data, run), encoding="utf-8")
    return path


def log_report(out_dir: Path, metrics: Mapping[str, float], data, cfg, summary: Mapping) -> str | None:
    """Write the report (write), log it as `report.html` at the active MLflow run's root and return where it can be
    opened: the artifact's local path when the artifact store is a folder, else its runs:/ URI. A report that cannot
    be written is a warning, never the error that fails a trained, logged run."""
    import logging
    from urllib.parse import unquote, urlparse

    import mlflow

    try:
        path = write(out_dir, metrics, data, run_facts(cfg, summary))
        mlflow.log_artifact(str(path))
    except Exception as e:  # noqa: BLE001: the models are logged already; the report is a view of them
        logging.getLogger(__name__).warning("could not write the run report: %s: %s", type(e).__name__, e)
        return None
    uri = mlflow.get_artifact_uri(path.name)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    return uri if parsed.scheme else str(Path(uri).absolute())
