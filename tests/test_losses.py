"""medspark's own losses (backends/losses.py) against the Keras losses they extend."""
import keras
import numpy as np
import pytest

from medspark.backends.losses import PositiveWeightedBCE, SmoothedSparseCE


def _probs(n, k, seed=0):
    z = np.random.default_rng(seed).normal(size=(n, k)).astype("float32")
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_sparse_ce_is_keras_categorical_ce_with_label_smoothing(eps):
    p, y = _probs(16, 4), np.arange(16) % 4
    ours = float(SmoothedSparseCE(eps)(y, p))
    reference = float(keras.losses.CategoricalCrossentropy(label_smoothing=eps)(np.eye(4)[y], p))
    assert ours == pytest.approx(reference, rel=1e-5)


def test_positive_weighted_bce_smooths_like_keras_bce():
    p = np.random.default_rng(1).uniform(0.05, 0.95, (8, 3)).astype("float32")
    y = (np.random.default_rng(2).uniform(size=(8, 3)) > 0.5).astype("float32")
    ours = float(PositiveWeightedBCE([1, 1, 1], label_smoothing=0.2)(y, p))
    assert ours == pytest.approx(float(keras.losses.BinaryCrossentropy(label_smoothing=0.2)(y, p)), rel=1e-4)
    assert PositiveWeightedBCE.from_config(PositiveWeightedBCE([2, 1], 0.1).get_config()).label_smoothing == 0.1
