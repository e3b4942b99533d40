"""train.augment (medspark.data.loader.augment_layer): the geometric settings move the anatomy, the training batches
are augmented and val/test batches never are."""
import numpy as np
import pytest

from medspark.config import Augment
from medspark.data.loader import augment_layer, batches

OFF = dict(flip=False, rotation=0.0, brightness=0.0, contrast=0.0)


def square_batch(n=16, size=64):
    """n images of a bright 24 px square in the middle of a black field (an organ on a dark background)."""
    x = np.zeros((n, size, size, 1), "float32")
    x[:, 20:44, 20:44] = 255.0
    return x


def areas_and_centres(x):
    bright = x[..., 0] > 127
    area = bright.sum(axis=(1, 2))
    ys, xs = np.indices(bright.shape[1:])
    centre = np.stack([(bright * ys).sum((1, 2)) / area, (bright * xs).sum((1, 2)) / area], 1)
    return area, centre


def test_zoom_crops_in_and_shrinks_out_about_the_centre():
    x = square_batch()
    out = np.asarray(augment_layer(Augment(**OFF, zoom=0.3), seed=1)(x, training=True))
    area, centre = areas_and_centres(out)
    assert out.shape == x.shape
    assert (area > 24 * 24 * 1.1).any() and (area < 24 * 24 * 0.9).any()  # a crop (in) and a wider view (out)
    assert np.allclose(centre, 31.5, atol=2)  # about the centre: the anatomy stays in frame


def test_translate_moves_the_anatomy_without_resizing_it():
    x = square_batch()
    out = np.asarray(augment_layer(Augment(**OFF, translate=0.2), seed=2)(x, training=True))
    area, centre = areas_and_centres(out)
    moved = np.abs(centre - 31.5).max(axis=1)
    assert (moved > 2).sum() >= 8 and moved.max() <= 0.2 * 64 + 1  # most moved, none beyond 20% of the side
    assert np.allclose(area[moved < 64 * 0.2 - 12], 24 * 24, rtol=0.1)  # fully in frame: the same size


@pytest.mark.parametrize("training", [True, False])
def test_only_training_batches_are_augmented(training):
    import tensorflow as tf

    x = square_batch(8)
    ds = tf.data.Dataset.from_tensor_slices((x.astype("uint8"), np.zeros(8, "int32")))
    aug = Augment(**OFF, zoom=0.3, translate=0.2)
    got = np.concatenate([b for b, _ in batches(ds, 4, aug if training else None, seed=0).as_numpy_iterator()])
    assert Augment(**OFF).active is False and aug.active
    assert np.array_equal(got, x) is not training
