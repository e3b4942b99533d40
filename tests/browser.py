"""Headless Chromium for the tests that look at a rendered page (the run report, the MLflow UI), driven by selenium
through Debian's `chromedriver`. The session fixture `browser` (tests/conftest.py) calls `chrome()`.

A machine without Chromium gets it here: `apt-get install -y chromium chromium-driver` (CI machines run the tests as
root). If that install fails the test fails with apt's reason; only a user who is not root and has no Chromium is
skipped, with the reason. The flags keep Chromium off the network (the machine has none: without them it hangs on
connection attempts)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars")
INSTALL = ["apt-get", "install", "-y", "chromium", "chromium-driver"]


def ensure_chromium() -> None:
    """Chromium and chromedriver present, installed with apt-get when missing (as root), else a skip or a failure
    that says why."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing and not root, so cannot run `{' '.join(INSTALL)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], INSTALL):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode:
            pytest.fail(f"`{' '.join(cmd)}` failed ({res.returncode}), so the browser tests cannot run:\n"
                        f"{res.stderr[-2000:]}", pytrace=False)
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"`{' '.join(INSTALL)}` succeeded but {CHROMIUM} / {CHROMEDRIVER} are still missing", pytrace=False)


def chrome():
    """A headless Chromium (selenium WebDriver) with a fresh profile; quits and removes the profile at the end."""
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="medspark-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_screenshot(driver, path: Path) -> Path:
    """The whole page (not only the window) as a PNG at `path`."""
    import base64

    size = driver.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": max(size[0], 1), "height": max(size[1], 1), "scale": 1}})
    Path(path).write_bytes(base64.b64decode(shot["data"]))
    return Path(path)


def broken_images(driver) -> list[str]:
    """The alt text (or the start of src) of every <img> of the page that did not load."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.alt || i.src.slice(0, 60))")
