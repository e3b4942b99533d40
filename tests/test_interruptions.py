"""Jobs killed from outside, for real: a process running the real entry point gets a real SIGKILL or SIGTERM in
the middle of its work, and the next run must neither lose nor reuse anything it should not.

- materialization (`python -m medspark.preprocess_only`): killed while the Parquet files are being written, the
  partial dataset is never reused: the next run rebuilds it, with exactly one row per image and its manifest.
  Only the public contract is used (`<data_url>/<dataset>/<fingerprint>/{train,val,test}` Parquet, the manifest
  `_MEDSPARK_DATASET.json` written last, the run's data counts), so this holds whatever materialize does inside.
- training (`python -m medspark`): killed after some epochs, the same command with `train.resume=true` continues
  from the last completed epoch in a new MLflow run linked to the killed one, which ends KILLED.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import make_cfg
from medspark.pipeline import data_lock_path

MANIFEST = "_MEDSPARK_DATASET.json"  # the public contract of materialize: written last, marks a finished dataset
TRAIN = ["dataset=synthetic", "dataset.generate.per_class=60", "dataset.generate.size=48", "preprocess.image_size=48",
         "train.epochs=5", "train.batch_size=16", "train.early_stopping.patience=0", "cluster.cores=2"]


def env() -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "MEDSPARK_PARENT_RUN_ID"}
    return keep | {"PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}


def store(tmp: Path) -> list[str]:
    return [f"paths.work_dir={tmp}/work", f"tracking.uri=sqlite:///{tmp}/mlruns.db",
            f"tracking.artifact_location={tmp}/artifacts", f"hydra.run.dir={tmp}/outputs"]


class Job:
    """One real command in its own process group (its Spark JVM and workers with it), output kept in files."""

    def __init__(self, tmp: Path, name: str, args: list[str]):
        self.out = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, *args], cwd=tmp, env=env(), stdout=open(self.out, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.out.read_text()[-n:]

    def wait_for(self, what: str, found, timeout: float = 300):
        """Poll `found()` until it returns something truthy; fail if the job ends first or time runs out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hit = found()
            if hit:
                return hit
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (rc {self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.02)
        pytest.fail(f"no {what} after {timeout} s:\n{self.tail()}")

    def stop(self, signum: int, timeout: float = 90) -> int:
        """Send `signum` to the Python process only (as `kill <pid>` does), wait for it, then for its orphaned
        children (the Spark JVM exits when its driver's pipe closes)."""
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"still running {timeout} s after signal {signum}:\n{self.tail()}")
        end = time.monotonic() + 60
        while time.monotonic() < end and self.group_alive():
            time.sleep(0.1)
        assert not self.group_alive(), "the killed job's Spark JVM or workers outlived it by a minute"
        return rc

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def kill_all(self) -> None:
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 600) -> None:
        try:
            self.proc.wait(timeout)
        finally:
            self.kill_all()
        assert self.proc.returncode == 0, self.tail()


def lock_is_free(path: Path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def runs(uri: str, experiment: str) -> list:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"],
                              output_format="list")


# ---------------------------------------------------------------- materialization


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """1,200 phantoms in class folders (generated once): enough that writing them takes a few seconds."""
    from medspark.data import synthetic

    root = tmp_path_factory.mktemp("images") / "phantoms"
    synthetic.generate(str(root), per_class=300, size=128, seed=5)
    files = sorted(str(p) for p in root.rglob("*.png"))
    assert len(files) == 1200
    return root, files


def parquet_rows(split_dir: Path) -> list[str]:
    """The `path` column of every row of a Petastorm split, read with pyarrow (hidden/temporary files skipped,
    as every Parquet reader does)."""
    import pyarrow.parquet as pq

    parts = sorted(p for p in split_dir.rglob("*.parquet") if not any(s.startswith((".", "_")) for s in
                                                                       p.relative_to(split_dir).parts))
    return [path for p in parts for path in pq.read_table(p, columns=["path"]).column("path").to_pylist()]


