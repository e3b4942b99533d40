"""`ensemble`: bagging. N members train at once as Spark tasks, each on its own bootstrap sample of the train
split, and the driver joins them into ONE soft-voting Keras model weighted by each member's validation accuracy.

Each task reads the Petastorm train split itself, on its executor, and draws its bootstrap sample there (sampling
with replacement, seeded per member); pixels never pass through the driver. A task sends back only its member's
weights (a list of numpy arrays), its validation predictions and its history. The driver builds every member
itself (first, so that an impossible override fails before any task starts), sets the weights it gets back and
wires them into input -> member_i -> Rescaling(w_i) -> Add: built-in layers only, so MLflow and `.keras` files
round-trip the result without custom objects.

Memory: a member holds its split of the train set in memory (uint8, as Elephas workers hold their partitions) plus
the val split; parameters travel once per member (about 1.5 MB for small_cnn, about 95 MB for resnet50).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import numpy as np

from . import keras_fit
from .api import BackendError, TrainJob, TrainResult
from .placement import is_local, limit_threads, task_slots

log = logging.getLogger(__name__)

WEIGHTINGS = ("accuracy", "equal")


@dataclasses.dataclass(frozen=True)
class Member:
    """What one Spark task needs to know about its member (the rest comes from the shipped TrainJob)."""
    index: int
    seed: int  # Keras seed: weight init, dropout, shuffling and augmentation
    overrides: dict  # model builder overrides: name, and dropout / l2 where configured


class Ensemble:
    supports_resume = False  # members keep no checkpoints

    def __init__(self, members: int = 3, member_dropout=None, member_l2=None, sample_fraction: float = 1.0,
                 weighting: str = "accuracy", threads_per_member: int | None = None):
        self.members = members
        self.member_dropout = _as_list(member_dropout)
        self.member_l2 = _as_list(member_l2)
        self.sample_fraction = sample_fraction
        self.weighting = weighting
        self.threads_per_member = threads_per_member

    # ------------------------------------------------------------ driver

    def _check(self) -> None:
        m = self.members
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise BackendError(f"backend.members={m!r} must be an integer >= 1 (models in the ensemble)")
        if self.weighting not in WEIGHTINGS:
            raise BackendError(f"backend.weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if not 0 < float(self.sample_fraction) <= 10:
            raise BackendError(f"backend.sample_fraction={self.sample_fraction!r} must be in (0, 10] "
                               "(bootstrap size as a fraction of the train split; 1.0 = classic bagging)")
        t = self.threads_per_member
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise BackendError(f"backend.threads_per_member={t!r} must be an integer >= 1 or null")
        for key, values in (("member_dropout", self.member_dropout), ("member_l2", self.member_l2)):
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in values if v is not None):
                raise BackendError(f"backend.{key}={values!r} must be a list of numbers >= 0 (or null entries)")

    def member_specs(self, seed: int) -> list[Member]:
        """Member i: dropout / l2 cycled from the config lists (a null entry keeps the model config's own)."""
        out = []
        for i in range(self.members):
            ov: dict[str, Any] = {"name": f"member{i}"}
            for key, values in (("dropout", self.member_dropout), ("l2", self.member_l2)):
                if values and values[i % len(values)] is not None:
                    ov[key] = float(values[i % len(values)])
            out.append(Member(i, int(seed) + i, ov))
        return out

    def _build(self, job: TrainJob, m: Member):
        try:
            return job.build_model(**m.overrides)
        except Exception as e:  # Hydra wraps the builder's TypeError in an InstantiationException
            bad = [k for k in m.overrides if k != "name" and f"keyword argument '{k}'" in str(e)]
            if bad:
                raise BackendError(f"backend.member_{bad[0]} is set but this model takes no `{bad[0]}` option; set "
                                   f"backend.member_{bad[0]}=null or use a model that has it (small_cnn has dropout "
                                   "and l2; dense and resnet50 have dropout only)") from None
            raise

    def threads(self, spark, parallel: int) -> int:
        """TensorFlow threads per task: the config's, else this machine's cores shared by the members that run
        at once (local mode), else the cores Spark gives each task (spark.task.cpus) on a cluster."""
        if self.threads_per_member:
            return int(self.threads_per_member)
        if is_local(spark):
            return max(1, task_slots(spark) // max(1, parallel))
        return max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))

    def fit(self, job: TrainJob) -> TrainResult:
        self._check()
        n, d = self.members, job.data
        if not d.sizes.get("train"):
            raise BackendError("backend=ensemble: the train split is empty; nothing to bootstrap")
        specs = self.member_specs(job.seed)
        models = [self._build(job, m) for m in specs]  # checks the overrides now; gets the weights later
        if job.spark is None:
            raise BackendError("backend=ensemble trains its members as Spark tasks and needs a SparkSession "
                               "(TrainJob.spark); use backend=single to train without Spark")
        slots = task_slots(job.spark)
        parallel = min(n, slots)
        if n > slots:
            log.warning("backend.members=%d but the cluster runs %d tasks at once: members queue, %d rounds", n,
                        slots, math.ceil(n / slots))
        threads = self.threads(job.spark, parallel)
        log.info("ensemble: %d members, %d at once, %d TensorFlow threads each, overrides %s", n, parallel, threads,
                 [m.overrides for m in specs])

        shipped = dataclasses.replace(job, spark=None)  # the session stays in the driver
        task = functools.partial(_train_members, shipped, threads, float(self.sample_fraction))
        sc = job.spark.sparkContext
        sc.setJobDescription(f"medspark ensemble: {n} bagged members")
        start = time.perf_counter()
        try:
            results = sc.parallelize(specs, n).mapPartitions(task).collect()
        finally:
            sc.setJobDescription(None)
        seconds = time.perf_counter() - start
        results.sort(key=lambda r: r["index"])
        if [r["index"] for r in results] != list(range(n)):
            raise RuntimeError(f"ensemble: expected members 0..{n - 1}, got {[r['index'] for r in results]}")

        for model, r in zip(models, results):
            model.set_weights(r["weights"])
        accs = [r["val_accuracy"] for r in results]
        weights = vote_weights(accs, self.weighting)
        ensemble = voting_model(models, weights, d.shape)
        # Left uncompiled: it is never trained, and a compiled copy would reload with a mismatched optimizer state.

        metrics: dict[str, float] = {}
        len_train = d.sizes["train"]  # a bootstrap of the whole split holds ~63% of its distinct rows
        for r, w in zip(results, weights):
            metrics[f"member_{r['index']}_val_accuracy"] = r["val_accuracy"]
            metrics[f"member_{r['index']}_weight"] = w
            metrics[f"member_{r['index']}_epochs"] = len(r["epoch_seconds"])
            metrics[f"member_{r['index']}_train_seconds"] = r["seconds"]
            metrics[f"member_{r['index']}_unique_fraction"] = r["unique_rows"] / max(1, len_train)
        labels = results[0]["val_labels"]
        if len(labels):  # the vote averages probabilities: class probabilities, or each finding's
            probs = sum(w * r["val_probs"] for r, w in zip(results, weights))
            metrics["ensemble_val_accuracy"] = accuracy(probs, labels, d.multilabel)
            metrics["member_val_accuracy_mean"] = float(np.mean(accs))
            if d.multilabel:
                metrics["ensemble_val_mean_auc"] = mean_auc(probs, labels)
        n_epochs = max(len(r["epoch_seconds"]) for r in results)
        epoch_seconds = [max(r["epoch_seconds"][e] for r in results if e < len(r["epoch_seconds"]))
                         for e in range(n_epochs)]
        params = {"members": n, "member_weights": [round(w, 4) for w in weights],
                  "member_dropouts": [m.overrides.get("dropout") for m in specs],
                  "member_l2": [m.overrides.get("l2") for m in specs], "sample_fraction": float(self.sample_fraction),
                  "weighting": self.weighting, "threads_per_member": threads,
                  "member_hosts": sorted({r["host"] for r in results})}
        log.info("ensemble: member val accuracies %s, vote weights %s, ensemble val accuracy %s", accs,
                 params["member_weights"], metrics.get("ensemble_val_accuracy"))
        return TrainResult(ensemble, combine_histories([r["history"] for r in results]), epoch_seconds, seconds,
                           sum(r["images_seen"] for r in results), workers=parallel,
                           global_batch_size=job.train.batch_size, params=params, metrics=metrics)


