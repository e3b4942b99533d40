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


def test_mix_blends_images_and_targets_by_one_weight():
    import tensorflow as tf

    from medspark.data.loader import mix

    x = np.random.default_rng(0).uniform(0, 255, (32, 8, 8, 1)).astype("float32")
    y = np.eye(32, dtype="float32")  # every image its own class: a mixed row names the partner and the weight
    xm, ym = (np.asarray(t) for t in mix(tf.constant(x), tf.constant(y), 0.4, seed=3))
    np.testing.assert_allclose(ym.sum(1), 1, rtol=1e-6)  # still a distribution over the classes
    lam = np.diag(ym).copy()
    others = ym - np.diag(lam)
    partner = np.where(others.max(1) > 0, others.argmax(1), np.arange(32))  # itself: left as it was
    mixed = partner != np.arange(32)
    assert mixed.sum() >= 16 and np.allclose(lam[mixed], lam[mixed][0])  # one weight for the whole batch
    for i, j in enumerate(partner):  # the image is blended with the partner its target names, by the same weight
        np.testing.assert_allclose(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[j], rtol=1e-4, atol=1e-2)


@pytest.mark.slow
def test_mixup_trains_on_mixed_one_hot_batches_and_learns(spark, tmp_path):
    from conftest import make_cfg
    from medspark.backends import build
    from medspark.backends.api import TrainJob
    from medspark.data.loader import read_arrays
    from medspark.data.sources import list_dataset
    from medspark.pipeline import _materialize

    cfg = make_cfg(tmp_path, ["dataset.generate.per_class=100", "dataset.generate.size=64",
                              "preprocess.image_size=64", "train.epochs=8", "train.batch_size=16", "train.mixup=0.4",
                              "train.verbose=0", "train.early_stopping.patience=0"])
    data = _materialize(cfg, spark, list_dataset(cfg.dataset))
    job = TrainJob.from_config(cfg, data)
    _, y = next(iter(job.dataset("train", True, 16)))
    _, y_val = next(iter(job.dataset("val", False, 16)))
    assert y.shape == (16, 4) and np.allclose(np.sum(y, 1), 1) and not np.isin(np.asarray(y), [0, 1]).all()
    assert np.isin(np.asarray(y_val), [0, 1]).all() and np.allclose(np.sum(y_val, 1), 1)  # val: one-hot, unmixed
    result = build(cfg.backend).fit(job)
    images, labels = read_arrays(data.split_url("test"))
    accuracy = float((result.model.predict(images.astype("float32"), verbose=0).argmax(1) == labels).mean())
    assert accuracy >= 0.6, f"4 classes (chance 0.25), mixup 0.4, 8 epochs: test accuracy {accuracy:.3f}"
    assert {"accuracy", "val_accuracy"} <= set(result.history)


def test_backends_that_do_not_mix_refuse_mixup(cfg_factory):
    from medspark.config import ConfigError
    from medspark.train import train

    cfg = cfg_factory("train.mixup=0.2", "backend=elephas_sync")
    with pytest.raises(ConfigError, match="train.mixup=0.2 but backend=elephas_sync does not mix its batches"):
        train(cfg)
