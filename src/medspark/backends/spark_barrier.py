"""`spark_barrier`: synchronous data parallelism across Spark executors, in barrier mode.

Our own small version of what spark-tensorflow-distributor does. One barrier stage runs one Spark task per
worker, all at once. Each task picks a free port on its executor's host, the tasks exchange `host:port` with
`allGather`, and each starts a TensorFlow worker (`MultiWorkerMirroredStrategy`, CPU ring all-reduce) on ITS
OWN shard of the Petastorm train split's row groups, read on the executor: pixels never reach the driver.
Gradients are all-reduced every step, so the workers hold identical weights; metrics are all-reduced too, so
early stopping and the learning-rate schedule decide the same on every worker and all stop together. Only
the chief (worker 0) sends its weights, history and epoch times back; the driver rebuilds the model from them.

Step counts. MWMS needs every worker to run the same number of steps or the all-reduce waits forever, and
row-group shards differ in size. So each worker's shard is `.repeat()`ed and every worker runs
`train rows // (batch x workers)` steps per epoch (per-worker batch = train.batch_size; a pass over a shard
may end in a partial batch). Validation is sharded the same way, ceil(val rows / global batch) steps from the
start of each worker's shard every epoch (about the whole split: unequal shards repeat or skip a few rows),
or, when the val split has fewer row groups than workers, every worker validates on the whole split.
BatchNorm moving statistics are not synchronized (Keras' default): each worker's follow its own shard, and on
small data they lag far behind the weights (momentum 0.99), which made the shipped model's accuracy a coin flip
between epochs. So after training the chief re-estimates them on a plain copy of its model over up to 50 batches
of the whole train split (read on its executor; keras_fit.recalibrate_batchnorm, as elephas_async does), and
ships those weights.

Why each worker trains in a child process of its Spark task. A TensorFlow process configures its collective
runtime (the gRPC server and cluster MWMS starts) once; Spark reuses Python workers
(spark.python.worker.reuse=true), so a second barrier run landing in a worker that ran a first one cannot
join its new cluster (new ports, new peers): measured here, on local[2] the second in-process run hangs
without an error. A fresh `python -m medspark.backends.spark_barrier` per task, with
this very interpreter, sidesteps that, and also lets the thread limits apply (only possible before TensorFlow
starts), returns all of TensorFlow's memory when training ends, and lets a timeout kill a hung worker without
killing Spark's. The child dies with its task (PR_SET_PDEATHSIG) when Spark kills a failed barrier stage,
and no child stops its TensorFlow server before every worker has finished (a final `ctx.barrier()`).

A lost executor. Spark does not retry a barrier stage whose result the driver collects (it aborts the job: "Could
not recover from a failed barrier ResultStage"), and a barrier stage can only start when every task has a slot.
So `fit` runs the barrier job itself again when an attempt failed because an executor was lost (Spark says
ExecutorLostFailure, or an executor of the attempt is gone), up to `backend.executor_loss_retries` times; any
other failure (a worker's own error or timeout) fails the run at once, as before. Every attempt resumes from
the checkpoint (resume.Checkpoint on `paths.checkpoint_url`, the one single/mirrored use): the chief backs up
weights, optimizer state, epoch and history at every epoch's end, every worker restores from it when fit starts
(so history continues and no completed epoch is trained again), and the driver removes it once an attempt has
succeeded. The workers check, with one all-reduce before training, that they all see the same checkpoint
(different epochs would give them different step counts: an all-reduce that never completes); a folder the
executors do not share fails with a line naming paths.checkpoint_url. Before each attempt the driver waits for
`backend.workers` free task slots, and while it runs it watches that its tasks could start: with fewer slots
than workers for longer than `backend.slots_timeout_s`, the run fails with one line naming that key (Spark itself
would wait forever on a retry). `train.resume=true` continues a killed run the same way (supports_resume).

Network: each worker's TensorFlow gRPC server listens on every interface (0.0.0.0/[::]: hard-coded in TensorFlow,
whatever host TF_CONFIG names; `bind_host` only chooses the address peers are given) and is unauthenticated,
for as long as training runs. Run spark_barrier on a trusted network or behind a host firewall
(docs/SECURITY.md; tests/test_security.py records the behaviour).

Keras 3's `fit` does not work under a multi-worker MWMS as released (two bugs, tensorflow/tensorflow#72388);
`keras_multi_worker_fixes` patches them inside the worker's child process only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from . import keras_fit
from .api import BackendError, TrainJob, TrainResult, dump_result, load_result
from .placement import free_port, host, limit_threads, require_slots, task_slots

log = logging.getLogger(__name__)
NAME = "spark_barrier"
MODULE = "medspark.backends.spark_barrier"  # run as `python -m` in each task
ERROR_MARK = "medspark spark_barrier worker"  # starts every executor-side error, found again in Spark's text
RESULT = "result.npz"  # what a worker's child hands back: arrays + JSON, never a pickle (see dump_result)


class BarrierTrainingError(RuntimeError):
    """A worker failed or timed out on the executors (the message carries its last log lines)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every barrier task needs besides the job (everything the driver decided)."""
    workers: int
    steps_per_epoch: int
    validation_steps: int  # 0 = no validation
    validation_sharded: bool
    bind_host: str | None  # None = the executor's own address
    local_mode: bool
    intra_op_threads: int | None
    inter_op_threads: int | None
    reader_pool: str
    reader_workers: int
    timeout_s: float


class SlotsShort(RuntimeError):
    """Fewer free task slots than barrier tasks for longer than backend.slots_timeout_s."""


class SparkBarrier:
    supports_resume = True  # the chief checkpoints every epoch; train.resume=true and lost executors resume from it

    def __init__(self, workers: int | None = None, bind_host: str | None = None, validation: str = "auto",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 reader_pool: str = "dummy", reader_workers: int = 4, timeout_s: float = 21600,
                 slots_timeout_s: float = 600, executor_loss_retries: int = 3):
        if validation not in ("auto", "sharded", "full"):
            raise BackendError(f"backend.validation={validation!r} must be one of auto, sharded, full")
        if workers is not None and int(workers) < 1:
            raise BackendError(f"backend.workers={workers} must be >= 1 (or null = every task slot)")
        if isinstance(slots_timeout_s, bool) or not isinstance(slots_timeout_s, (int, float)) or slots_timeout_s < 0:
            raise BackendError(f"backend.slots_timeout_s={slots_timeout_s!r} must be a number of seconds >= 0")
        if isinstance(executor_loss_retries, bool) or not isinstance(executor_loss_retries, int) \
                or executor_loss_retries < 0:
            raise BackendError(f"backend.executor_loss_retries={executor_loss_retries!r} must be an integer >= 0")
        self.workers, self.bind_host, self.validation = workers, bind_host, validation
        self.intra, self.inter = intra_op_threads, inter_op_threads
        self.reader_pool, self.reader_workers, self.timeout_s = reader_pool, int(reader_workers), float(timeout_s)
        self.slots_timeout_s, self.retries = float(slots_timeout_s), executor_loss_retries

    # ------------------------------------------------------------ driver

    def plan(self, job: TrainJob) -> WorkerSpec:
        """Every check that can fail before a task starts, and the step counts all workers share."""
        if job.spark is None:
            raise BackendError(f"backend={NAME} trains on Spark executors and needs the SparkSession (TrainJob.spark)")
        sc = job.spark.sparkContext
        n = int(self.workers or task_slots(job.spark))
        require_slots(job.spark, n, "backend.workers", NAME)
        d, t = job.data, job.train
        groups = row_groups(d.split_url("train"))
        if groups is not None and groups < n:
            raise BackendError(
                f"backend={NAME} asks for backend.workers={n} but the train split has only {groups} Parquet row "
                f"group(s) and Petastorm shards by row group; lower backend.workers or write smaller row groups: "
                f"materialize.row_group_size_mb=<smaller> materialize.rebuild=true")
        bs = t.batch_size
        global_bs = bs * n
        steps = d.sizes["train"] // global_bs
        if steps < 1:
            raise BackendError(f"backend={NAME}: {d.sizes['train']} training rows make no full global batch of "
                               f"train.batch_size={bs} x backend.workers={n}; lower one of them")
        val_rows = int(d.sizes.get("val", 0))
        sharded = False
        if val_rows:
            val_groups = row_groups(d.split_url("val")) if self.validation != "full" else None
            sharded = self.validation == "sharded" or (self.validation == "auto" and val_groups is not None
                                                        and val_groups >= n)
            if sharded and val_groups is not None and val_groups < n:
                raise BackendError(f"backend.validation=sharded but the val split has {val_groups} row group(s) for "
                                   f"{n} workers; use backend.validation=auto or full")
        val_steps = (math.ceil(val_rows / global_bs) if sharded else math.ceil(val_rows / bs)) if val_rows else 0
        return WorkerSpec(n, steps, val_steps, sharded, self.bind_host, sc.master.startswith("local"),
                          self.intra, self.inter, self.reader_pool, self.reader_workers, self.timeout_s)

    def fit(self, job: TrainJob) -> TrainResult:
        from pyspark import cloudpickle

        spec = self.plan(job)
        n, bs = spec.workers, job.train.batch_size
        ckpt = job.checkpoint  # the driver tags MLflow and removes it; the workers get a copy that does neither
        shipped = None if ckpt is None else dataclasses.replace(ckpt, on_resumed=None, on_epoch=None,
                                                                 remove_at_end=False)
        blob = cloudpickle.dumps((dataclasses.replace(job, spark=None, checkpoint=shipped), spec))  # no session
        sc = job.spark.sparkContext
        log.info("%s: %d workers x batch %d, %d steps/epoch, validation %s (%d steps)", NAME, n, bs,
                 spec.steps_per_epoch, "sharded" if spec.validation_sharded else "full", spec.validation_steps)
        if ckpt is None:
            log.warning("%s: paths.checkpoint_url=null: a lost executor restarts training from the first epoch", NAME)
        restored = completed_epochs(ckpt)  # > 0: train.resume=true continues a killed run from there
        if restored and ckpt.on_resumed:
            ckpt.on_resumed(restored)
        start = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            before = executors(sc)
            try:
                out = self._run_stage(sc, blob, spec, ckpt, attempt)
                break
            except SlotsShort as e:
                raise BackendError(str(e)) from None
            except Exception as e:
                lost = lost_executor(e, before, sc)
                if not lost or attempt > self.retries:
                    more = (f" (an executor was lost in each of {attempt} attempts: "
                            f"backend.executor_loss_retries={self.retries})") if lost else ""
                    raise BarrierTrainingError(explain(e) + more) from e
                log.warning("%s: attempt %d lost an executor (%s); running the barrier stage again, %s", NAME, attempt,
                            lost, f"resuming from the checkpoint ({completed_epochs(ckpt)} epoch(s) completed)" if ckpt
                            else "from the first epoch (paths.checkpoint_url=null)")
        stage_seconds = time.perf_counter() - start
        if len(out) != 1:
            raise BarrierTrainingError(f"backend={NAME}: expected the chief's result, got {len(out)} results")
        chief = load_result(out[0])
        if ckpt is not None:
            ckpt.remove()  # every worker has finished: nothing left to resume

        model = job.build_model()
        keras_fit.compile_model(model, job)
        model.set_weights(chief["weights"])
        epochs_run = len(chief["epoch_seconds"])
        resumed = int(chief.get("resumed_epochs", 0))
        return TrainResult(
            model, chief["history"], chief["epoch_seconds"], chief["fit_seconds"],
            images_seen=spec.steps_per_epoch * bs * n * epochs_run, workers=n, global_batch_size=bs * n,
            params={"bind_host": spec.bind_host or ("127.0.0.1" if spec.local_mode else "executor address"),
                    "worker_addresses": ",".join(chief["addresses"]), "per_worker_batch_size": bs,
                    "steps_per_epoch": spec.steps_per_epoch, "validation_steps": spec.validation_steps,
                    "validation": "sharded" if spec.validation_sharded else "full",
                    "intra_op_threads": chief["threads"][0], "inter_op_threads": chief["threads"][1],
                    "isolation": "subprocess per task"},
            metrics={"bn_recalibration_batches": chief["bn_batches"], "barrier_stage_seconds": stage_seconds,
                     "barrier_startup_seconds": max(0.0, stage_seconds - chief["fit_seconds"]),
                     "barrier_attempts": attempt, "barrier_resumed_epochs": resumed},
            resumed_epochs=resumed)

    def _run_stage(self, sc, blob: bytes, spec: WorkerSpec, ckpt, attempt: int) -> list:
        """One barrier job: wait for the slots, run it, watched (see Watch); the chief's result bytes."""
        n = spec.workers
        group = f"medspark-{NAME}-{uuid.uuid4().hex[:12]}"
        wait_for_slots(sc, n, self.slots_timeout_s)  # before submitting: Spark's own check cannot be cancelled
        sc.setJobGroup(group, f"medspark: {NAME} training, {n} workers" + (f", attempt {attempt}" if attempt > 1
                                                                               else ""))
        watch = Watch(sc, group, n, self.slots_timeout_s, ckpt)
        watch.start()
        try:
            return (sc.parallelize(range(n), n).barrier()
                    .mapPartitions(lambda it: barrier_task(it, blob, spec)).collect())
        except Exception:
            if watch.short is not None:
                raise SlotsShort(slots_message(n, watch.short, self.slots_timeout_s)) from None
            raise
        finally:
            watch.stop()
            sc.setJobDescription(None)
            sc.setLocalProperty("spark.jobGroup.id", None)


