"""What the `medspark` command shows and records besides the model: its --help, `--cfg job`, a misspelled key,
run names and descriptions, the splits as MLflow dataset inputs, the run's log file, the end-of-run summary,
quiet native start-up logs and Spark progress bars only on a terminal. Fast: no training (the output of a real
run is checked by tests/test_train.py)."""
import json
import logging
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from medspark import cli, tracking
from medspark.config import ConfigError, check_keys, config_dir, group_options, option_groups
from medspark.data.materialize import Materialized
from conftest import REPO


def medspark(*args, tmp_path, timeout=120):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", JAVA_HOME=str(tmp_path / "no-java-here"))
    return subprocess.run([sys.executable, "-m", "medspark", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---------------------------------------------------------------- --help, --cfg job, misspelled keys

def test_help_names_subcommands_groups_options_and_docs(tmp_path):
    res = medspark("--help", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "compare" in out and "medspark compare --help" in out and "predict" in out
    assert "docs: README.md" in out and str(REPO) in out
    lines = out.splitlines()
    for group in option_groups():
        assert f"  {group}" in lines, group
        for option in group_options(group):
            line = next(line for line in lines if line.strip().lstrip("*").split(" ")[0] == option)
            description = cli.option_description(REPO / "conf" / group / f"{option}.yaml")
            assert description and description[:40] in line, (group, option, line)
    assert any(line.strip().startswith("*small_cnn") for line in lines)  # the default is marked
    assert "Hydra" not in lines[0] and "== Config ==" not in out  # not Hydra's stock template


def test_every_option_has_a_one_line_description():
    missing = [f"{g}/{o}" for g in option_groups() for o in group_options(g)
               if not cli.option_description(REPO / "conf" / g / f"{o}.yaml")]
    assert not missing, f"add a first comment line to conf/<group>/<option>.yaml: {missing}"


def test_cfg_job_is_resolved_unless_asked_otherwise(tmp_path):
    res = medspark("--cfg", "job", f"paths.work_dir={tmp_path}/w", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.create(res.stdout)
    assert "${" not in res.stdout and cfg.paths.data_url == f"file://{tmp_path}/w/petastorm"
    assert cfg.tracking.experiment == "medspark-synthetic"
    raw = medspark("--cfg", "job", "--unresolved", tmp_path=tmp_path)
    assert raw.returncode == 0 and "${paths.work_dir}" in raw.stdout


def test_only_the_job_config_is_resolved_by_default():
    assert cli.resolve_cfg_by_default(["--cfg", "job", "x=1"]) == ["--cfg", "job", "x=1", "--resolve"]
    assert cli.resolve_cfg_by_default(["-c", "all"]) == ["-c", "all", "--resolve"]
    assert cli.resolve_cfg_by_default(["--cfg", "hydra"]) == ["--cfg", "hydra"]  # cannot resolve outside a job
    assert cli.resolve_cfg_by_default(["--cfg", "job", "--unresolved"]) == ["--cfg", "job"]
    assert cli.resolve_cfg_by_default(["--cfg", "job", "--resolve"]) == ["--cfg", "job", "--resolve"]
    assert cli.resolve_cfg_by_default(["train.epochs=2"]) == ["train.epochs=2"]


@pytest.mark.parametrize("args, says", [
    (["train.epoch=2"], "train.epoch is not a setting; did you mean train.epochs?"),
    (["preprocess.imagesize=64"], "preprocess.imagesize is not a setting; did you mean preprocess.image_size?"),
    (["model=dense", "model.dropuot=0.2"], "model.dropuot is not a setting; did you mean model.dropout?"),
    (["backend=elephas_sync", "backend.worker=2"], "backend.worker is not a setting; did you mean backend.workers?"),
])
def test_a_misspelled_key_is_one_line_with_a_suggestion(tmp_path, args, says):
    with pytest.raises(ConfigError, match="^" + says.replace(".", r"\.").replace("?", r"\?")):
        check_keys(args)


def test_the_key_check_leaves_valid_new_and_swept_keys_alone():
    for argv in (["train.epochs=2", "model.dropout=0.1"], ["+train.new_key=1"], ["++seed=3"], ["~experiment"],
                 ["-m", "train.lr=1e-3,3e-4"], ["-m", "model=small_cnn,dense", "model.dropout=0.2"],
                 ["hydra.job.chdir=true"], ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"],
                 ["experiment=cxr14_small_cnn", "dataset.generate.patients=10"], ["--cfg", "job"],
                 ["dataset=image_folder", "dataset.root=/scans"]):
        check_keys(argv)


def test_cli_misspelled_key_exits_2_before_anything_starts(tmp_path):
    res = medspark("train.epoch=2", tmp_path=tmp_path, timeout=60)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("medspark: error:")]
    assert errors == ["medspark: error: train.epoch is not a setting; did you mean train.epochs? (to add a new key: "
                      "+train.epoch=...)"], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "not in struct" not in res.stderr


# ---------------------------------------------------------------- run names and descriptions

@pytest.fixture
def cfg():
    return OmegaConf.create({"model": {"name": "small_cnn"}, "backend": {"name": "single"},
                             "dataset": {"name": "synthetic"}, "tracking": {"run_name": None}})


@pytest.fixture
def store(tmp_path, monkeypatch):
    for k in ("MLFLOW_RUN_ID", tracking.PARENT_RUN_ENV, tracking.SWEEP_PARAMS_ENV):
        monkeypatch.delenv(k, raising=False)
    tracking.configure(OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlruns.db", "experiment": "medspark-synthetic",
                                         "artifact_location": str(tmp_path / "artifacts")}))
    return monkeypatch


def test_run_name_is_model_backend_and_what_differs(cfg, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.setenv(tracking.SWEEP_PARAMS_ENV, "train.lr=1e-3,3e-4")  # not in a sweep: ignored
    assert tracking.run_name(cfg) == "small_cnn-single"
    assert tracking.run_name(cfg, ["train.lr=3e-3"]) == "small_cnn-single-lr3e-3"
    name = tracking.run_name(cfg, ["model=small_cnn", "dataset=brain_mri", "dataset.root=/data/scans/brain-mri/",
                                   "train.lr=0.0003162277660168379", "paths.work_dir=/tmp/w", "tracking.uri=x",
                                   "+train.epochs=5", "~experiment", "hydra.job.chdir=true", "db.password=hunter2"])
    assert name == "small_cnn-single-rootbrain-mri-lr0.000316-epochs5"  # groups, paths, tracking, secrets left out
    assert len(tracking.run_name(cfg, [f"train.k{i}={'x' * 30}" for i in range(20)])) <= tracking.NAME_MAX
    cfg.tracking.run_name = "mine"
    assert tracking.run_name(cfg, ["train.lr=3e-3"]) == "mine"


def test_a_sweep_job_is_named_by_what_its_sweep_varies(cfg, store):
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("medspark-synthetic").experiment_id
    parent = client.create_run(exp, tags={"medspark.sweep": "parent"})
    client.log_param(parent.info.run_id, "sweep_params",
                     "train.lr=tag(log, interval(1e-4, 3e-3)) model=small_cnn,dense")
    store.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
    job = ["dataset.generate.per_class=40", "train.epochs=2", "train.lr=0.00123456", "model=dense"]
    assert tracking.run_name(cfg, job) == "small_cnn-single-lr0.00123"  # (cfg.model.name is the job's model)
    store.setenv(tracking.SWEEP_PARAMS_ENV, "train.epochs=2,4")  # what medspark.sweep exports: read first
    assert tracking.run_name(cfg, job) == "small_cnn-single-epochs2"


def materialized(url="file:///tmp/x/petastorm/synthetic/0123456789abcdef",
                 classes=("glioma", "meningioma", "notumor", "pituitary"), **kw):
    return Materialized(url=url, fingerprint="0123456789abcdef", classes=list(classes), shape=(32, 32, 1),
                        sizes={"train": 56, "val": 12, "test": 12}, per_class={}, listed=81,
                        accepted=80, rejected=[("x.png", "unreadable")], duplicate_groups=0, duplicate_files=0,
                        label_conflicts=0, moved_to_test=0, seconds={}, **kw)


def test_the_description_says_dataset_task_objective_and_data_size(cfg):
    text = tracking.describe_run(cfg, materialized(), "test_accuracy", ["train.lr=3e-3", "db.password=hunter2"])
    assert "dataset `synthetic`: multiclass, 4 classes (glioma, meningioma, notumor, pituitary)" in text
    assert "Objective: test_accuracy" in text
    assert "56 train / 12 val / 12 test images (80 of 81 listed accepted)" in text
    assert "fingerprint 0123456789abcdef" in text and "train.lr=3e-3" in text and "hunter2" not in text
    many = materialized(classes=[f"finding{i}" for i in range(14)], task="multilabel")
    assert "multilabel, 14 findings (finding0," in tracking.describe_run(cfg, many, "test_mean_auc") and \
        "(6 more)" in tracking.describe_run(cfg, many, "test_mean_auc")


def test_the_splits_are_the_runs_dataset_inputs(store, tmp_path):
    data = materialized(url=(tmp_path / "petastorm" / "synthetic" / "0123456789abcdef").as_uri())
    with tracking.run("inputs", {}) as run:
        tracking.log_inputs(data)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}, json.loads(i.dataset.source))
           for i in inputs}
    assert set(got) == {"synthetic-train", "synthetic-val", "synthetic-test"}
    digest, tags, source = got["synthetic-val"]
    assert digest == "0123456789abcdef" and tags["mlflow.data.context"] == "val"
    assert source["uri"] == data.split_url("val")