def test_materialization_killed_mid_write_is_rebuilt_never_reused(images, tmp_path):
    """SIGKILL mid-write, then SIGTERM mid-write of the next attempt, then a run that completes: the partial
    folders are never read, the lock never outlives its holder, the final dataset has each image exactly once."""
    root, files = images
    args = ["-m", "medspark.preprocess_only", "dataset=image_folder", f"dataset.root={root}",
            "preprocess.image_size=128", "cluster.cores=2", *store(tmp_path)]
    datasets = tmp_path / "work" / "petastorm" / "image_folder"  # <data_url>/<dataset>/<fingerprint>/
    lock = data_lock_path(make_cfg(tmp_path, ["dataset=image_folder", f"dataset.root={root}"]))
    uri = f"sqlite:///{tmp_path}/mlruns.db"

    def part_files() -> set:  # part files, temporary or final, under a fingerprint folder, by name and inode
        found = set()
        for p in (datasets.rglob("*") if datasets.is_dir() else ()):
            try:
                found |= {(p, p.stat().st_ino)} if "part-" in p.name else set()
            except FileNotFoundError:  # renamed or deleted while we looked
                pass
        return found

    for attempt, signum in enumerate((signal.SIGKILL, signal.SIGTERM)):
        left = part_files()  # the previous attempt's: not a sign that this one writes
        job = Job(tmp_path, f"attempt{attempt}", args)
        try:
            job.wait_for("new Parquet part files", lambda: part_files() - left)
            assert not lock_is_free(lock), "the dataset lock must be held while the dataset is written"
            assert not list(datasets.glob(f"*/{MANIFEST}")), "killed too late: the write had already finished"
            rc = job.stop(signum)
        finally:
            job.kill_all()
        assert rc == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signal.SIGTERM), job.tail()
        assert lock_is_free(lock), "the lock must die with its holder"
        assert list(datasets.iterdir()) and not list(datasets.glob(f"*/{MANIFEST}")), "a partial dataset is left"
        if signum == signal.SIGTERM:
            assert "medspark: stopped: received SIGTERM" in job.tail()
            assert runs(uri, "medspark-image_folder")[-1].info.status == "KILLED"

    job = Job(tmp_path, "complete", args)
    job.finish()
    (folder,) = [m.parent for m in datasets.glob(f"*/{MANIFEST}")]
    assert json.loads((folder / MANIFEST).read_text()), "the rebuilt manifest is there and readable"
    rows = {split: parquet_rows(folder / split) for split in ("train", "val", "test")}
    everything = [p for split_rows in rows.values() for p in split_rows]
    assert sorted(everything) == files, "every image exactly once over train/val/test: nothing lost, none twice"

    killed, stopped, done = runs(uri, "medspark-image_folder")
    m = done.data.metrics
    assert done.info.status == "FINISHED" and m["data_reused"] == 0, "the partial dataset must not be reused"
    assert {s: int(m[f"data_n_{s}"]) for s in rows} == {s: len(r) for s, r in rows.items()}
    assert stopped.info.status == "KILLED" and "SIGTERM" in stopped.data.tags["error"]
    assert killed.info.status == "KILLED", "the SIGKILLed run must not stay RUNNING once a later run has started"
    assert "is gone" in killed.data.tags["medspark.ended_by"]

    from medspark.data.loader import read_arrays  # the project's own Petastorm reader agrees

    assert len(read_arrays(f"file://{folder}/val")[1]) == len(rows["val"])


# ---------------------------------------------------------------- training


def checkpoint_epochs(checkpoints: Path) -> int:
    """Epochs completed in the (only) checkpoint under <data_url>/_checkpoints, 0 when there is none yet."""
    states = list(checkpoints.glob("*/medspark.json"))
    return max((json.loads(s.read_text()).get("epochs_completed", 0) for s in states), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend, signum", [("single", signal.SIGKILL), ("mirrored", signal.SIGTERM)])
def test_killed_training_resumes_from_the_last_completed_epoch(tmp_path, backend, signum):
    args = ["-m", "medspark", *TRAIN, f"backend={backend}", *store(tmp_path)]
    checkpoints = tmp_path / "work" / "petastorm" / "_checkpoints"
    uri, epochs = f"sqlite:///{tmp_path}/mlruns.db", 5

    job = Job(tmp_path, "first", args)
    try:
        job.wait_for("a checkpoint of 2 epochs", lambda: checkpoint_epochs(checkpoints) >= 2)
        rc = job.stop(signum)
    finally:
        job.kill_all()
    done = checkpoint_epochs(checkpoints)
    assert 2 <= done < epochs, f"killed after {done} epochs (rc {rc}): too late to test a resume:\n{job.tail()}"
    (first,) = runs(uri, "medspark-synthetic")
    assert first.data.tags["medspark.last_completed_epoch"] == str(done), "progress is on the run as it trains"
    if signum == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM and "train.resume=true" in job.tail(), f"rc {rc}:\n{job.tail()}"
        assert first.info.status == "KILLED" and "SIGTERM" in first.data.tags["error"]
    else:
        assert rc == -signal.SIGKILL and first.info.status == "RUNNING", "nothing runs on SIGKILL"

    Job(tmp_path, "resumed", [*args, "train.resume=true"]).finish()

    first, resumed = runs(uri, "medspark-synthetic")
    client = mlflow.MlflowClient()
    tags, m = resumed.data.tags, resumed.data.metrics
    assert resumed.info.status == "FINISHED"
    assert tags["medspark.resumed_from"] == first.info.run_id and tags["medspark.resumed_at_epoch"] == str(done)
    assert tags["medspark.last_completed_epoch"] == str(epochs)
    assert first.info.status == "KILLED" and first.data.tags["medspark.resumed_by"] == resumed.info.run_id
    if signum == signal.SIGKILL:
        assert resumed.info.run_id in first.data.tags["medspark.ended_by"]
    # trained epochs done+1..epochs only: nothing repeated from scratch, and together exactly the configured epochs
    trained = [e.step for e in client.get_metric_history(resumed.info.run_id, "epoch_seconds")]
    assert trained == list(range(done, epochs)) and m["epochs_run"] == epochs - done
    assert [e.step for e in client.get_metric_history(resumed.info.run_id, "loss")] == list(range(epochs)), \
        "the curves cover the whole training (the first epochs from the checkpoint)"
    assert not any(checkpoints.iterdir()), "a finished training removes its checkpoint"

    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{resumed.info.run_id}/summary.json"))
    import numpy as np

    model = mlflow.pyfunc.load_model(summary["model_uri"])
    probs = np.asarray(model.predict(np.zeros((2, 48, 48, 1), np.float32)))
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-4)


