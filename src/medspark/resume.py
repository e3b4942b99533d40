"""Interrupted trainings: checkpoints to resume from (train.resume=true), and MLflow runs that tell the truth.

Checkpoints. Backends that train with Keras `model.fit` (`single`, `mirrored`, `spark_barrier`:
`supports_resume = True`) back up the model, the optimizer and the epoch at the end of every epoch (`Checkpoint`
below, a Keras BackupAndRestore) to `<paths.checkpoint_url>/<key>/` (default `<paths.data_url>/_checkpoints/<key>`:
on the data's filesystem, so any machine that reads the data can resume). The key is `<dataset>-<backend>-<hash>` of
everything that shapes the training: the data fingerprint, `model`, `backend`, `train` (but resume, verbose,
objective, measure_baseline) and `seed`; a run with other settings never picks up another's checkpoint. A fresh
run (train.resume=false) discards a checkpoint left under its key and writes its own; with train.resume=true it
continues from the last completed epoch. `fit` removes the checkpoint when it ends normally, so finished
runs leave nothing behind; a run killed and never resumed leaves one folder (two weight generations).
`spark_barrier` trains on executors: its chief worker writes the checkpoint, every worker restores from it (so
it must be a folder all executors share, as the data is), and the driver removes it once the barrier stage has
succeeded; a barrier stage run again after a lost executor resumes from it too (backends/spark_barrier.py).
The other Spark backends (elephas_*, ensemble) keep no checkpoints: train.resume=true fails there, before
Spark starts, with one line (retraining from scratch while the user believes it resumes is worse).

MLflow. A resumed training is a new run linked to the one it continues: tags `medspark.resumed_from=<run id>`
and `medspark.resumed_at_epoch=N` (epochs done before; this run trains N+1..), and on the old run
`medspark.resumed_by=<new run id>`. The new run's per-epoch curves cover every epoch (the history of the
first N is kept in the checkpoint), its `epoch_seconds` and `epochs_run` only the epochs it trained. Every
training run carries `medspark.last_completed_epoch`, updated as epochs end, and every medspark run
`medspark.process` (host:pid:start time). SIGTERM ends a run KILLED by itself (medspark.interrupts); after a
SIGKILL nothing runs, so the next medspark run in the experiment on that host (and a resumed one, wherever it
runs) finds the RUNNING run whose process is gone and ends it KILLED, with `medspark.ended_by` saying why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("medspark")

KEY_IGNORES = ("resume", "verbose", "objective", "measure_baseline")  # train.* that do not change the training
PROCESS_TAG = "medspark.process"


# ---------------------------------------------------------------- config

def supports(backend_cfg) -> bool:
    """Whether the configured backend declares `supports_resume` (it honours TrainJob.checkpoint)."""
    from .backends import build

    try:
        return bool(build(backend_cfg).supports_resume)
    except Exception:  # a bad backend setting is reported by the backend itself, in one line
        return False


def check(cfg, backend=None) -> None:
    """train.resume=true on a backend that cannot resume: one line, before anything starts."""
    from .config import ConfigError

    resumable = backend.supports_resume if backend is not None else supports(cfg.backend)
    if cfg.train.get("resume") and not resumable:
        raise ConfigError(f"train.resume=true but backend={cfg.backend.name} trains on Spark executors and keeps no "
                          "checkpoints to resume from (backends that can: single, mirrored, spark_barrier); drop "
                          "train.resume or use one of those")


def checkpoint_key(cfg, fingerprint: str) -> str:
    """`<dataset>-<backend>-<hash>` of the data fingerprint and every setting that shapes the training."""
    from omegaconf import OmegaConf

    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in KEY_IGNORES}
    blob = json.dumps({"data": fingerprint, "model": OmegaConf.to_container(cfg.model, resolve=True),
                       "backend": OmegaConf.to_container(cfg.backend, resolve=True), "train": train,
                       "seed": cfg.get("seed")}, sort_keys=True, default=str)
    return f"{cfg.dataset.name}-{cfg.backend.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def checkpoint_root(cfg) -> str | None:
    """paths.checkpoint_url as TensorFlow's file system wants it (file:// URLs and plain paths: a local path);
    None when checkpoints are off."""
    url = cfg.paths.get("checkpoint_url")
    if not url:
        return None
    url = str(url).rstrip("/")
    if url.startswith("file://"):
        return url[len("file://"):] or "/"
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


# ---------------------------------------------------------------- processes

def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name; [] when there is no such process; None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_id() -> str:
    """This process as `host:pid:start` (start: clock ticks after boot, so a reused pid does not match)."""
    fields = _proc_stat(os.getpid()) or []
    return f"{socket.gethostname()}:{os.getpid()}:{fields[19] if len(fields) > 19 else ''}"


def process_alive(process: str) -> bool | None:
    """Whether the process a `process_id()` names still runs: True/False on this host, None elsewhere (unknown)."""
    try:
        host, pid_text, start = str(process).rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    fields = _proc_stat(pid)
    if fields is None:  # no /proc (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # gone, or a zombie nobody has reaped yet
        return False
    return not start or fields[19] == start


# ---------------------------------------------------------------- MLflow

def _client():
    import mlflow

    return mlflow.MlflowClient()


def _set_tags(run_id: str, tags: dict) -> None:
    """Tags on a run; a tracking hiccup is logged, never fatal (training matters more than a tag)."""
    try:
        client = _client()
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
    except Exception as e:
        log.warning("could not tag run %s with %s: %s", run_id, tags, e)


def _end_killed(run_id: str, why: str, by: str) -> bool:
    """End a run still RUNNING as KILLED, saying why and who ended it. False when it was not RUNNING."""
    client = _client()
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, "medspark.ended_by", f"run {by}: {why}"[:5000])
    client.set_terminated(run_id, "KILLED")
    log.warning("run %s was still RUNNING but %s: ended it as KILLED", run_id, why)
    return True


def end_dead_runs(current_run_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of the current run's experiment whose medspark process on this host is gone
    (killed by SIGKILL, the OOM killer or a power cut: nothing in them could end the run). Returns their ids."""
    ended = []
    try:
        client = _client()
        exp = client.get_run(current_run_id).info.experiment_id
        host = socket.gethostname()
        runs = client.search_runs([exp], filter_string=f"attributes.status = 'RUNNING' and "
                                                       f"tags.`{PROCESS_TAG}` LIKE '{host}:%'", max_results=200)
        for run in runs:
            process = run.data.tags.get(PROCESS_TAG, "")
            if run.info.run_id != current_run_id and process_alive(process) is False:
                if _end_killed(run.info.run_id, f"its process {process} is gone (killed without ending its run)",
                               current_run_id):
                    ended.append(run.info.run_id)
    except Exception as e:  # bookkeeping of other runs never fails this one
        log.warning("could not look for dead RUNNING runs: %s", e)
    return ended


