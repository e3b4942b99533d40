"""Executor loss on a REAL Spark standalone cluster (a master and two 1-core workers on 127.0.0.1, its own
cluster: these tests kill workers): a machine is lost while the job runs, and the run still ends right.

A lost machine is modelled by SIGKILL to a worker's whole process group: the worker JVM, the executor JVM it
launched and that executor's Python workers die at once, with no chance to say goodbye (killing the worker
alone would leave its executor running until the executor notices; killing the executor alone would let the
worker start a new one). The moment is chosen from what the driver itself reports (its REST API at the UI
port): a job whose description names the stage is running and an executor has a task of it. Both workers are
then frozen (SIGSTOP, so no task can finish in between), the driver is asked again which executor still runs
a task, that machine is killed and the other one thawed. Spark's event log must then show the lost task(s)
and a later successful attempt of each. The driver is a subprocess (`python -m medspark...`) with a timeout,
so a hang fails the test. Spark's defaults do the rest: a task lost with a lost worker does not even count
towards spark.task.maxFailures, cached partitions and shuffle outputs of the dead executor are recomputed.

What executor loss does to each backend (tested: data, elephas_sync, elephas_async, spark_barrier, ensemble; the
rest from Spark's rules):
- preprocess/materialize: the lost tasks run again elsewhere; every file is in the Petastorm data exactly once.
- single, mirrored: train in the driver; executors only build the data (above). Not affected afterwards.
- elephas_sync: the epoch's lost task trains again from the same broadcast weights; each partition's update is
  averaged once, as without the loss. The run finishes, that epoch is slower.
- elephas_async/hogwild: the lost task runs again from the server's current weights; updates the lost attempt
  had pushed stay applied (that partition counts more than once) and `ps_updates` counts successful attempts only.
- spark_barrier: a barrier stage is all or nothing, and Spark aborts a failed barrier result stage instead of
  retrying it; the backend runs it again itself (backend.executor_loss_retries) once backend.workers slots are
  free, and every worker resumes from the chief's checkpoint of the last completed epoch. With fewer slots than
  workers for backend.slots_timeout_s, the run fails in one line; train.resume=true continues it later.
- ensemble: the lost member's task trains that member again, on the same seeded bootstrap sample.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from standalone import StandaloneCluster, _free_port

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 240  # a run that has not finished by then hangs: the test fails, it never waits forever
# 4 classes x 150 phantoms (600 files), 128 px read, 64 px written; 1 MB row groups: several per split
DATA = ["dataset.generate.per_class=150", "dataset.generate.size=128", "preprocess.image_size=64",
        "materialize.row_group_size_mb=1"]


def cluster_conf(ui_port: int, events: Path) -> str:
    """The driver's Spark settings: its UI (and REST API) on a known loopback port, an event log to check what
    Spark did afterwards, and Spark's defaults for retries (spark.task.maxFailures=4; a task lost with its
    executor for a reason not caused by the task, such as a lost worker, does not even count towards them)."""
    return ("++cluster.conf={spark.executor.cores:1,spark.executor.memory:1g,spark.driver.host:127.0.0.1,"
            f"spark.driver.bindAddress:127.0.0.1,spark.ui.enabled:true,spark.ui.port:{ui_port},"
            f"spark.eventLog.enabled:true,spark.eventLog.dir:'file://{events}',"
            "spark.ui.showConsoleProgress:false,spark.task.maxFailures:4}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with StandaloneCluster(tmp_path_factory.mktemp("executor-loss"), workers=2, cores=1, memory="2g") as c:
        yield c


@pytest.fixture(scope="module")
def train_work(tmp_path_factory):
    """One work dir for the training tests: the second reuses the first one's Petastorm data (same fingerprint)."""
    return tmp_path_factory.mktemp("train-work")


@pytest.fixture
def two_workers(cluster):
    cluster.ensure_workers(2)  # replaces the machine the previous test killed
    return cluster