# ---------------------------------------------------------------- the run's log, the summary

def test_the_runs_own_log_file_is_saved_on_the_run_with_secrets_masked(store, tmp_path):
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with tracking.run("logged", {}) as run:
            logging.getLogger("medspark").warning("listed 80 files; tracking.uri=https://bob:hunter2@host/")
        with pytest.raises(RuntimeError):
            with tracking.run("failed", {}) as failed:
                logging.getLogger("medspark").warning("about to fail")
                raise RuntimeError("boom")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/logs/train.log")
    assert "listed 80 files" in text and "hunter2" not in text
    assert "about to fail" in mlflow.artifacts.load_text(f"runs:/{failed.info.run_id}/logs/train.log")


SUMMARY = {"run_id": "a" * 32, "run_name": "small_cnn-single-lr3e-3", "experiment_id": "1",
           "model_uri": "models:/medspark-synthetic/3", "classifier_uri": "models:/medspark-synthetic-classifier/3",
           "objective": {"test_accuracy": 0.975}, "test": {"test_accuracy": 0.975, "test_macro_f1": 0.9741,
                                                           "test_n": 180.0},
           "training": {"backend": "single", "workers": 1, "images_per_second": 51.2, "speedup_vs_single": 1.0},
           "seconds": {"preprocess_seconds": 12.3, "train_seconds": 98.7, "evaluate_seconds": 3.1},
           "champion": {"decision": "promoted", "reason": "no champion yet", "champion_uri":
                        "models:/medspark-synthetic@champion", "champion_version": "3"}}


