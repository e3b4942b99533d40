"""Every option of every config group composes and builds; bad settings fail before Spark starts, with one
line that names the key."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from medspark.backends import build as build_backend
from medspark.config import ConfigError, check, config_dir
from medspark.spark import master_url
from medspark.train import list_dataset
from conftest import REPO, SHARED, make_cfg

GROUPS = {g: sorted(p.stem for p in (Path(config_dir()) / g).glob("*.yaml"))
          for g in ("dataset", "model", "backend", "cluster", "experiment")}
REAL_ROOTS = {"brain_mri": "brain-tumor-mri", "brain_mri_binary": "brain-mri-yes-no",
              "chest_xray": "chest-xray-pneumonia", "image_folder": "brain-mri-yes-no"}


def test_groups_hold_the_promised_options():
    assert {"synthetic", "brain_mri", "brain_mri_binary", "chest_xray", "image_folder"} <= set(GROUPS["dataset"])
    assert {"small_cnn", "resnet50", "dense"} <= set(GROUPS["model"])
    assert {"local", "standalone", "yarn", "k8s"} <= set(GROUPS["cluster"])
    assert "single" in GROUPS["backend"]


@pytest.mark.parametrize("name", GROUPS["dataset"])
def test_every_dataset_option_lists_images(tmp_path, name):
    overrides = [f"dataset={name}", "dataset.generate.per_class=3"] if name == "synthetic" else [f"dataset={name}"]
    if name in REAL_ROOTS:
        root = SHARED / REAL_ROOTS[name]
        if not root.is_dir():
            pytest.skip(f"{root} not present")
        overrides.append(f"dataset.root={root}")
    cfg = make_cfg(tmp_path, overrides)
    check(cfg)
    listing = list_dataset(cfg.dataset)
    assert len(listing.classes) >= 2 and all(n > 0 for n in listing.counts().values())


@pytest.mark.parametrize("name", GROUPS["model"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_option_builds_and_predicts(tmp_path, name, channels):
    import numpy as np

    cfg = make_cfg(tmp_path, [f"model={name}", "model.weights=null"] if name == "resnet50" else [f"model={name}"])
    model = instantiate(cfg.model, input_shape=(64, 64, channels), num_classes=3)
    probs = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, channels)).astype("float32"), verbose=0)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("name", GROUPS["backend"])
def test_every_backend_option_instantiates(tmp_path, name):
    backend = build_backend(make_cfg(tmp_path, [f"backend={name}"]).backend)
    assert callable(backend.fit)


@pytest.mark.parametrize("name, master", [("local", "local[2]"), ("standalone", "spark://127.0.0.1:7077"),
                                          ("yarn", "yarn"), ("k8s", "k8s://https://kubernetes.default.svc:443")])
def test_every_cluster_option_gives_a_master_url(tmp_path, name, master):
    cfg = make_cfg(tmp_path, [f"cluster={name}"])
    assert master_url(cfg.cluster) == master
    if name == "k8s":  # the container image has no sensible default: the user must name it
        with pytest.raises(ConfigError, match="spark.kubernetes.container.image"):
            check(cfg)
    else:
        check(cfg)


@pytest.mark.parametrize("name", GROUPS["experiment"])
def test_every_experiment_composes(tmp_path, name):
    cfg = make_cfg(tmp_path, [f"experiment={name}", "dataset.root=/data"])
    assert cfg.dataset.name and cfg.model.name


@pytest.mark.parametrize("overrides, key", [
    (["dataset=brain_mri"], "dataset.root"),
    (["preprocess.image_size=0"], "preprocess.image_size"),
    (["preprocess.channels=2"], "preprocess.channels"),
    (["split.test=0"], "split.test"),
    (["split.test=1"], "split.test"),
    (["split.val=0.6", "split.test=0.4"], "nothing to train"),
    (["train.epochs=0"], "train.epochs"),
    (["train.objective=val_loss"], "train.objective"),
])
def test_bad_settings_fail_early_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(make_cfg(tmp_path, overrides))


def test_more_cores_than_the_machine_has(tmp_path):
    import os

    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        cfg.cluster.cores = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match="cluster.cores"):
        check(cfg)


def run_cli(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "medspark.train", f"paths.work_dir={tmp_path}/w",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_cli_missing_root_is_one_clear_line(tmp_path):
    res = run_cli("dataset=brain_mri", tmp_path=tmp_path)
    assert res.returncode == 2
    assert "medspark: error: required setting(s) not given: dataset.root" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_unknown_option_lists_the_valid_ones(tmp_path):
    res = run_cli("model=vgg99", tmp_path=tmp_path)
    assert res.returncode != 0
    assert "vgg99" in res.stderr and "small_cnn" in res.stderr and "resnet50" in res.stderr


def test_secrets_are_never_logged_in_clear():
    from medspark.tracking import flatten, mask_secrets

    flat = mask_secrets(flatten({"db": {"password": "hunter2", "api_token": "t0k", "user": "bob"},
                                 "tracking": {"uri": "https://bob:hunter2@mlflow.example.org:5000"},
                                 "paths": {"data_url": "s3a://bucket/medspark"}}))
    assert "hunter2" not in str(flat) and "t0k" not in str(flat)
    assert flat["db.user"] == "bob" and flat["tracking.uri"] == "https://bob:***@mlflow.example.org:5000"
    assert flat["paths.data_url"] == "s3a://bucket/medspark"