# ---------------------------------------------------------------- the pieces, fast


def test_resume_is_refused_in_one_line_where_a_backend_keeps_no_checkpoints(tmp_path):
    from medspark import resume
    from medspark.config import ConfigError

    for name in ("single", "mirrored", "spark_barrier"):
        resume.check(make_cfg(tmp_path, [f"backend={name}", "train.resume=true"]))
    for name in ("elephas_sync", "elephas_async", "elephas_hogwild", "ensemble"):
        assert not resume.supports(make_cfg(tmp_path, [f"backend={name}"]).backend)
        with pytest.raises(ConfigError, match=rf"^train\.resume=true but backend={name} trains on Spark executors "
                                              r"and keeps no checkpoints .* drop train\.resume or use one of those$"):
            resume.check(make_cfg(tmp_path, [f"backend={name}", "train.resume=true"]))
        resume.check(make_cfg(tmp_path, [f"backend={name}"]))  # resume off: nothing to refuse


def test_checkpoint_key_follows_the_training_not_the_bookkeeping(tmp_path):
    from medspark.resume import checkpoint_key, checkpoint_root

    key = checkpoint_key(make_cfg(tmp_path), "fp1")
    assert key.startswith("synthetic-single-")
    for same in (["train.resume=true"], ["train.verbose=1"], ["tracking.experiment=other"], ["train.objective=test_macro_f1"]):
        assert checkpoint_key(make_cfg(tmp_path, same), "fp1") == key, same
    for other in (["train.lr=0.01"], ["train.epochs=3"], ["model=dense"], ["seed=1"], ["backend=mirrored"]):
        assert checkpoint_key(make_cfg(tmp_path, other), "fp1") != key, other
    assert checkpoint_key(make_cfg(tmp_path), "fp2") != key, "other data, other checkpoint"
    assert checkpoint_root(make_cfg(tmp_path)) == f"{tmp_path}/work/petastorm/_checkpoints"
    assert checkpoint_root(make_cfg(tmp_path, ["paths.checkpoint_url=null"])) is None


def test_a_dead_process_is_told_from_a_live_one():
    from medspark.resume import process_alive, process_id

    me = process_id()
    assert process_alive(me) is True
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"])
    child.wait()
    host, _, _ = me.rsplit(":", 2)
    assert process_alive(f"{host}:{child.pid}:") is False, "an exited (and reaped) process"
    assert process_alive(me.rsplit(":", 1)[0] + ":1") is False, "same pid, other start time: a reused pid"
    assert process_alive(f"elsewhere:{os.getpid()}:1") is None, "another host: unknown, never ended"


def test_sigterm_raises_after_a_deferred_block_and_a_second_one_kills():
    code = """
import os, signal, sys, time
from medspark.interrupts import Terminated, deferred, terminate_raises
with terminate_raises():
    try:
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("block finished", flush=True)
        print("not reached", flush=True)
    except Terminated as e:
        print("raised:", e, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # the second one: the default action, at once
        time.sleep(5)
        print("not reached either", flush=True)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env())
    assert res.stdout.splitlines() == ["block finished", "raised: received SIGTERM: the job was asked to stop"]
    assert res.returncode == -signal.SIGTERM
