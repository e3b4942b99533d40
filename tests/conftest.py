"""Shared fixtures: one real `local[2]` SparkSession for the whole run, configs composed with Hydra's compose
API and pointed at temporary folders, and small samples of the real datasets in ../shared/datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from medspark.config import compose_project_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared/datasets, or a skip that says why (a user's clone does not have it)."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} not present (it lives beside the repo in ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def spark():
    from medspark.spark import session
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "local", "cores": 2, "log_level": "ERROR", "conf": {
        "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false", "spark.driver.memory": "2g"}})
    s = session(cfg, app_name="medspark-tests")
    yield s
    s.stop()


def make_cfg(tmp_path: Path, overrides: list[str] = ()):
    """The project's real config, composed as the CLI would, with every output under tmp_path."""
    cfg = compose_project_config([f"paths.work_dir={tmp_path}/work", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
                                  f"tracking.artifact_location={tmp_path}/artifacts", *overrides])
    with open_dict(cfg):
        cfg.cluster.cores = 2
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (selenium) for the whole test session: tests/browser.py."""
    from browser import chrome

    yield from chrome()