class Driver:
    """One medspark command against the cluster, as a subprocess, with its Spark application's REST API. Drivers
    in one tmp_path share its MLflow store; `name` keeps their outputs apart."""

    def __init__(self, tmp_path: Path, module: str, *overrides: str, master: str, work: Path | None = None,
                 name: str = ""):
        self.ui, self.tmp, self.name = _free_port(), tmp_path, name
        self.out, self.err = open(tmp_path / f"stdout{name}.txt", "w+"), open(tmp_path / f"stderr{name}.txt", "w+")
        self.uri, self.events = f"sqlite:///{tmp_path}/mlruns.db", tmp_path / f"events{name}"
        self.events.mkdir()
        env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1")  # the driver's UI binds loopback too
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *DATA, *overrides, "cluster=standalone", f"cluster.master={master}",
             cluster_conf(self.ui, self.events), f"paths.work_dir={work or tmp_path / 'work'}",
             f"tracking.uri={self.uri}",
             f"tracking.artifact_location={tmp_path}/artifacts"],
            cwd=tmp_path, stdout=self.out, stderr=self.err, env=env)
        self.app_id: str | None = None

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/api/v1/{path}", timeout=2) as r:
            return json.loads(r.read())

    def api(self, path: str):
        """The application's REST resource, or None while the driver's UI is not up."""
        try:
            if self.app_id is None:
                self.app_id = self._get("applications")[0]["id"]
            return self._get(f"applications/{self.app_id}/{path}")
        except (OSError, ValueError, IndexError, KeyError):
            return None

    def running_job(self, words: tuple[str, ...]) -> dict | None:
        for job in self.api("jobs?status=running") or []:
            text = f"{job.get('description') or ''} {job.get('name') or ''}"
            if any(w in text for w in words):
                return job
        return None

    def busy_executors(self) -> set[str]:
        return {e["id"] for e in self.api("executors") or [] if e["id"] != "driver" and e.get("activeTasks")}

    def wait(self) -> str:
        try:
            self.proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the run did not finish within {RUN_TIMEOUT_S} s after the machine was lost (a hang):\n"
                        f"{self.tail()}")
        return self.tail()

    def output(self) -> str:
        self.out.flush()
        self.err.flush()
        return (self.tmp / f"stdout{self.name}.txt").read_text(errors="replace") + \
            (self.tmp / f"stderr{self.name}.txt").read_text(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        self.err.flush()
        return (self.tmp / f"stderr{self.name}.txt").read_text(errors="replace")[-chars:]

    def event_log(self) -> list[dict]:
        [log] = glob.glob(f"{self.events}/*")
        return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]

    def jobs(self) -> list[dict]:
        """From Spark's event log, in order: every job ({id, desc: its description and stage names, ok})."""
        jobs = {}
        for e in self.event_log():
            if e["Event"] == "SparkListenerJobStart":
                desc = (e.get("Properties") or {}).get("spark.job.description") or ""
                names = " ".join(st.get("Stage Name", "") for st in e.get("Stage Infos", []))
                jobs[e["Job ID"]] = {"id": e["Job ID"], "desc": f"{e['Job ID']}: {desc} [{names}]",
                                     "stages": e["Stage IDs"], "ok": None}
            elif e["Event"] == "SparkListenerJobEnd":
                jobs[e["Job ID"]]["ok"] = e["Job Result"]["Result"] == "JobSucceeded"
        return list(jobs.values())

    def lost_tasks(self, executor: str) -> list[dict]:
        """From Spark's event log: the tasks lost with `executor` ({job, stage, index}), each with whether an
        attempt of the same (stage, partition) succeeded afterwards."""
        job_of = {s: j["desc"] for j in self.jobs() for s in j["stages"]}
        lost, done = [], set()
        for e in self.event_log():
            if e["Event"] != "SparkListenerTaskEnd":
                continue
            info = e["Task Info"]
            key = (e["Stage ID"], info.get("Partition ID", info["Index"]))
            reason = e["Task End Reason"]
            if reason["Reason"] == "ExecutorLostFailure" and reason.get("Executor ID") == executor:
                lost.append({"job": job_of.get(e["Stage ID"]), "stage": key[0], "index": key[1]})
            elif reason["Reason"] == "Success":
                done.add(key)
        return [t | {"rerun_ok": (t["stage"], t["index"]) in done} for t in lost]

    def rerun_tasks(self, executor: str) -> list[dict]:
        """The tasks lost with `executor`, after checking that every job succeeded (Spark retried the tasks)."""
        jobs_ok = [j["ok"] for j in self.jobs()]
        assert jobs_ok and all(jobs_ok), f"a Spark job failed: {jobs_ok}"
        return self.lost_tasks(executor)

    def run(self):
        """This driver's MLflow run (the one its process started: tag medspark.process = host:pid:start)."""
        mlflow.set_tracking_uri(self.uri)
        [run] = [r for r in mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")
                 if r.data.tags.get("medspark.process", "").split(":")[1:2] == [str(self.proc.pid)]]
        return run


