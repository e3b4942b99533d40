"""The learning-rate schedule and early stopping of the `train` config, defined once for every backend.

`model.fit` loops (single, mirrored, spark_barrier, ensemble) get them as Keras callbacks (`keras_callbacks`,
called by keras_fit.callbacks); loops that are not `model.fit` (elephas_sync's epoch loop) drive `LrSchedule`
and `EarlyStop` themselves. Both compute every decision with the same code. Rates (`train.lr_schedule`):
- `none`: train.lr throughout;
- `cosine`: 0.5 * lr * (1 + cos(pi * epoch / epochs)), set at the start of each epoch (0-based);
- with `train.warmup_epochs` = w > 0 the first w epochs train at lr * (epoch + 1) / (w + 1), and the schedule then
  runs over the epochs left (cosine: from lr at epoch w to 0 at the end; none and plateau: from lr);
- `cosine` with `train.snapshots` = N >= 2 (snapshot ensembles, Huang et al. 2017): the epochs after the warm-up
  are N cycles (`snapshot_ends`; lengths differ by at most one), each a cosine from lr towards 0; keras_fit keeps
  the weights at every cycle's end and returns their soft vote;
- `plateau`: the rule of keras ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6,
  min_delta=1e-4): after 2 epochs in a row without val_loss improving on its best by more than 1e-4, halve
  the rate (not below 1e-6) and start counting again.
Early stopping (`train.early_stopping`): stop after `patience` epochs in a row in which `monitor` did not improve
on its best (`mode`: min, max, or auto = `direction(monitor)`), and restore the best epoch's weights.
Pure Python (no TensorFlow import), so it is cheap to test and to ship to executors.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
KINDS = ("none", "plateau", "cosine")
PLATEAU_MONITOR, PLATEAU_FACTOR, PLATEAU_PATIENCE, PLATEAU_MIN_LR, PLATEAU_MIN_DELTA = "val_loss", 0.5, 2, 1e-6, 1e-4


def cosine_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Cosine decay from base_lr at epoch 0 towards 0 at `epochs`."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))


def snapshot_ends(train) -> list[int]:
    """train.snapshots >= 2: the completed-epoch counts at which the cosine cycles end (the last is train.epochs);
    [] when off."""
    n = int(_get(train, "snapshots", 0) or 0)
    if n < 2:
        return []
    warmup, epochs = int(_get(train, "warmup_epochs", 0) or 0), int(_get(train, "epochs"))
    return [warmup + round(k * (epochs - warmup) / n) for k in range(1, n + 1)]


MAX_KEYS = ("acc", "auc", "f1", "precision", "recall", "ap")  # metrics where higher is better


def _get(cfg, key, default=None):
    """A setting from a TrainConfig, a DictConfig or a dict."""
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def direction(monitor: str, mode: str = "auto") -> str:
    """'max' or 'min': what counts as better for `monitor` (auto: max for accuracy/AUC/F1-like keys)."""
    if mode in ("min", "max"):
        return mode
    name = monitor.lower().removeprefix("val_")
    return "max" if any(k in name.split("_") or name.startswith(k) for k in MAX_KEYS) else "min"


class EarlyStop:
    """Keras EarlyStopping(restore_best_weights=True, min_delta=0) as plain Python, for epoch loops that are not
    model.fit; keras_fit builds the Keras callback from the same `monitor`, `patience` and `direction`."""

    def __init__(self, train):
        es = _get(train, "early_stopping") or {}
        self.monitor, self.patience = _get(es, "monitor", "val_loss"), int(_get(es, "patience") or 0)
        self.mode = direction(self.monitor, _get(es, "mode", "auto") or "auto")
        self.best, self.best_epoch, self.best_weights = None, -1, None

    def better(self, value, best) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)

    def end_epoch(self, epoch: int, logs: dict, weights) -> bool:
        """Record the epoch; True when training should stop (no improvement for `patience` epochs)."""
        value = logs.get(self.monitor)
        if value is not None and self.better(value, self.best):
            self.best, self.best_epoch, self.best_weights = value, epoch, weights
        return bool(self.patience) and epoch - self.best_epoch >= self.patience


def kind_of(train) -> str:
    kind = _get(train, "lr_schedule", "none") or "none"
    if kind not in KINDS:
        raise ValueError(f"train.lr_schedule={kind!r} must be one of {', '.join(KINDS)}")
    return kind


class LrSchedule:
    """The rate for every epoch: `lr_for(epoch)` at its start, `end_epoch(logs)` at its end (plateau needs
    the epoch's val_loss). `lr` is the rate the current epoch trains with."""

    def __init__(self, train):
        self.kind, self.base_lr, self.epochs = kind_of(train), float(_get(train, "lr")), int(_get(train, "epochs"))
        self.warmup = int(_get(train, "warmup_epochs", 0) or 0)
        self.cycles = [self.warmup, *(snapshot_ends(train) or [self.epochs])]  # cosine cycles' bounds: one, or N
        self.lr, self.best, self.wait, self.epoch = self.base_lr, None, 0, 0
        if self.warmup:
            self.lr = self.lr_for(0)

    def lr_for(self, epoch: int) -> float:
        self.epoch = epoch
        if epoch < self.warmup:
            self.lr = self.base_lr * (epoch + 1) / (self.warmup + 1)
        elif self.kind == "cosine":  # over the cycle this epoch is in (the last one runs on past train.epochs)
            start, end = next((a, b) for a, b in zip(self.cycles, self.cycles[1:]) if epoch < b or b == self.epochs)
            self.lr = cosine_lr(epoch - start, self.base_lr, end - start)
        elif epoch == self.warmup and self.warmup:
            self.lr = self.base_lr
        return self.lr

    def warmup_pending(self) -> bool:
        """Still warming up (plateau does not judge the warm-up epochs)."""
        return self.epoch < self.warmup

    def end_epoch(self, logs: dict) -> float:
        """Record the finished epoch; returns the rate the next epoch starts with (plateau may cut it)."""
        if self.kind != "plateau" or self.warmup_pending():
            return self.lr
        value = logs.get(PLATEAU_MONITOR)
        if value is None:
            log.warning("lr_schedule=plateau: no %s in this epoch's logs (%s); rate unchanged", PLATEAU_MONITOR,
                        ", ".join(logs))
            return self.lr
        if self.best is None or value < self.best - PLATEAU_MIN_DELTA:
            self.best, self.wait = float(value), 0
        else:
            self.wait += 1
            if self.wait >= PLATEAU_PATIENCE and self.lr > PLATEAU_MIN_LR:
                self.lr, self.wait = max(self.lr * PLATEAU_FACTOR, PLATEAU_MIN_LR), 0
                log.info("lr_schedule=plateau: %s did not improve for %d epochs, learning rate now %g",
                         PLATEAU_MONITOR, PLATEAU_PATIENCE, self.lr)
        return self.lr


def keras_callbacks(train) -> list:
    """Keras callbacks for model.fit: EarlyStopping (when patience > 0; restores the best weights) and one that
    applies LrSchedule (not for `none`). Like Keras' own schedule callbacks, the latter records the rate each
    epoch trained with as logs["learning_rate"] (history, MLflow)."""
    import keras

    out = []
    stop = EarlyStop(train)
    if stop.patience:
        out.append(keras.callbacks.EarlyStopping(monitor=stop.monitor, patience=stop.patience, mode=stop.mode,
                                                 restore_best_weights=True, verbose=1))
    if kind_of(train) == "none" and not int(_get(train, "warmup_epochs", 0) or 0):
        return out

    class ScheduleCallback(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.schedule = LrSchedule(train)

        def on_train_begin(self, logs=None):
            self.schedule = LrSchedule(train)  # fresh state for every fit

        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = self.schedule.lr_for(epoch)

        def on_epoch_end(self, epoch, logs=None):
            logs = {} if logs is None else logs
            logs["learning_rate"] = self.schedule.lr
            self.schedule.end_epoch(logs)

    return out + [ScheduleCallback()]