# ---------------------------------------------------------------- the checkpoint of one training

@dataclass
class Checkpoint:
    """Where a backend that trains with `model.fit` backs up its training at the end of every epoch, so that a
    killed run can go on from there (train.resume=true). Made by `prepare`; keras_fit.callbacks adds it.

    `<directory>/backup/`: Keras BackupAndRestore (model weights, optimizer state, epoch), two generations, so
    a backup cut in half falls back to the one before. `<directory>/medspark.json`: the run and process that
    own it, and the per-epoch history so far (Keras keeps none). Both are written at every epoch's end as one
    step that a SIGTERM does not cut (medspark.interrupts.deferred), and removed when `fit` ends normally.
    Several workers training one model (spark_barrier): all restore from it, one (`writer`) writes it, and
    none removes it at the end (`remove_at_end=False`: the driver does, once every worker has finished)."""
    directory: str  # a local path, or a URL TensorFlow's file system knows (hdfs://, gs://)
    owner: dict[str, Any]  # recorded in medspark.json: run_id, process, key
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch, from the first (restored ones too)
    on_resumed: Callable[[int], None] | None = None  # called once, with the number of epochs restored (> 0)
    on_epoch: Callable[[int], None] | None = None  # called with the number of epochs completed
    resumed_epochs: int = 0  # epochs the backup restored (set when fit starts)
    writer: bool = True  # this process writes the backup and medspark.json (False: a worker that only restores)
    remove_at_end: bool = True  # fit ending normally removes the checkpoint

    STATE = "medspark.json"
    BACKUP = "backup"

    def callback(self, others: list):
        """The Keras callback (a BackupAndRestore). `others`: the fit's other callbacks, whose learning-rate
        schedule state is replayed from the history on resuming."""
        import keras

        from .interrupts import deferred

        ckpt = self

        class _Backup(keras.callbacks.BackupAndRestore):
            def on_train_begin(self, logs=None):
                super().on_train_begin(logs)  # restores weights + optimizer, sets the epoch fit starts from
                ckpt._restored(int(getattr(self.model, "_initial_epoch", None) or 0), others)

            def on_epoch_end(self, epoch, logs=None):
                if not ckpt.writer:
                    return
                with deferred():  # history, backup and MLflow tag agree, whenever a SIGTERM comes
                    ckpt._record(epoch, logs or {})  # the history first: it may run ahead of the backup, never behind
                    super().on_epoch_end(epoch, logs)  # the Keras backup of this epoch
                    if ckpt.on_epoch:
                        ckpt.on_epoch(epoch + 1)
                    ckpt._save(epoch + 1)  # epochs_completed last: it never runs ahead of the backup

            def on_train_end(self, logs=None):
                if ckpt.remove_at_end:
                    super().on_train_end(logs)  # deletes the backup
                    ckpt.remove()

        return _Backup(backup_dir=f"{self.directory}/{self.BACKUP}", double_checkpoint=True)

    def _restored(self, epochs: int, others: list) -> None:
        self.resumed_epochs = epochs
        self.history = {k: v[:epochs] for k, v in self.history.items()}
        if not epochs:
            self.history = {}
            return
        from .backends.schedule import LrSchedule

        log.info("resuming from the checkpoint in %s: %d epoch(s) done, training from epoch %d", self.directory,
                 epochs, epochs + 1)
        for cb in others:  # e.g. lr_schedule=plateau: its best/wait/rate follow from the val_loss history
            state = getattr(cb, "schedule", None)
            if isinstance(state, LrSchedule):
                for i in range(epochs):
                    state.lr_for(i)
                    state.end_epoch({k: v[i] for k, v in self.history.items() if len(v) > i})
        if self.on_resumed:
            self.on_resumed(epochs)

    def _record(self, epoch: int, logs: dict) -> None:
        for k, v in logs.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            vals = self.history.setdefault(k, [])
            del vals[epoch:]
            vals.append(value)
        self._save(epoch)

    def _save(self, epochs_completed: int) -> None:
        write_checkpoint_state(self.directory, {**self.owner, "epochs_completed": epochs_completed,
                                                "history": self.history,
                                                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def put(self, name: str, data: bytes) -> None:
        """Another callback's state as a file of this checkpoint's folder (replaced whole), written by the `writer`
        only, gone with the checkpoint (backends/snapshots.py keeps its snapshots here)."""
        if self.writer:
            write_replacing(f"{self.directory}/{name}", data)

    def get(self, name: str) -> bytes | None:
        """A file `put` wrote, or None when it is not there."""
        import tensorflow as tf

        path = f"{self.directory}/{name}"
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()

    def remove(self) -> None:
        import tensorflow as tf

        if tf.io.gfile.exists(self.directory):
            tf.io.gfile.rmtree(self.directory)


def read_checkpoint_state(directory: str) -> dict | None:
    """The medspark.json of a checkpoint folder, or None (absent or unreadable)."""
    import json

    import tensorflow as tf

    path = f"{directory}/{Checkpoint.STATE}"
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "r") as f:
            return json.loads(f.read())
    except Exception as e:  # a torn or foreign file: treated as no checkpoint
        log.warning("ignoring unreadable checkpoint state %s: %s", path, e)
        return None


def write_checkpoint_state(directory: str, state: dict) -> None:
    """medspark.json, replaced whole."""
    import json

    write_replacing(f"{directory}/{Checkpoint.STATE}", json.dumps(state).encode())


def write_replacing(path: str, data: bytes) -> None:
    """A file of a checkpoint folder replaced whole: written beside it, then renamed over it (a reader never sees
    half of it), on any file system TensorFlow knows."""
    import tensorflow as tf

    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
        f.write(data)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)