def lose_a_machine_during(cluster: StandaloneCluster, driver: Driver, words: tuple[str, ...],
                          after_jobs: int = 0, ready=lambda: True, timeout: float = 150) -> dict:
    """Kill the machine (worker + executor + Python workers) of an executor that runs a task of the first
    running job whose description or name contains one of `words` (the `after_jobs`+1-th such job), once
    `ready()` holds too."""
    deadline, seen, last = time.monotonic() + timeout, set(), None
    while time.monotonic() < deadline:
        if driver.proc.poll() is not None:
            pytest.fail(f"the run ended (exit {driver.proc.returncode}) before a job matching {words} had a "
                        f"running task; jobs seen: {sorted(seen)}\n{driver.tail()}")
        jobs = driver.api("jobs") or []
        seen |= {f"{j['jobId']}: {j.get('description') or j.get('name')}" for j in jobs}
        job = driver.running_job(words)
        done = sum(1 for j in jobs if j.get("status") == "SUCCEEDED" and any(
            w in f"{j.get('description') or ''} {j.get('name') or ''}" for w in words))
        if job and done >= after_jobs and driver.busy_executors() & set(cluster.executors(driver.app_id)) \
                and ready():
            machines = list(cluster.workers())
            cluster.freeze(*machines)  # from here on no task can finish: what the driver reports stays true
            try:
                time.sleep(0.5)  # status updates sent before the freeze reach the driver
                on = cluster.executors(driver.app_id)
                busy = [e for e in sorted(driver.busy_executors()) if e in on]
                if busy and driver.running_job(words):
                    victim = on[busy[0]]
                    cluster.kill_worker(victim)
                    return {"executor": busy[0], "worker": victim, "job": job.get("description") or job["name"]}
                last = f"job {job['jobId']} had no running task left once frozen"
            finally:
                cluster.thaw(*machines)
        time.sleep(0.05)
    pytest.fail(f"no running task of a job matching {words} within {timeout:g} s ({last}); jobs seen: "
                f"{sorted(seen)}\n{driver.tail()}")


def petastorm_paths(url: str) -> list[str]:
    """Every row's source path, read back through Petastorm (its Unischema, its reader)."""
    from petastorm import make_reader

    with make_reader(url, schema_fields=["path"], reader_pool_type="dummy", num_epochs=1,
                     shuffle_row_groups=False) as reader:
        return [row.path for row in reader]


def check_dataset_exact(work: Path) -> dict:
    """The materialized dataset holds every generated image exactly once, and the manifest says so."""
    from medspark.data.materialize import MANIFEST

    manifests = glob.glob(f"{work}/petastorm/synthetic/*/{MANIFEST}")
    assert len(manifests) == 1, f"one finished dataset expected, found {manifests}"
    base = Path(manifests[0]).parent
    meta = json.loads(Path(manifests[0]).read_text())
    images = sorted(str(p) for p in Path(work, "synthetic").rglob("*.png"))
    assert len(images) == 600 and meta["listed"] == 600 and meta["n_rejected"] == 0
    paths = {}
    for split in ("train", "val", "test"):
        paths[split] = petastorm_paths(f"file://{base}/{split}")
        assert len(paths[split]) == meta["sizes"][split], f"{split}: rows != the manifest's count"
    every = [p for rows in paths.values() for p in rows]
    duplicates = sorted({p for p in every if every.count(p) > 1})
    assert not duplicates, f"{len(duplicates)} paths written twice, e.g. {duplicates[:3]}"
    assert sorted(every) == images, "every image exactly once"
    return meta


