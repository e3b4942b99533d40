"""The run report (medspark.report): fast tests on hand-made evaluation folders (escaping, no PHI, sections that
are missing say so), and a real training run whose report.html headless Chromium renders (slow)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image

from medspark import report
from medspark.data.materialize import Materialized
from browser import broken_images, full_page_screenshot

EVIL = '<script>alert("x")</script>'


def make_data(**kw) -> Materialized:
    base = dict(url="file:///tmp/d/synthetic/fp", fingerprint="0123456789abcdef", classes=["glioma", EVIL],
                shape=(32, 32, 1), sizes={"train": 40, "val": 10, "test": 10},
                per_class={"train": {"glioma": 20, EVIL: 20}, "val": {"glioma": 5, EVIL: 5},
                           "test": {"glioma": 5, EVIL: 5}},
                listed=63, accepted=60,
                rejected=[("/data/Doe_John_1970/a.png", "too small: 4x4, below preprocess.min_side=32"),
                          ("/data/Doe_John_1970/b.png", "too small: 2x9, below preprocess.min_side=32"),
                          ("/data/Roe_Jane/c.png", "corrupt or truncated: cannot identify '/data/Roe_Jane/c.png'")],
                duplicate_groups=1, duplicate_files=2, label_conflicts=0, moved_to_test=0, seconds={})
    base.update(kw)
    return Materialized(**base)


RUN = {"run_id": "abc123", "run_name": "small_cnn-single", "dataset": "synthetic",
       "model_uri": "models:/medspark-synthetic/1", "classifier_uri": "models:/medspark-synthetic-classifier/1",
       "config": {"model.name": "small_cnn", "train.epochs": 2}}


def png(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), color, np.uint8)).save(path)
    return path


@pytest.fixture
def full_evaluation(tmp_path):
    """An evaluation folder with every file the parts of issue 14 write."""
    ev = tmp_path / "evaluation"
    for name in ("confusion_matrix.png", "roc_curves.png", "training_curves.png", "reliability.png",
                 "gradcam/a.png", "gradcam/b.png"):
        png(ev / name)
    (ev / "operating_points.csv").write_text(f"class,rule,threshold\n{EVIL},youden,0.42\n")
    (ev / "intervals.csv").write_text("metric,value,ci_low,ci_high,resamples,unit\naccuracy,0.85,0.8,0.9,200,images\n")
    (ev / "gradcam" / "gallery.json").write_text(json.dumps([
        {"file": "a.png", "true": "glioma", "predicted": "glioma", "probability": 0.97, "kind": "confident_correct"},
        {"file": "../../b.png", "true": EVIL, "predicted": "glioma", "probability": 0.91, "kind": "confident_wrong"},
        {"file": "gone.png", "true": "glioma", "predicted": "glioma", "probability": 0.5,
         "kind": "confident_correct"}]))
    metrics = {"test_accuracy": 0.85, "test_accuracy_ci_low": 0.8, "test_accuracy_ci_high": 0.9, "test_macro_f1": 0.84,
               "test_n": 10.0, "test_ece": 0.031, "test_brier": 0.12, "temperature": 1.7, "test_op_sensitivity": 0.9,
               "test_sensitivity_at_spec_90": 0.88, "test_pointing_game": 0.93}
    return ev, metrics


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_every_section_reads_what_exists(full_evaluation):
    ev, metrics = full_evaluation
    page = report.render(ev, metrics, make_data(), RUN)
    assert headings(page) == list(report.SECTIONS)
    assert report.NOT_MEASURED not in page
    assert "<td>accuracy</td><td class=\"n\">0.8500</td><td>[0.8000, 0.9000]</td>" in page
    assert "bootstrap over test images, 200 resamples" in page
    assert "temperature" in page and "1.7000" in page and "0.0310" in page  # calibration
    assert "0.42" in page and "op_sensitivity" in page and "sensitivity_at_spec_90" in page  # operating points
    assert page.count("<figure>") == 2, "two overlays exist (the third's file is gone)"
    assert "Pointing game" in page and "0.9300" in page
    # 6 PNGs inlined: curves, reliability, confusion, ROC, two overlays; nothing points outside the file
    assert page.count('src="data:image/png;base64,') == 6 and "src=\"file:" not in page and "http" not in page
    assert "not a medical device" in page and "models:/medspark-synthetic-classifier/1" in page
    assert "Synthetic phantoms are not patients" in page and "Single-site data" in page


def test_data_from_the_run_is_escaped_and_no_file_path_or_name_appears(full_evaluation):
    ev, metrics = full_evaluation
    page = report.render(ev, metrics, make_data(), RUN)
    assert EVIL not in page and "<script" not in page
    assert html_escaped(EVIL) in page  # class names, operating_points.csv cells, gallery captions
    assert "Doe_John" not in page and "Roe_Jane" not in page and "/data/" not in page
    # rejected files counted by the kind of reason, without the per-file specifics
    assert "<td>too small</td><td class=\"n\">2</td>" in page
    assert "<td>corrupt or truncated</td><td class=\"n\">1</td>" in page and "4x4" not in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_a_run_with_only_the_base_evaluation_says_what_was_not_measured(tmp_path):
    """What main's evaluation writes today (no intervals, calibration, operating points, Grad-CAM)."""
    ev = tmp_path / "evaluation"
    png(ev / "confusion_matrix.png"), png(ev / "roc_curves.png")
    page = report.render(ev, {"test_accuracy": 0.5, "test_n": 10.0}, make_data(rejected=[], per_source={}), RUN)
    assert headings(page) == list(report.SECTIONS)
    for section in ("Calibration", "Operating points", "Grad-CAM gallery"):
        body = page.split(f"<h2>{section}</h2>", 1)[1].split("</section>", 1)[0]
        assert report.NOT_MEASURED in body, section
    assert "No confidence intervals: not measured in this run" in page
    assert "training curves: not measured in this run" in page  # no history given
    assert "None: every listed file was accepted" in page and "not calibrated" in page


