"""Losses Keras does not ship: binary cross-entropy with a positive weight per finding (multilabel, class_weight),
and sparse categorical cross-entropy with label smoothing (train.label_smoothing on integer class labels).

Keras weighs a whole sample (`class_weight`, `sample_weight`), never one output of it, and its BinaryCrossentropy
has no per-output positive weight (torch's `pos_weight`); its SparseCategoricalCrossentropy has no label smoothing
(only the one-hot CategoricalCrossentropy does). Registered as `medspark>...`: a model
compiled with it reloads with its compile state wherever medspark is importable; the logged models are saved
uncompiled (tracking.log_model), so serving needs nothing of this.
"""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medspark")
class PositiveWeightedBCE(keras.losses.Loss):
    """mean over findings of -(w_k y log p + (1 - y) log(1 - p)): a finding's positives weigh w_k (e.g.
    negatives / positives in the training split), its negatives 1."""

    def __init__(self, pos_weight, label_smoothing: float = 0.0, name: str = "positive_weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        eps = keras.backend.epsilon()
        p = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        y = ops.cast(y_true, "float32") * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing  # as Keras' BCE
        w = ops.convert_to_tensor(self.pos_weight, "float32")
        return -ops.mean(w * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight, "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="medspark")
class SmoothedSparseCE(keras.losses.Loss):
    """Cross-entropy of integer class labels against targets (1 - e) on the class + e / K on every class (what
    CategoricalCrossentropy(label_smoothing=e) does with one-hot labels): (1 - e) * -log p_y + e * mean_k(-log p_k)."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        eps = keras.backend.epsilon()
        logp = ops.log(ops.clip(ops.cast(y_pred, "float32"), eps, 1.0))
        y = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        nll = -ops.take_along_axis(logp, ops.expand_dims(y, -1), axis=-1)[:, 0]
        return (1.0 - self.label_smoothing) * nll - self.label_smoothing * ops.mean(logp, axis=-1)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