@pytest.mark.parametrize("stage, words", [("preprocess", ("medspark: hash",)), ("materialize", ("write",))])
def test_materialized_data_is_exact_after_losing_a_machine(two_workers, tmp_path, stage, words):
    """preprocess: the files are read and hashed on the executors; materialize: the rows are decoded and written
    to Parquet. The lost machine's tasks (and any cached partitions it held) are recomputed on the other."""
    driver = Driver(tmp_path, "medspark.preprocess_only", master=two_workers.master_url)
    lost = lose_a_machine_during(two_workers, driver, words)
    log = driver.wait()
    assert driver.proc.returncode == 0, log
    rerun = driver.rerun_tasks(lost["executor"])
    assert rerun and all(t["rerun_ok"] for t in rerun), f"{lost}: lost tasks {rerun}"
    assert any(any(w in (t["job"] or "") for w in words) for t in rerun), f"no task of {lost['job']} lost: {rerun}"
    meta = check_dataset_exact(tmp_path / "work")
    assert sum(meta["sizes"].values()) == 600


def test_elephas_sync_training_recovers_from_a_lost_machine(two_workers, tmp_path, train_work):
    """Each epoch is one Spark job (a task per partition trains from the epoch's broadcast weights; the driver
    averages the results). The lost machine's task runs again on the surviving executor from the same weights,
    after its cached partition is read again from Parquet: the epoch ends with every partition's update once."""
    epochs = 2
    driver = Driver(tmp_path, "medspark.train", "backend=elephas_sync", "backend.workers=2", f"train.epochs={epochs}",
                    "train.batch_size=16", "train.early_stopping.patience=0", "model=dense",
                    master=two_workers.master_url, work=train_work)
    lost = lose_a_machine_during(two_workers, driver, ("spark_model.py",), after_jobs=1)  # in epoch 2: cached data
    log = driver.wait()
    assert driver.proc.returncode == 0, log
    rerun = driver.rerun_tasks(lost["executor"])
    assert rerun and all(t["rerun_ok"] for t in rerun), f"{lost}: lost tasks {rerun}"
    assert any("spark_model.py" in (t["job"] or "") for t in rerun), f"no training task lost: {rerun}"
    mlflow.set_tracking_uri(driver.uri)
    [run] = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2"
    assert run.data.metrics["epochs_run"] == epochs
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert len(history) == epochs and all(m.value == m.value for m in history), "a loss for every epoch"


def test_elephas_async_training_finishes_after_a_lost_machine(two_workers, tmp_path, train_work):
    """One Spark job trains every epoch: each task pulls weights from the parameter server on the driver, trains
    its partition and pushes an update per epoch. The machine is lost after the server has applied an update:
    Spark runs the lost task again from the server's current weights; whatever the lost attempt had pushed stays
    applied (its partition counts more than once), and `ps_updates`, a Spark accumulator, counts the
    successful attempts' pushes only (measured once: 9 updates applied, 6 counted, 3 epochs x 2 workers)."""
    epochs = 2
    driver = Driver(tmp_path, "medspark.train", "backend=elephas_async", "backend.workers=2", f"train.epochs={epochs}",
                    "train.batch_size=16", "model=dense", master=two_workers.master_url, work=train_work)
    lost = lose_a_machine_during(two_workers, driver, ("spark_model.py",),
                                 ready=lambda: "POST /update" in driver.output())  # the server applied one
    log = driver.wait()
    assert driver.proc.returncode == 0, log
    rerun = driver.rerun_tasks(lost["executor"])
    assert rerun and all(t["rerun_ok"] for t in rerun), f"{lost}: lost tasks {rerun}"
    assert any("spark_model.py" in (t["job"] or "") for t in rerun), f"no training task lost: {rerun}"
    applied = driver.output().count("POST /update")
    mlflow.set_tracking_uri(driver.uri)
    [run] = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ps_updates"] == 2 * epochs, "successful attempts only"
    assert applied >= 2 * epochs, f"the server applied {applied} updates"  # more when the lost attempt had pushed


