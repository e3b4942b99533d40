"""Every option of every config group composes and builds; bad settings fail before Spark starts, with one
line that names the key."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from medspark.backends import build as build_backend
from medspark.config import ConfigError, check, config_dir
from medspark.data.sources import DatasetError, has_test_split, list_dataset
from medspark.data.sources.class_folders import ClassFolders
from medspark.spark import master_url
from conftest import REPO, SHARED, make_cfg
from medical_files import dicom_set, nifti_set

GROUPS = {g: sorted(p.stem for p in (Path(config_dir()) / g).glob("*.yaml"))
          for g in ("dataset", "model", "backend", "cluster", "experiment")}
REAL_ROOTS = {"brain_mri": "brain-tumor-mri", "brain_mri_binary": "brain-mri-yes-no",
              "chest_xray": "chest-xray-pneumonia", "image_folder": "brain-mri-yes-no", "chest_xray14": "chest-xray14"}
SOURCE_ROOTS = {"brain_tumor_binary_merged": {"brain_tumor_mri": "brain-tumor-mri/Training",  # merged: a root each
                                              "brain_mri_yes_no": "brain-mri-yes-no"}}
SMALL = {"synthetic": ["dataset.generate.per_class=3"], "synthetic_cxr14": ["dataset.generate.patients=40"]}
WRITTEN = {"dicom": lambda root: dicom_set(root, per_class=4, size=32),  # hospital formats: a tiny set written here
           "nifti": lambda root: nifti_set(root, volumes=2, slices=2, size=32)}


def root_overrides(name: str, base: Path, real: bool) -> list[str]:
    """dataset.root (or each merged source's root) under base: the real dataset's folder, or base itself."""
    if name in SOURCE_ROOTS:
        return [f"dataset.sources.{src}.root={base / sub if real else base}" for src, sub in SOURCE_ROOTS[name].items()]
    return [f"dataset.root={base / REAL_ROOTS[name] if real else base}"]


def test_groups_hold_the_promised_options():
    assert {"synthetic", "brain_mri", "brain_mri_binary", "chest_xray", "image_folder"} <= set(GROUPS["dataset"])
    assert {"small_cnn", "resnet50", "dense"} <= set(GROUPS["model"])
    assert {"local", "standalone", "yarn", "k8s"} <= set(GROUPS["cluster"])
    assert "single" in GROUPS["backend"]


@pytest.mark.parametrize("name", GROUPS["dataset"])
def test_every_dataset_option_lists_images(tmp_path, name):
    overrides = [f"dataset={name}", *SMALL.get(name, [])]
    if name in REAL_ROOTS or name in SOURCE_ROOTS:
        for sub in SOURCE_ROOTS.get(name, {}).values() or [REAL_ROOTS[name]]:
            if not (SHARED / sub).is_dir():
                pytest.skip(f"{SHARED / sub} not present")
        overrides += root_overrides(name, SHARED, real=True)
    if name in WRITTEN:
        overrides.append(f"dataset.root={WRITTEN[name](tmp_path / name)}")
    cfg = make_cfg(tmp_path, overrides)
    check(cfg)
    listing = list_dataset(cfg.dataset)
    assert len(listing.classes) >= 2 and all(n > 0 for n in listing.counts().values())


@pytest.mark.parametrize("name", GROUPS["dataset"])
def test_every_dataset_option_names_its_source(tmp_path, name):
    cfg = make_cfg(tmp_path, [f"dataset={name}"] + ([] if name in SMALL else root_overrides(name, Path("/data"), False)))
    own_test = ("brain_mri", "chest_xray", "chest_xray14", "synthetic_cxr14")  # their own test folder or test list
    assert has_test_split(cfg.dataset) == (name in own_test)  # what check() asks the source


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
    (["split.val=0"], "split.val"),
    (["split.val=1"], "split.val"),
    (["split.val=0.6", "split.test=0.4"], "nothing to train"),
    (["train.epochs=0"], "train.epochs"),
    (["train.objective=val_loss"], "train.objective"),
    # the typed train config (config.TrainConfig): one line naming the key, before Spark or TensorFlow start
    (["train.epochs=ten"], "train.epochs='ten' must be an integer"),
    (["train.lr=fast"], "train.lr='fast' must be a number"),
    (["train.optimizer=adamm"], "train.optimizer=adamm must be one of adam, adamw, sgd, rmsprop"),
    (["train.lr_schedule=step"], "train.lr_schedule=step must be one of none, plateau, cosine"),
    (["train.class_weight=balance"], "train.class_weight=balance must be one of null, balanced"),
    (["train.early_stopping.mode=up"], "train.early_stopping.mode=up must be one of auto, min, max"),
    (["train.augment.rotation=-1"], "train.augment.rotation=-1.0 must be >= 0"),
    (["train.augment.zoom=-0.1"], "train.augment.zoom=-0.1 must be >= 0"),
    (["+train.epoch=2"], "train.epoch is not a setting of train; did you mean train.epochs?"),
    (["train.epochs=1.5"], "train.epochs=1.5 must be an integer"),
    # where data and runs go: one line now, not a Java stack trace after Spark or minutes of MLflow retries
    (["paths.data_url=s4://bucket/x"], "paths.data_url=s4://bucket/x: scheme s4:// is not supported"),
    (["paths.data_url=ftp://host/x"], "scheme ftp:// is not supported"),
    (["paths.checkpoint_url=s4://bucket/x"], "paths.checkpoint_url=s4://bucket/x: scheme s4://"),
    (["tracking.uri=/etc/passwd/mlruns"], "/etc/passwd is not a folder"),
    (["tracking.uri=sqlite:////etc/passwd/mlruns.db"], "/etc/passwd is not a folder"),
    (["serving.max_images=ten"], "serving.max_images='ten' must be a positive integer"),
    (["split.label_conflicts=merge"], "split.label_conflicts='merge' must be one of reject, keep"),
])
def test_bad_settings_fail_early_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
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


# ---------------------------------------------------------------- bad datasets and configs: one line, before Spark

def cli(module: str, *args, tmp_path, timeout=120):
    """The command as a user runs it, with a Java that does not exist: if anything started Spark, the error would
    be Spark's 'JAVA_HOME is set to an invalid directory' / 'Java gateway process exited', not ours."""
    import os

    env = dict(os.environ, JAVA_HOME=str(tmp_path / "no-java-here"), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", module, f"paths.work_dir={tmp_path}/w",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)


def the_error_line(res) -> str:
    """Exit status 2, exactly one `medspark: error:` line on stderr, no traceback, no sign of Spark or Java."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("medspark: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for sign in ("Traceback", "JAVA_HOME", "Java gateway", "py4j", "SparkContext", "log4j"):
        assert sign not in out, (sign, out[-3000:])
    return errors[0]


@pytest.mark.parametrize("module", [
    "medspark", "medspark.preprocess_only", "medspark.train"])
@pytest.mark.parametrize("args, group", [(["backend=nope"], "backend"), (["dataset=nope"], "dataset"),
                                         (["cluster=nope"], "cluster"), (["-m", "model=small_cnn,vgg99"], "model")],
                         ids=["backend", "dataset", "cluster", "model_sweep"])
def test_unknown_group_option_is_one_line_with_the_valid_ones(tmp_path, module, args, group):
    line = the_error_line(cli(module, *args, tmp_path=tmp_path, timeout=60))
    bad = args[-1].split("=")[1].split(",")[-1]
    assert line == (f"medspark: error: {group}={bad} is not an option of the {group} group; valid: "
                    f"{', '.join(GROUPS[group])}")


def test_group_override_check_leaves_valid_and_hydra_syntax_alone():
    from medspark.config import check_overrides

    for argv in (["backend=single", "model=dense"], ["-m", "model=small_cnn,dense"], ["experiment=null"],
                 ["hydra/launcher=parallel"], ["~experiment"], ["model=glob(*)"], ["+experiment=brain_mri_small_cnn"],
                 ["--cfg", "job"], ["dataset.root=/x=y"]):
        check_overrides(argv)
    with pytest.raises(ConfigError, match="experiment=nope is not an option of the experiment group; valid: "
                                          "brain_mri_res_cnn, brain_mri_small_cnn"):
        check_overrides(["+experiment=nope"])


def make_folder(root, **counts):
    from PIL import Image

    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((24, 24), 10 * i + 100 * (cls == "b"), np.uint8)).save(root / cls / f"{i}.png")
    return root


def cores_case():
    import os

    have = os.cpu_count() or 1
    return ([f"cluster.cores={have + 1}"],
            f"cluster.cores={have + 1} but this machine has {have} cores; use cluster.cores={have} or '*'")


@pytest.mark.parametrize("args, says", [
    (["split.test=0"], "split.test=0.0 must be strictly between 0 and 1 when the dataset has no test folder"),
    (["split.test=1"], "split.test=1.0 must be strictly between 0 and 1 when the dataset has no test folder"),
    (["split.val=0"], "split.val=0.0 must be strictly between 0 and 1 (a validation split drives early stopping)"),
    (["split.val=1"], "split.val=1.0 must be strictly between 0 and 1 (a validation split drives early stopping)"),
    (["preprocess.image_size=0"], "preprocess.image_size=0 must be an integer in 8..4096"),
    cores_case(),
    (["dataset=image_folder", "dataset.root=/nonexistent/scans"],
     "dataset.root=/nonexistent/scans does not exist or is not a directory; set dataset.root to the dataset folder"),
    (["dataset=image_folder", "dataset.root={tmp}/ds"], "class folder {tmp}/ds/no is empty; add images to it, or set "
                                                        "dataset.classes to the classes to use (with images: ['yes'])"),
], ids=["test_0", "test_1", "val_0", "val_1", "image_size_0", "cores", "missing_root", "empty_class"])
def test_cli_bad_setting_is_one_line_before_spark(tmp_path, args, says):
    make_folder(tmp_path / "ds", yes=3)
    (tmp_path / "ds" / "no").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = the_error_line(cli("medspark.train", *args, tmp_path=tmp_path))
    assert line == "medspark: error: " + says.replace("{tmp}", str(tmp_path))


def test_class_of_only_system_files_fails_at_listing(tmp_path):
    make_folder(tmp_path, yes=3)
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(DatasetError, match=r"class folder .*no holds no images, only 1 system file\(s\) such as "
                                           r"\.DS_Store; add images to it, or set dataset\.classes"):
        ClassFolders(str(tmp_path)).list()


@pytest.mark.parametrize("layout, counts, split, says", [
    ("class_folders", {"a": 8, "b": 2}, (0.15, 0.15),
     r"class 'b' has 2 distinct image\(s\) at most \(2 file\(s\) listed\); at least 3 are needed to stratify into "
     r"train/val/test: add images, or drop the class from dataset\.classes \(classes with enough: \['a'\]\)"),
    ("split_folders", {"a": 8, "b": 1}, (0.15, 0.15), r"class 'b' has 1 distinct image\(s\) at most .* at least 2 are "
                                                      r"needed to stratify into train/val:"),
    ("split_folders_without_test", {"a": 8, "b": 8}, (0.15, 0.0),
     r"split\.test=0\.0 must be strictly between 0 and 1 when the dataset has no test folder"),
])
def test_listing_is_checked_against_the_split_before_spark(tmp_path, layout, counts, split, says):
    from medspark.data.splits import check_listing

    ds = {"_target_": "medspark.data.sources.class_folders.ClassFolders", "classes": None, "root": str(tmp_path)}
    if layout == "class_folders":
        make_folder(tmp_path, **counts)
    else:
        make_folder(tmp_path / "train", **counts)
        if layout == "split_folders":
            make_folder(tmp_path / "test", a=2, b=2)
        ds.update(_target_="medspark.data.sources.split_folders.SplitFolders",
                  split_dirs={"train": "train", "test": "test"})
    listing = list_dataset(OmegaConf.create(ds))
    with pytest.raises(DatasetError, match=says):
        check_listing(listing, *split)


def test_class_too_small_to_stratify_fails_before_spark(tmp_path, monkeypatch):
    import medspark.spark
    from medspark.train import train

    def no_spark(*a, **kw):
        raise AssertionError("Spark was started for a dataset that the listing already shows cannot be split")

    monkeypatch.setattr(medspark.spark, "session", no_spark)
    cfg = make_cfg(tmp_path, ["dataset=image_folder", f"dataset.root={make_folder(tmp_path / 'ds', a=8, b=2)}"])
    with pytest.raises(DatasetError, match="class 'b' has 2 distinct image"):
        train(cfg)


def test_a_tracking_server_that_is_down_is_one_line_in_seconds(tmp_path):
    """MLflow alone retries a dead server for minutes (251 s measured); the check answers in about a second."""
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on (bound then closed: refused at once)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"tracking.uri=http://bob:\*\*\*@127.0.0.1:{port} does not answer"):
        check(make_cfg(tmp_path, [f"tracking.uri=http://bob:hunter2@127.0.0.1:{port}"]))
    assert time.perf_counter() - t0 < 15


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders "
                    "(CAP_DAC_OVERRIDE): the check has nothing to refuse; runs as a normal user")
def test_a_read_only_tracking_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    with pytest.raises(ConfigError, match="is not writable by this user"):
        check(make_cfg(tmp_path, [f"tracking.uri=sqlite:///{folder}/new/mlruns.db"]))