def _usable(directory: str, cfg, key: str) -> str:
    """`directory` when TensorFlow can write there; else a local fallback under paths.work_dir, with a warning
    (e.g. an s3a:// data URL: TensorFlow's file system knows hdfs:// and gs://, not Hadoop's s3a)."""
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(directory)
        return directory
    except Exception as e:
        fallback = os.path.join(str(cfg.paths.work_dir), "checkpoints", key)
        log.warning("cannot write checkpoints to %s (%s): using %s on this machine instead; set "
                    "paths.checkpoint_url to a path or URL TensorFlow can write (a shared disk, hdfs://, gs://) to "
                    "resume elsewhere, or to null to turn checkpoints off", directory, str(e).splitlines()[0], fallback)
        tf.io.gfile.makedirs(fallback)
        return fallback


def prepare(cfg, data, run_id: str, backend=None):
    """The Checkpoint for this training (None: backend without checkpoints, or paths.checkpoint_url=null):
    resumed from the one under this config's key when train.resume=true, else a fresh one. Records the links
    between the runs in MLflow (see the module docstring)."""
    import tensorflow as tf

    from .config import ConfigError

    resume = bool(cfg.train.get("resume"))
    root = checkpoint_root(cfg)
    if root is None or not (backend.supports_resume if backend is not None else supports(cfg.backend)):
        if resume:
            log.warning("train.resume=true but paths.checkpoint_url is null (checkpoints off): training from the "
                        "first epoch")
        return None
    key = checkpoint_key(cfg, data.fingerprint)
    directory = _usable(f"{root}/{key}", cfg, key)
    state = read_checkpoint_state(directory) or {}
    previous = state.get("run_id")
    if previous and previous != run_id and process_alive(state.get("process", "")):
        if resume:
            raise ConfigError(f"train.resume=true but run {previous} (process {state.get('process')}) is still "
                              f"training this config and writing its checkpoint {directory}: let it finish or stop it")
        log.warning("run %s is training the same config right now and owns the checkpoint %s: this run trains "
                    "without one", previous, directory)
        return None
    _set_tags(run_id, {"medspark.checkpoint": directory})
    has_backup = tf.io.gfile.exists(f"{directory}/{Checkpoint.BACKUP}")
    history = {}
    if resume and previous and has_backup:
        history = state.get("history") or {}
        log.info("train.resume=true: continuing run %s from its checkpoint %s (%s epoch(s) recorded)", previous,
                 directory, state.get("epochs_completed"))
        _set_tags(run_id, {"medspark.resumed_from": previous})
        try:
            _set_tags(previous, {"medspark.resumed_by": run_id})
            _end_killed(previous, "it was interrupted and this run resumes its training", run_id)
        except Exception as e:  # e.g. it lives in another tracking store
            log.warning("could not update the interrupted run %s: %s", previous, e)
    else:
        if resume:
            log.warning("train.resume=true but there is no checkpoint of this config in %s (a run that finishes "
                        "removes its own): training from the first epoch", directory)
            _set_tags(run_id, {"medspark.resumed_from": "none (no checkpoint)"})
        elif previous or has_backup:
            log.info("train.resume=false: discarding the checkpoint of run %s in %s (train.resume=true would have "
                     "continued it)", previous, directory)
        if tf.io.gfile.exists(directory):
            tf.io.gfile.rmtree(directory)
    owner = {"run_id": run_id, "process": process_id(), "key": key}
    write_checkpoint_state(directory, {**owner, "epochs_completed": state.get("epochs_completed", 0) if history else 0,
                                       "history": history})

    def resumed(epochs: int) -> None:  # the backup's epoch count is the truth, also for the interrupted run
        _set_tags(run_id, {"medspark.resumed_at_epoch": epochs})
        if history:
            _set_tags(previous, {"medspark.last_completed_epoch": epochs})

    return Checkpoint(directory, owner, history=history, on_resumed=resumed,
                      on_epoch=lambda n: _set_tags(run_id, {"medspark.last_completed_epoch": n}))