def test_the_summary_is_one_short_block_and_the_json_only_when_asked(capsys, tmp_path):
    tracking.print_summary(SUMMARY, "sqlite:///x/mlruns.db", json_path=tmp_path / "summary.json")
    out = capsys.readouterr().out
    assert "{" not in out and len(out.strip().splitlines()) <= 9
    assert "=== medspark run finished: small_cnn-single-lr3e-3 ===" in out
    assert "test_accuracy = 0.9750" in out and "macro_f1=0.9741" in out and "n=180" in out
    assert "models:/medspark-synthetic/3" in out and "models:/medspark-synthetic@champion is version 3" in out
    assert f"summary: {tmp_path / 'summary.json'}" in out and "mlflow ui --backend-store-uri sqlite:///x" in out
    tracking.print_summary(SUMMARY, "sqlite:///x/mlruns.db", print_json=True)
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):]) == SUMMARY


def test_the_summary_file_is_written_only_in_a_hydra_job():
    assert tracking.write_summary(SUMMARY) is None  # train() called from Python: the run has summary.json


# ---------------------------------------------------------------- quiet native logs, progress bars

# lines a TensorFlow 2.19 pip wheel prints on a CPU-only machine (captured here)
STARTUP = """\
2026-12-01 15:29:55.908247: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
2026-12-01 15:29:55.908759: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda drivers on your machine, GPU will not be used.
2026-12-01 15:29:55.918383: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:467] Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
E0000 00:00:1796138995.934130   24985 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one has already been registered
E0000 00:00:1796138995.937665   24985 cuda_blas.cc:1407] Unable to register cuBLAS factory: Attempting to register factory for plugin cuBLAS when one has already been registered
W0000 00:00:1796138995.947900   24985 computation_placer.cc:177] computation placer already registered. Please check linkage and avoid linking the same target more than once.
2026-12-01 15:29:55.951277: I tensorflow/core/platform/cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
2026-12-01 15:29:58.883685: E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""
REAL = "2026-12-01 15:30:00.000000: E tensorflow/core/framework/op_kernel.cc:1000] OOM when allocating tensor"


def test_native_startup_noise_is_dropped_and_real_errors_kept():
    assert cli.native_lines_worth_showing(STARTUP + REAL, gpu=False) == [REAL]
    kept = cli.native_lines_worth_showing(STARTUP + REAL, gpu=True)  # a GPU machine: a missing driver is news
    assert REAL in kept and any("cuInit" in line for line in kept) and any("cuda drivers" in line for line in kept)
    assert not any("register" in line or "oneDNN" in line for line in kept)


@pytest.mark.skipif(cli.has_gpu(), reason="checks the CPU-only start-up")
def test_importing_tensorflow_through_medspark_is_quiet_on_a_cpu_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("from medspark.cli import import_tensorflow; import_tensorflow(); import os, sys, tensorflow as tf; "
            "tf.constant(1.0) + 1; print(os.environ['TF_CPP_MIN_LOG_LEVEL']); print('still here', file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "2" and res.stderr.strip() == "still here", res.stderr[-3000:]


def test_spark_progress_bars_only_on_a_terminal(monkeypatch):
    from medspark.spark import quiet_conf

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    conf = quiet_conf()  # pytest captures stderr: not a terminal
    assert conf["spark.ui.showConsoleProgress"] == "false" and conf["spark.executorEnv.TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert quiet_conf()["spark.ui.showConsoleProgress"] == "true"
    for name in group_options("cluster"):  # no cluster option forces the bar into log files
        conf = OmegaConf.load(f"{config_dir()}/cluster/{name}.yaml").get("conf") or {}
        assert conf.get("spark.ui.showConsoleProgress") is None, name


NOISE = ("Unable to register cu", "computation placer already registered", "failed call to cuInit",
         "All log messages before absl::InitializeLog", "oneDNN custom operations")
EXECUTOR_TASK = """
import os, sys
from omegaconf import OmegaConf
from medspark.spark import session