def checkpoint_epochs(work: Path) -> int:
    """Epochs completed in the spark_barrier checkpoints under <data_url>/_checkpoints (0 while there is none)."""
    states = list((work / "petastorm" / "_checkpoints").glob("*/medspark.json"))
    return max((json.loads(s.read_text()).get("epochs_completed", 0) for s in states), default=0)


def load_and_predict(run) -> "np.ndarray":
    """The run's registered model, loaded back from MLflow, on two blank images: class probabilities."""
    import numpy as np

    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    model = mlflow.tensorflow.load_model(summary["model_uri"])
    return np.asarray(model.predict(np.zeros((2, 64, 64, 1), np.float32), verbose=0))


def running_for(seconds: float):
    """A `ready` condition for lose_a_machine_during (asked only while the job runs): true `seconds` after it
    was first asked."""
    first: list[float] = []

    def ready() -> bool:
        first[:] = first or [time.monotonic()]
        return time.monotonic() - first[0] >= seconds

    return ready


BARRIER = ("spark_barrier training",)  # its job description (each attempt's)


def test_spark_barrier_resumes_from_its_last_completed_epoch_after_a_lost_machine(two_workers, tmp_path, train_work):
    """Barrier tasks start and fail together: Spark aborts the barrier job when one is lost with its machine.
    The backend runs the barrier stage again once `backend.workers` slots are free (here: a replacement machine
    joins), and every worker restores the chief's checkpoint of the last completed epoch: the history goes on,
    no completed epoch is trained again, the model learns and loads."""
    epochs = 5
    driver = Driver(tmp_path, "medspark.train", "backend=spark_barrier", "backend.workers=2", f"train.epochs={epochs}",
                    "train.batch_size=16", "train.early_stopping.patience=0", master=two_workers.master_url,
                    work=train_work)
    lost = lose_a_machine_during(two_workers, driver, BARRIER, ready=lambda: checkpoint_epochs(train_work) >= 1)
    done = checkpoint_epochs(train_work)
    two_workers.ensure_workers(2)  # a replacement machine: barrier tasks need both slots at once
    log = driver.wait()
    assert driver.proc.returncode == 0, log
    jobs = driver.jobs()
    barrier = [j for j in jobs if BARRIER[0] in j["desc"]]
    assert [j["ok"] for j in barrier] == [False, True], f"one lost attempt, then one that succeeded: {barrier}"
    assert all(j["ok"] for j in jobs if j not in barrier), jobs
    assert any(t["job"] == barrier[0]["desc"] for t in driver.lost_tasks(lost["executor"])), "the lost barrier task"

    run = driver.run()
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["barrier_attempts"] == 2
    resumed = int(m["barrier_resumed_epochs"])
    assert 1 <= done <= resumed < epochs, f"resumed at epoch {resumed} (>= {done} completed when the machine died)"
    client = mlflow.MlflowClient()
    assert [e.step for e in client.get_metric_history(run.info.run_id, "loss")] == list(range(epochs)), \
        "each epoch once in the history: the first ones from the checkpoint"
    assert [e.step for e in client.get_metric_history(run.info.run_id, "epoch_seconds")] == \
        list(range(resumed, epochs)) and m["epochs_run"] == epochs - resumed, "completed epochs are not trained again"
    assert run.data.tags["medspark.last_completed_epoch"] == str(epochs)
    assert not Path(run.data.tags["medspark.checkpoint"]).exists(), "the finished run removes its checkpoint"
    assert m["test_accuracy"] >= 0.5, f"4 classes (chance 0.25): {m['test_accuracy']}"
    probs = load_and_predict(run)
    assert probs.shape == (2, 4) and abs(probs.sum(1) - 1).max() < 1e-4


