"""The MLflow UI shows what medspark records, checked in a real browser: a real 2-job sweep (parent + 2 children named
by the swept override, dataset inputs, the best job registered with the champion alias) served by the venv's
`mlflow server` on a temporary sqlite store, and looked at in headless Chromium. The UI is a React app: every check
waits for the rendered text; a failing check saves a screenshot beside the test's tmp folder."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import full_page_screenshot
from medspark.backends.placement import free_port
from test_sweep import sweep

WAIT_S = 180  # the machine is slow and loaded: the first render of the React app can take a while


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The sweep's store behind `mlflow server`; yields (base URL, parent run, children, tmp folder)."""
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    parent, children, _ = sweep(tmp)
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")  # the venv's
    cmd = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", f"sqlite:///{tmp}/mlruns.db", "--default-artifact-root",
            f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + WAIT_S
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited: {(tmp / 'server.log').read_text()[-3000:]}"
            assert time.time() < deadline, \
                f"mlflow server not up in {WAIT_S} s: {(tmp / 'server.log').read_text()[-3000:]}"
            time.sleep(1)
        yield base, parent, children, tmp
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def page_text(driver) -> str:
    """The rendered text of the page (innerText: the runs grid's cells included)."""
    return driver.execute_script("return document.body.innerText").replace("\xa0", " ")


def wait_for_text(driver, texts: list[str], shot: Path) -> str:
    """Wait until the page's text holds every one of `texts`; on a timeout save a full-page screenshot at `shot` and
    fail with what is missing."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        text = page_text(d)
        return text if all(t in text for t in texts) else False

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=1).until(ready)
    except TimeoutException:
        full_page_screenshot(driver, shot)
        pytest.fail(f"{driver.current_url}: {[t for t in texts if t not in page_text(driver)]} not shown in {WAIT_S} "
                    f"s (screenshot {shot}); the page shows: {page_text(driver)[:1500]!r}", pytrace=False)


EXPAND_PARENT = 'button[data-component-id*="runnamecellrenderer"]'  # the +/- of a parent run (MLflow 3.x runs table)


@pytest.mark.slow
def test_the_experiment_page_lists_the_sweep_jobs_by_name_with_their_dataset(ui, browser):
    base, parent, children, tmp = ui
    names = sorted(c.info.run_name for c in children)
    assert len(set(names)) == 2, names
    browser.get(f"{base}/#/experiments/{parent.info.experiment_id}/runs")
    wait_for_text(browser, [parent.info.run_name, "Dataset"], tmp / "experiment_failed.png")
    browser.find_element("css selector", EXPAND_PARENT).click()  # the sweep's jobs are nested under its parent
    digest = children[0].data.params["data_fingerprint"]
    wait_for_text(browser, [*names, f"synthetic-train ({digest})"], tmp / "experiment_children_failed.png")
    full_page_screenshot(browser, tmp / "experiment.png")


@pytest.mark.slow
def test_the_registered_classifier_page_shows_the_champion_alias(ui, browser):
    base, parent, children, tmp = ui
    browser.get(f"{base}/#/models/medspark-synthetic-classifier")
    wait_for_text(browser, ["medspark-synthetic-classifier", "Version 1", "@ champion"], tmp / "model_failed.png")
    full_page_screenshot(browser, tmp / "model.png")