def task(_):
    import keras  # TensorFlow starts in the executor's Python worker
    import tensorflow as tf
    os.write(2, b"E0000 a real error an executor writes\\n")
    return [float(tf.constant(1.0) + 1)]

s = session(OmegaConf.create({"name": "local", "cores": 2, "log_level": "ERROR",
                              "conf": {"spark.driver.host": "127.0.0.1", "spark.ui.enabled": "false"}}))
print("result", s.sparkContext.parallelize([1, 2], 2).mapPartitions(task).collect(), flush=True)
s.stop()
"""


@pytest.mark.slow
@pytest.mark.skipif(cli.has_gpu(), reason="checks the CPU-only start-up")
def test_executors_import_tensorflow_quietly_and_still_show_real_errors(tmp_path):
    """Spark's Python workers import TensorFlow through the driver's filter (medspark.quiet_daemon): without it this
    run prints 15 lines of cuFFT/cuDNN/cuBLAS/cuInit noise (two workers), with it none; what a task really writes to
    stderr still shows."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    res = subprocess.run([sys.executable, "-c", EXECUTOR_TASK], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0 and "result [2.0, 2.0]" in res.stdout, res.stderr[-3000:]
    assert res.stderr.count("E0000 a real error an executor writes") == 2, res.stderr[-3000:]
    shown = [line for line in res.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not shown, shown


def test_only_mlflows_cloudpickle_warning_is_dropped(tmp_path, capfd):
    """Logging the packaged classifier does not print MLflow's CloudPickle warning; other MLflow warnings print."""
    import keras

    from medspark.data.preprocess import PreprocessConfig

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    mlflow.set_experiment("cloudpickle")
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    pre = PreprocessConfig.from_mapping({"image_size": 8, "channels": 1})
    with mlflow.start_run():
        info = tracking.log_classifier(model, pre, ["a", "b"], np.zeros((1, 8, 8, 1), np.uint8), None)
        logging.getLogger("mlflow.pyfunc").warning("another MLflow warning")
    out = capfd.readouterr()
    assert info.model_uri and "CloudPickle" not in out.out + out.err
    assert "another MLflow warning" in out.err