def _as_list(values) -> list:
    if values is None:
        return []
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [values]
    return list(values)


def combine_histories(histories: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-member Keras histories -> one: the mean of every metric at every epoch all members reached."""
    histories = [h for h in histories if h]
    if not histories:
        return {}
    keys = set.intersection(*(set(h) for h in histories))
    out = {}
    for k in sorted(keys):
        n = min(len(h[k]) for h in histories)
        out[k] = [float(sum(h[k][i] for h in histories) / len(histories)) for i in range(n)]
    return out


def vote_weights(accuracies: list[float], weighting: str = "accuracy") -> list[float]:
    """Soft-voting weights summing to 1: proportional to validation accuracy, or equal (also the fallback when no
    member has a usable accuracy, e.g. an empty val split)."""
    n = len(accuracies)
    acc = [a if a == a and a > 0 else 0.0 for a in accuracies]  # NaN (no val data) counts as 0
    if weighting == "equal" or not sum(acc):
        return [1.0 / n] * n
    total = sum(acc)
    return [a / total for a in acc]


def voting_model(members: list, weights: list[float], input_shape, name: str = "ensemble"):
    """input -> every member -> Rescaling(w_i) -> Add: the weighted average of the members' probabilities when the
    weights sum to 1. Members must have distinct names (the builders' `name` override)."""
    import keras

    if not members or len(members) != len(weights):
        raise ValueError(f"voting_model: {len(members)} members and {len(weights)} weights")
    inputs = keras.Input(shape=tuple(int(v) for v in input_shape), dtype="float32", name="image")
    votes = [keras.layers.Rescaling(float(w), name=f"vote{i}")(m(inputs))
             for i, (m, w) in enumerate(zip(members, weights))]
    outputs = votes[0] if len(votes) == 1 else keras.layers.Add(name="probs")(votes)
    return keras.Model(inputs, outputs, name=name)


def accuracy(probs: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """Accuracy as Keras reports it for the task: of the argmax class, or per finding at 0.5 (binary accuracy)."""
    return float(((probs >= 0.5) == (y >= 0.5)).mean() if multilabel else (probs.argmax(1) == y).mean())


def mean_auc(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean ROC-AUC over the findings that have positives and negatives in `y` (NaN when none has)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y[:, k], probs[:, k]) for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


# ---------------------------------------------------------------- executor side

def _train_members(job: TrainJob, threads: int, fraction: float, specs):
    """One Spark partition = one member (the partition holds its Member spec)."""
    for m in specs:
        yield _train_member(job, m, threads, fraction)


def bootstrap_dataset(images: np.ndarray, labels: np.ndarray, index: np.ndarray, batch_size: int, seed: int,
                      augment, threads: int):
    """tf.data over one bootstrap sample (row `index[j]` of the in-memory split), reshuffled every epoch, then the
    loader's own batch/cast/augment tail. Gathers by index: the split is held once, not copied."""
    import tensorflow as tf

    from ..data.loader import batches

    x, y = tf.constant(images), tf.constant(labels if labels.ndim > 1 else labels.astype(np.int32))  # multi-hot, int
    ds = tf.data.Dataset.from_tensor_slices(index.astype(np.int64))
    ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True).map(lambda i: (tf.gather(x, i),
                                                                                         tf.gather(y, i)))
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads  # tf.data's own pool shares the task's cores too
    return batches(ds, batch_size, augment, seed).with_options(opts)


def _train_member(job: TrainJob, m: Member, threads: int, fraction: float) -> dict:
    import socket

    limit_threads(threads, threads)  # before TensorFlow starts in this Python worker (a reused one keeps its pools)
    import keras

    keras.backend.clear_session()  # Spark reuses Python workers: start from a clean Keras state
    d, bs, epochs = job.data, job.train.batch_size, job.train.epochs
    images, labels = job.arrays("train")  # this executor reads Petastorm itself
    rng = np.random.default_rng([int(job.seed), m.index])
    index = rng.integers(0, len(labels), max(1, round(fraction * len(labels))))  # with replacement
    ds = bootstrap_dataset(images, labels, index, bs, m.seed, job.train.augment, threads)
    del images
    xv, yv = job.arrays("val")
    xv = xv.astype("float32")

    class Progress(keras.callbacks.Callback):  # one line per epoch, tagged with the member (tasks interleave)
        def on_epoch_end(self, epoch, logs=None):
            if job.train.verbose:
                vals = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items())
                                if isinstance(v, (int, float)))
                print(f"[ensemble member {m.index}] epoch {epoch + 1}/{epochs} {vals}", flush=True)

    result = keras_fit.fit(job, ds, (xv, yv) if len(yv) else None, batch_size=bs, validation_batch_size=bs,
                           images_per_epoch=len(index), seed=m.seed, model_overrides=m.overrides,
                           extra_callbacks=(Progress(),), verbose=0)  # the dataset reshuffles
    if len(yv):
        probs = result.model.predict(xv, batch_size=bs, verbose=0).astype("float32")
        acc = accuracy(probs, yv, d.multilabel)
    else:
        probs, acc = np.zeros((0, 0), "float32"), float("nan")
    return {"index": m.index, "weights": [np.asarray(w) for w in result.model.get_weights()], "val_accuracy": acc,
            "val_probs": probs, "val_labels": yv, "history": result.history, "epoch_seconds": result.epoch_seconds,
            "images_seen": result.images_seen, "seconds": result.train_seconds, "threads": threads,
            "unique_rows": int(len(np.unique(index))), "host": socket.gethostname()}