# ------------------------------------------------------------ driver: slots, lost executors, progress

def concurrent_slots(sc) -> int:
    """Tasks the cluster can run at once right now (Spark's own count for barrier stages: the live executors'
    cores / spark.task.cpus); SparkContext.defaultParallelism where that internal call is unavailable."""
    try:
        jsc = sc._jsc.sc()
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:
        return int(sc.defaultParallelism)


def slots_message(n: int, free: int, timeout_s: float) -> str:
    return (f"backend={NAME} needs backend.workers={n} task slots at once (barrier mode) but the cluster has had "
            f"only {free} free for {timeout_s:g} s; give it more executors (or replace lost ones), lower "
            f"backend.workers, or wait longer: backend.slots_timeout_s=<seconds>")


def wait_for_slots(sc, n: int, timeout_s: float) -> None:
    """Return once `n` tasks can run at once; SlotsShort after `timeout_s` seconds without."""
    deadline, free = time.monotonic() + timeout_s, concurrent_slots(sc)
    if free < n:
        log.warning("%s: waiting up to %g s for %d free task slots (the cluster has %d)", NAME, timeout_s, n, free)
    while free < n:
        if time.monotonic() >= deadline:
            raise SlotsShort(slots_message(n, free, timeout_s))
        time.sleep(1)
        free = concurrent_slots(sc)