def test_an_empty_evaluation_folder_and_no_metrics_still_renders(tmp_path):
    page = report.render(tmp_path / "nothing", {}, make_data(task="multilabel"), {})
    assert headings(page) == list(report.SECTIONS) and page.count(report.NOT_MEASURED) >= 6
    assert "no confusion matrix" in page and "model URI: not measured" in page


def test_patients_and_sources_are_counted_when_the_dataset_has_them(tmp_path):
    data = make_data(split_stats={"split_patients_train": 12, "split_patients_test": 3, "split_patient_overlap": 0},
                     per_source={"train": {"siteA": 30, "siteB": 10}, "test": {"siteA": 10}})
    page = report.render(tmp_path, {}, data, RUN)
    assert "<td>train</td><td class=\"n\">12</td>" in page and "no patient is in two splits" in page
    assert "<td>siteB</td><td class=\"n\">0</td><td class=\"n\">0</td>" not in page  # splits: train, val, test
    assert "<td>siteB</td><td class=\"n\">10</td><td class=\"n\">0</td><td class=\"n\">0</td>" in page
    assert "Single-site" not in page and "No patient ids" not in page


def test_the_hand_made_report_renders_in_chromium(browser, full_evaluation, tmp_path):
    """The browser side on its own, fast: sections, images and text as Chromium shows them."""
    ev, metrics = full_evaluation
    path = report.write(ev.parent, metrics, make_data(), RUN)
    browser.get(path.as_uri())
    check_rendered(browser)
    assert EVIL in browser.find_element("tag name", "body").text  # shown as text, not run
    full_page_screenshot(browser, tmp_path / "report.png")


def check_rendered(driver) -> str:
    """The assertions on a rendered report: every heading, every image loaded, no broken characters."""
    shown = [h.text for h in driver.find_elements("tag name", "h2")]
    assert shown == list(report.SECTIONS), shown
    assert broken_images(driver) == []
    assert driver.execute_script("return document.images.length") >= 2
    text = driver.find_element("tag name", "body").text
    assert "\ufffd" not in text and "Ã" not in text, "mis-decoded characters"
    assert "not a medical device" in text
    return text


# ---------------------------------------------------------------- a real run's report (slow)

TINY = ["dataset.generate.per_class=24", "dataset.generate.size=32", "preprocess.image_size=32", "train.epochs=2",
        "train.batch_size=16", "cluster.cores=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny synthetic run through `python -m medspark.train`."""
    tmp = tmp_path_factory.mktemp("report_run")
    uri = f"sqlite:///{tmp}/mlruns.db"
    res = subprocess.run([sys.executable, "-m", "medspark.train", *TINY, f"paths.work_dir={tmp}/work",
                          f"tracking.uri={uri}", f"tracking.artifact_location={tmp}/artifacts"],
                         cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    return {"stdout": res.stdout, "run": run, "tmp": tmp}


@pytest.mark.slow
def test_a_training_run_logs_a_report_that_renders_in_chromium(trained, browser, tmp_path):
    run = trained["run"]
    printed = re.search(r"^report:\s+(\S+)$", trained["stdout"], re.M)
    assert printed, trained["stdout"][-2000:]
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/report.html", dst_path=str(tmp_path))
    assert printed.group(1).endswith("/report.html") and open(printed.group(1), "rb").read() == open(local, "rb").read()
    browser.get(f"file://{local}")
    text = check_rendered(browser)
    assert browser.execute_script("return document.images.length") >= 3  # curves, confusion matrix, ROC at least
    assert run.info.run_id in text and "0123456789abcdef" not in text
    assert run.data.params["data_fingerprint"] in text and "Synthetic phantoms are not patients" in text
    acc = f"{run.data.metrics['test_accuracy']:.4f}"
    assert re.search(rf"accuracy\s+{acc}", text), "the report shows the logged test accuracy"
    page = open(local, encoding="utf-8").read()
    assert "/work/" not in page and str(trained["tmp"]) not in page, "no file path in the report"
    shot = full_page_screenshot(browser, tmp_path / "report.png")
    assert Image.open(shot).size[1] > 1000, "the whole page, not the window"
    mlflow.MlflowClient().log_artifact(run.info.run_id, str(shot))  # kept with the run: report.png
