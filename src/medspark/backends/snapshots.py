"""Snapshot ensembles (Huang et al. 2017, "Train 1, get M for free"): `train.snapshots` = N >= 2.

The cosine schedule restarts N times (schedule.snapshot_ends: where each cycle ends), so training visits N minima;
`Keeper`, a Keras callback keras_fit.fit adds, copies the weights at the end of every cycle, and `vote` turns the
fitted network into the soft vote of those N networks (ensemble.voting_model, equal weights): an ensemble for the
training cost of one model, N times its inference cost. A run stopped before its last cycle votes with the cycles
it finished plus its last weights.

With a resume checkpoint (train.resume, resume.Checkpoint) every snapshot is also written to the checkpoint folder
as `snapshot-<k>.npz` before the epoch's backup, so a resumed run votes with the snapshots taken before it was killed;
the folder, and they, go when fit ends normally. Backends whose result is the fitted network's weights shipped
elsewhere (spark_barrier, ensemble members, Elephas) do not take snapshots (`supports_snapshots`).
"""
from __future__ import annotations

import logging

import numpy as np

from . import schedule

log = logging.getLogger(__name__)


def check(train, backend) -> None:
    """train.snapshots on a backend that cannot vote with them: one line, before Spark starts."""
    from ..config import ConfigError

    n = int(getattr(train, "snapshots", 0) or 0)
    if n >= 2 and not getattr(backend, "supports_snapshots", False):
        raise ConfigError(f"train.snapshots={n} but backend={backend.name} ships the fitted network's weights, not a "
                          "vote (backends that take snapshots: single, mirrored); drop train.snapshots or use one "
                          "of those")


def keeper(job):
    """The callback for this job, or None when train.snapshots is off."""
    ends = schedule.snapshot_ends(job.train)
    return _keeper_class()(ends, job.checkpoint) if ends else None


def _keeper_class():
    import keras

    class Keeper(keras.callbacks.Callback):
        """Keeps the weights at the end of each cycle (`ends`: completed-epoch counts); `vote(model)` after fit."""

        def __init__(self, ends: list[int], checkpoint=None):
            super().__init__()
            self.ends, self.checkpoint = list(ends), checkpoint
            self.taken: dict[int, list[np.ndarray]] = {}  # cycle end -> weights
            self.done, self.started = 0, False

        def on_epoch_begin(self, epoch, logs=None):
            if not self.started:  # the first epoch of this fit: a resumed one starts after epoch 0
                self.started = True
                self.done = epoch
                for end in (e for e in self.ends if e <= epoch):
                    weights = _load(self.checkpoint, end)
                    if weights is None:
                        log.warning("train.snapshots: the snapshot of epoch %d is not in the checkpoint; the vote "
                                    "goes without it", end)
                    else:
                        self.taken[end] = weights

        def on_epoch_end(self, epoch, logs=None):
            self.done = epoch + 1
            if self.done in self.ends:
                self.taken[self.done] = [np.array(w) for w in self.model.get_weights()]
                _save(self.checkpoint, self.done, self.taken[self.done])
                log.info("train.snapshots: snapshot %d of %d taken after epoch %d", len(self.taken), len(self.ends),
                         self.done)

        def vote(self, model, build):
            """The soft vote of the snapshots (plus the last weights when training stopped between cycle ends);
            `build(name=...)` makes a fresh network of the same architecture. One snapshot: the model itself."""
            members = [self.taken[e] for e in sorted(self.taken)]
            if self.done not in self.taken:
                members.append([np.array(w) for w in model.get_weights()])
            if len(members) == 1:
                model.set_weights(members[0])
                return model
            from .ensemble import voting_model

            nets = []
            for k, weights in enumerate(members):
                net = build(name=f"{model.name}_snapshot{k + 1}")
                net.set_weights(weights)
                nets.append(net)
            return voting_model(nets, [1.0 / len(nets)] * len(nets), model.input_shape[1:],
                                name=f"{model.name}_snapshots")

    return Keeper


def _name(end: int) -> str:
    return f"snapshot-{end}.npz"


def _save(checkpoint, end: int, weights) -> None:
    """The snapshot of cycle end `end` into the resume checkpoint (arrays, never a pickle: api.dump_result)."""
    if checkpoint is not None:
        from .api import dump_result

        checkpoint.put(_name(end), dump_result({"weights": weights}))


def _load(checkpoint, end: int) -> list[np.ndarray] | None:
    """A snapshot `_save` wrote, or None (no checkpoint, absent or torn: the vote goes without it, warned)."""
    blob = checkpoint.get(_name(end)) if checkpoint is not None else None
    if blob is None:
        return None
    from .api import load_result

    try:
        return load_result(blob)["weights"]
    except Exception:  # torn
        return None