def executors(sc) -> set[str]:
    """host:port of the executors the driver knows now (the driver included)."""
    try:
        return {f"{e.host()}:{e.port()}" for e in sc._jsc.sc().statusTracker().getExecutorInfos()}
    except Exception:
        return set()


def lost_executor(e: Exception, before: set[str], sc, grace_s: float = 10) -> str:
    """Why a failed attempt counts as a lost executor ("" = it does not): Spark's ExecutorLostFailure in the
    error, or an executor known when the attempt started that is gone. The surviving workers may fail first
    (their peer vanished) before the driver notices the loss: then wait up to `grace_s` for it."""
    if "ExecutorLostFailure" in str(e):
        return "ExecutorLostFailure"
    if sc.master.startswith("local"):  # one JVM: no executor to lose
        return ""
    deadline = time.monotonic() + grace_s
    while True:
        gone = before - executors(sc) if before else set()
        if gone:
            return f"executor {', '.join(sorted(gone))} gone"
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.5)


def completed_epochs(ckpt) -> int:
    """Epochs completed in the checkpoint (its medspark.json), 0 without one."""
    from ..resume import read_checkpoint_state

    return int((read_checkpoint_state(ckpt.directory) or {}).get("epochs_completed", 0)) if ckpt is not None else 0


class Watch:
    """A driver thread while a barrier job runs: cancels the job when its tasks cannot start (the job's stages run
    no task and the cluster has fewer slots than workers) for longer than the slot timeout, and follows the
    checkpoint's completed epochs onto the run (`medspark.last_completed_epoch`, as single does every epoch)."""

    def __init__(self, sc, group: str, workers: int, timeout_s: float, ckpt, every_s: float = 1.0):
        self.sc, self.group, self.n, self.timeout_s, self.ckpt, self.every_s = sc, group, workers, timeout_s, ckpt, \
            every_s
        self.short: int | None = None  # free slots when it gave up waiting
        self._stop, self._epochs = threading.Event(), completed_epochs(ckpt)
        self._thread = threading.Thread(target=self._run, name=f"{NAME}-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._progress()

    def _running_tasks(self) -> int | None:
        """Tasks of this job group running now; None while no job of it runs yet."""
        st = self.sc.statusTracker()
        jobs = [st.getJobInfo(j) for j in st.getJobIdsForGroup(self.group)]
        stages = [st.getStageInfo(s) for j in jobs if j is not None and j.status == "RUNNING" for s in j.stageIds]
        if not any(j is not None and j.status == "RUNNING" for j in jobs):
            return None
        return sum(s.numActiveTasks for s in stages if s is not None)

    def _progress(self) -> None:
        if self.ckpt is None or self.ckpt.on_epoch is None:
            return
        done = completed_epochs(self.ckpt)
        if done > self._epochs:
            self._epochs = done
            self.ckpt.on_epoch(done)

    def _run(self) -> None:
        short_since = None
        while not self._stop.wait(self.every_s):
            try:
                self._progress()
                free = concurrent_slots(self.sc)
                if self._running_tasks() == 0 and free < self.n:
                    short_since = short_since or time.monotonic()
                    if time.monotonic() - short_since > self.timeout_s:
                        self.short = free
                        log.warning("%s: %s", NAME, slots_message(self.n, free, self.timeout_s))
                        self.sc.cancelJobGroup(self.group)
                        return
                else:
                    short_since = None
            except Exception as e:  # watching never fails the training
                log.debug("%s watch: %s", NAME, e)


def row_groups(url: str) -> int | None:
    """Parquet row groups under a split's URL, counted with pyarrow on the driver; None when pyarrow cannot
    read that filesystem (the check is then skipped: Petastorm will say it itself)."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(url)
        total = 0
        for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type != pafs.FileType.File or info.base_name.startswith(("_", ".")):
                continue  # _SUCCESS, _common_metadata, .crc files
            with filesystem.open_input_file(info.path) as f:
                total += pq.ParquetFile(f).metadata.num_row_groups
        return total
    except Exception as e:  # e.g. s3a:// (Hadoop only) or no libhdfs
        log.warning("%s: could not count the row groups of %s (%s); not checked", NAME, url, e)
        return None


def explain(e: Exception) -> str:
    """One readable message from Spark's long Java/Python error text: our worker's own message if present."""
    text = str(e)
    i = text.find(ERROR_MARK)
    if i >= 0:
        msg = text[i:]
        end = msg.find("\n\tat ")  # the Java stack that follows the Python traceback
        return f"backend={NAME} failed on the executors: {msg[:end if end > 0 else 4000][:4000].rstrip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"backend={NAME} failed on the executors: {first[:1000]} (see the executor logs)"


# ------------------------------------------------------------ executor: the barrier task

def failure(lines: list[str]) -> str:
    """A dead worker's last output as an error: its last line (the exception) first, then its traceback (or
    the whole tail when there is none), without TensorFlow's start-up noise above it."""
    import re

    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    last = errors[-1] if errors else next((line for line in reversed(lines) if line.strip()), "no output")
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
                default=0)
    return f"{last}\n" + "\n".join(lines[start:])


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the task's Python worker dies (Spark kills failed stages)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def barrier_task(_, blob: bytes, spec: WorkerSpec):
    """One barrier task: rendezvous, then run one TensorFlow worker in a child process and wait for it."""
    import collections
    import json
    import shutil
    import subprocess
    import tempfile
    import threading

    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    index = ctx.partitionId()
    address = host(spec.bind_host, spec.local_mode, lambda: ctx.getTaskInfos()[index].address.rsplit(":", 1)[0])
    port = free_port(address)
    addresses = list(ctx.allGather(f"{address}:{port}"))
    try:
        cpus = int(ctx.cpus())
    except Exception:
        cpus = 1
    intra = int(spec.intra_op_threads or cpus)
    inter = int(spec.inter_op_threads or max(2, cpus))
    who = f"{ERROR_MARK} {index} of {spec.workers} ({addresses[index]})"

    tmp = tempfile.mkdtemp(prefix=f"medspark-barrier-{index}-")
    result = os.path.join(tmp, RESULT)
    with open(os.path.join(tmp, "job.pkl"), "wb") as f:
        f.write(blob)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_NUM_INTRAOP_THREADS=str(intra),
               TF_NUM_INTEROP_THREADS=str(inter), MEDSPARK_BARRIER_THREADS=f"{intra},{inter}",
               TF_CONFIG=json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    gpus = getattr(ctx.resources().get("gpu"), "addresses", None)  # Spark GPU scheduling gave this task its GPU(s)
    if gpus:  # (spark.task.resource.gpu.amount; docs/gpu.md): this worker sees only those
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    hosts = ",".join(sorted({a.rsplit(":", 1)[0] for a in addresses}))
    env["no_grpc_proxy"] = ",".join(filter(None, [env.get("no_grpc_proxy"), hosts]))  # peers are never proxied

    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen([sys.executable, "-m", MODULE, tmp], env=env, cwd=tmp, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=_die_with_parent)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(f"[{NAME} worker {index}] {line}")
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + spec.timeout_s
        while proc.poll() is None and not os.path.exists(result):
            if time.monotonic() > deadline:
                proc.kill()
                reader.join(5)
                raise RuntimeError(f"{who}: still training after backend.timeout_s={spec.timeout_s:g} s, killed; "
                                   f"its last output: {failure(list(tail))}")
            time.sleep(0.2)
        if not os.path.exists(result):
            reader.join(5)
            raise RuntimeError(f"{who}: the training process exited with code {proc.returncode} before "
                               f"finishing: {failure(list(tail))}")
        # Every worker has finished fit(): only now may the TensorFlow servers (the children) go away.
        ctx.barrier()
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if index == 0:
            with open(result, "rb") as f:
                yield f.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------ the child: one TensorFlow worker