def test_spark_barrier_fails_in_one_line_when_slots_stay_short_and_train_resume_continues(two_workers, tmp_path,
                                                                                         train_work):
    """The same loss with no replacement: the barrier stage cannot run again (one slot, two tasks). After
    `backend.slots_timeout_s` the run fails with one line that says so and names the key; its checkpoint stays,
    and once the cluster has its slots back the same command with `train.resume=true` continues from it."""
    epochs = 6
    args = ("medspark.train", "backend=spark_barrier", "backend.workers=2", f"train.epochs={epochs}",
            "train.batch_size=16", "train.early_stopping.patience=0", "backend.slots_timeout_s=10")
    driver = Driver(tmp_path, *args, master=two_workers.master_url, work=train_work, name="-first")
    lose_a_machine_during(two_workers, driver, BARRIER, ready=lambda: checkpoint_epochs(train_work) >= 1)
    start = time.monotonic()
    driver.wait()
    assert driver.proc.returncode == 2, driver.tail()
    last = driver.tail().strip().splitlines()[-1]
    assert last == ("medspark: error: backend=spark_barrier needs backend.workers=2 task slots at once (barrier mode) "
                    "but the cluster has had only 1 free for 10 s; give it more executors (or replace lost ones), "
                    "lower backend.workers, or wait longer: backend.slots_timeout_s=<seconds>"), driver.tail()
    assert time.monotonic() - start < 60, "failed soon after the timeout"
    failed = driver.run()
    assert failed.info.status == "FAILED"
    done = checkpoint_epochs(train_work)
    assert 1 <= done < epochs, "the checkpoint stays"

    two_workers.ensure_workers(2)
    resumed = Driver(tmp_path, *args, "train.resume=true", master=two_workers.master_url, work=train_work,
                     name="-resumed")
    log = resumed.wait()
    assert resumed.proc.returncode == 0, log
    run = resumed.run()
    tags, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["medspark.resumed_from"] == failed.info.run_id
    assert tags["medspark.resumed_at_epoch"] == str(done) and m["barrier_resumed_epochs"] == done
    client = mlflow.MlflowClient()
    assert [e.step for e in client.get_metric_history(run.info.run_id, "loss")] == list(range(epochs))
    assert [e.step for e in client.get_metric_history(run.info.run_id, "epoch_seconds")] == list(range(done, epochs))
    assert checkpoint_epochs(train_work) == 0, "the finished run removes its checkpoint"


def test_ensemble_member_lost_with_its_machine_trains_again(two_workers, tmp_path, train_work):
    """Each member is one ordinary Spark task: the one lost with its machine runs again on the surviving
    executor (same seeded bootstrap sample), and the run ends with every member trained in full. Six epochs: a member
    sees ~63% of the rows, and after three it scored anywhere from 0.35 to 0.86 (4 classes) on a loaded machine."""
    epochs = 6
    driver = Driver(tmp_path, "medspark.train", "backend=ensemble", "backend.members=2", f"train.epochs={epochs}",
                    "train.batch_size=16", "train.early_stopping.patience=0", master=two_workers.master_url,
                    work=train_work)
    lost = lose_a_machine_during(two_workers, driver, ("ensemble",), ready=running_for(8))  # members are training
    log = driver.wait()
    assert driver.proc.returncode == 0, log
    rerun = driver.rerun_tasks(lost["executor"])
    assert rerun and all(t["rerun_ok"] for t in rerun), f"{lost}: lost tasks {rerun}"
    assert any("ensemble" in (t["job"] or "") for t in rerun), f"no member task lost: {rerun}"
    run = driver.run()
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2"
    assert m["member_0_epochs"] == m["member_1_epochs"] == epochs
    assert m["test_accuracy"] >= 0.5, f"4 classes (chance 0.25): {m['test_accuracy']}"
    probs = load_and_predict(run)
    assert probs.shape == (2, 4) and abs(probs.sum(1) - 1).max() < 1e-4
