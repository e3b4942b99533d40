"""Losses Keras does not ship: binary cross-entropy with a positive weight per finding (multilabel, class_weight).

Keras weighs a whole sample (`class_weight`, `sample_weight`), never one output of it, and its BinaryCrossentropy
has no per-output positive weight (torch's `pos_weight`). Registered as `medspark>PositiveWeightedBCE`: a model
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

    def __init__(self, pos_weight, name: str = "positive_weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]

    def call(self, y_true, y_pred):
        eps = keras.backend.epsilon()
        p = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        y = ops.cast(y_true, "float32")
        w = ops.convert_to_tensor(self.pos_weight, "float32")
        return -ops.mean(w * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}