def keras_multi_worker_fixes(model, strategy, shape: tuple, weighted: bool, findings: int | None = None) -> None:
    """Make Keras 3 `fit`/`evaluate` work under a multi-worker MultiWorkerMirroredStrategy (measured with Keras
    3.15 + TF 2.19; tensorflow/tensorflow#72388). Applied in the worker's own child process only.

    1. `_maybe_symbolic_build` takes a batch off the iterator and calls strategy.reduce("MEAN") on the whole
       (x, y) tuple: "Attempt to convert a value (PerReplica...)". (It would also all-reduce a data batch
       across workers.) Here it builds the metrics from the input's shape instead, consuming nothing.
    2. `reduce_per_replica` reduces the scalar step logs (loss, accuracy) with axis=0: "Invalid reduction
       dimension 0 for input with 0 dimensions". Scalars are averaged across workers with axis=None instead.
    Epoch-end logs come from the metrics' SyncOnRead variables, all-reduced on read: every worker sees the
    same numbers, so callbacks decide the same everywhere."""
    import tensorflow as tf

    try:
        from keras.src import tree
        from keras.src.backend.tensorflow import trainer as tf_trainer
    except ImportError:  # another Keras layout: leave it as it is
        return
    target = tf.TensorSpec((None, findings), tf.float32) if findings else tf.TensorSpec((None,), tf.int32)
    example = [tf.TensorSpec((None, *shape), tf.float32), target]  # findings: multi-hot targets (multilabel)
    if weighted:
        example.append(tf.TensorSpec((None,), tf.float32))

    def symbolic_build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=tuple(example))

    if hasattr(model, "_maybe_symbolic_build") and hasattr(model, "_symbolic_build"):
        model._maybe_symbolic_build = symbolic_build
    original = getattr(tf_trainer, "reduce_per_replica", None)
    multi_worker = getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)
    if original is None or multi_worker is None or getattr(original, "medspark_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tree.map_structure(
                lambda v: v if v is None else strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0),
                values)
        return original(values, strategy, reduction)

    reduce_per_replica.medspark_fixed = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def worker_checkpoint(job: TrainJob, index: int) -> TrainJob:
    """This worker's view of the run's checkpoint: every worker restores from it (same weights, epoch and
    learning-rate schedule state everywhere), only the chief (worker 0) writes it, and the history is read from
    the folder now (a stage run again after a lost executor continues what the last attempt recorded)."""
    from ..resume import read_checkpoint_state

    if job.checkpoint is None:
        return job
    state = read_checkpoint_state(job.checkpoint.directory) or {}
    return dataclasses.replace(job, checkpoint=dataclasses.replace(
        job.checkpoint, writer=index == 0, remove_at_end=False, history=state.get("history") or {}))


def check_same_checkpoint(strategy, ckpt) -> None:
    """All workers must restore the same epoch, or their step counts differ and an all-reduce never completes:
    one all-reduce of the completed epochs each sees (sum, sum of squares), before training; all fail alike."""
    if ckpt is None:
        return
    import tensorflow as tf

    from ..resume import read_checkpoint_state

    seen = float((read_checkpoint_state(ckpt.directory) or {}).get("epochs_completed", 0))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                            strategy.run(lambda: tf.constant([seen, seen * seen, 1.0], tf.float32)), axis=None)
    s, sq, n = (float(v) for v in total.numpy())
    if sq * n != s * s:  # not all equal
        raise RuntimeError(f"the workers see different checkpoints in {ckpt.directory} (between {s / n:g} epochs on "
                           f"average and {seen:g} here): paths.checkpoint_url must be a folder every executor reads "
                           "and writes (a shared disk, hdfs://, gs://), or null to train without checkpoints")


def worker_main(tmp: str) -> None:
    """Train as one MultiWorkerMirroredStrategy worker (TF_CONFIG from the task), write the result, then wait
    for the task to close stdin (all workers done) and exit without TensorFlow's slow teardown."""
    import json

    with open(os.path.join(tmp, "job.pkl"), "rb") as f:
        job, spec = pickle.load(f)  # cloudpickle (the job holds code) from our own task, in its 0700 temp dir
    index = int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    job = worker_checkpoint(job, index)
    addresses = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    intra, inter = (int(x) for x in os.environ["MEDSPARK_BARRIER_THREADS"].split(","))

    limit_threads(intra, inter)  # before anything starts TensorFlow's runtime
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING))
    check_same_checkpoint(strategy, job.checkpoint)
    n, bs = spec.workers, job.train.batch_size
    cw = job.class_weight()
    weights = tf.constant([cw.get(i, 1.0) for i in range(len(job.data.classes))], tf.float32) if cw else None

    def prepared(ds):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF  # ours
        options.threading.private_threadpool_size = max(1, intra)
        return ds.with_options(options)

    def train_fn(_ctx):  # called once, on this worker: its own row groups, repeated (see the module doc)
        ds = job.dataset("train", True, bs, shard=index, num_shards=n, seed=job.seed + index,
                         pool=spec.reader_pool, workers=spec.reader_workers).repeat()
        if weights is not None:  # Keras cannot add class weights to a distributed dataset itself
            ds = ds.map(lambda x, y: (x, y, tf.gather(weights, y)))
        return prepared(ds)

    def val_fn(_ctx):
        if spec.validation_sharded:
            ds = job.dataset("val", False, bs, shard=index, num_shards=n, pool=spec.reader_pool,
                             workers=spec.reader_workers).repeat()
        else:  # the whole split on every worker: identical step counts by construction
            ds = job.dataset("val", False, bs, pool=spec.reader_pool, workers=spec.reader_workers)
        return prepared(ds)

    train_ds = strategy.distribute_datasets_from_function(train_fn)
    val_ds = strategy.distribute_datasets_from_function(val_fn) if spec.validation_steps else None
    result = keras_fit.fit(
        job, train_ds, val_ds, batch_size=bs, steps_per_epoch=spec.steps_per_epoch,
        validation_steps=spec.validation_steps or None, strategy=strategy, class_weight=False,  # in the data
        prepare=lambda model: keras_multi_worker_fixes(model, strategy, tuple(job.data.shape), weights is not None,
                                                       len(job.data.classes) if job.data.multilabel else None),
        verbose=None if index == 0 else 0)
    out = {"done": True}
    if index == 0:  # the chief's weights, its BatchNorm statistics re-estimated over the whole train split
        model = job.build_model()  # outside the strategy: a plain copy, as the driver will rebuild it
        model.set_weights(result.model.get_weights())
        bn = keras_fit.recalibrate_batchnorm(model, job.dataset("train", False, bs, pool=spec.reader_pool,
                                                                workers=spec.reader_workers), batches=50)
        out.update(weights=model.get_weights(), history=result.history, epoch_seconds=result.epoch_seconds,
                   fit_seconds=result.train_seconds, addresses=addresses, threads=(intra, inter), bn_batches=bn)
        out["resumed_epochs"] = result.resumed_epochs
    part = os.path.join(tmp, RESULT + ".part")
    with open(part, "wb") as f:
        f.write(dump_result(out))
    os.replace(part, os.path.join(tmp, RESULT))  # atomic: the task never reads half a file
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdin.read()  # EOF when the task closes it: every worker has finished
    os._exit(0)


if __name__ == "__main__":
    from medspark.quiet_daemon import install

    install()  # TensorFlow's start-up noise filtered, whatever imports it first (unpickling the job does)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_main(sys.argv[1])
