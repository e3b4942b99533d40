"""Snapshot ensembles (train.snapshots, backends/snapshots.py): the cosine schedule restarts at every cycle, the fit
path returns the soft vote of the cycles' last weights (its probabilities are the members' mean), a resumed fit votes
with the snapshots written before the interruption, and settings that cannot work are one line before Spark."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from medspark.backends import build, keras_fit, schedule, snapshots
from medspark.backends.api import TrainJob
from medspark.config import ConfigError, TrainConfig, config_dir
from medspark.data.materialize import Materialized
from medspark.models import small_cnn


def train_cfg(**kw):
    cfg = OmegaConf.load(f"{config_dir()}/config.yaml").train
    cfg.update({"verbose": 0, "lr_schedule": "cosine", **kw})
    cfg.early_stopping.patience = 0
    return TrainConfig.from_cfg(cfg)


def test_cycles_restart_the_cosine_and_end_where_snapshots_are_taken():
    t = train_cfg(epochs=10, warmup_epochs=1, snapshots=3, lr=1.0)
    assert schedule.snapshot_ends(t) == [4, 7, 10]
    s = schedule.LrSchedule(t)
    rates = [s.lr_for(e) for e in range(10)]
    assert rates[0] == 0.5  # warm-up
    for start in (1, 4, 7):  # each cycle: lr, then the cosine of a 3-epoch cycle
        assert rates[start:start + 3] == pytest.approx([1.0, 0.75, 0.25])
    assert schedule.snapshot_ends(train_cfg(epochs=10)) == []  # off: one plain cosine
    assert schedule.snapshot_ends(train_cfg(epochs=7, snapshots=2)) == [4, 7]  # lengths differ by at most one


@pytest.mark.parametrize("overrides, message", [
    ({"lr_schedule": "plateau"}, "set train.lr_schedule=cosine"),
    ({"early_stopping": {"patience": 3}}, "set train.early_stopping.patience=0"),
    ({"epochs": 2}, "needs at least one epoch per cycle"),
    ({"ema": 0.99}, "set one of them to 0"),
])
def test_settings_that_cannot_work_are_one_line(overrides, message):
    cfg = OmegaConf.load(f"{config_dir()}/config.yaml").train
    cfg.update({"epochs": 8, "lr_schedule": "cosine", "snapshots": 3})
    cfg.early_stopping.patience = 0
    cfg.merge_with(overrides)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_cfg(cfg)


def test_backends_that_ship_weights_refuse_snapshots():
    t = train_cfg(epochs=4, snapshots=2)
    snapshots.check(t, build(OmegaConf.create({"name": "single", "_target_": "medspark.backends.single.Single"})))
    for name in ("ensemble", "spark_barrier", "elephas_sync"):
        backend = build(OmegaConf.load(f"{config_dir()}/backend/{name}.yaml"))
        with pytest.raises(ConfigError, match=f"backend={name} ships the fitted network's weights"):
            snapshots.check(t, backend)


def tiny_job(train, checkpoint=None):
    data = Materialized(url="file:///unused", fingerprint="0" * 16, classes=["a", "b"], shape=(16, 16, 1),
                        sizes={"train": 16, "val": 0, "test": 0}, per_class={}, listed=16, accepted=16, rejected=[],
                        duplicate_groups=0, duplicate_files=0, label_conflicts=0, moved_to_test=0, seconds={})
    build_model = lambda **kw: small_cnn.build((16, 16, 1), 2, **{"filters": [4, 8], **kw})  # noqa: E731
    return TrainJob(data=data, build_model=build_model, train=train, checkpoint=checkpoint)


def tiny_data():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (16, 16, 16, 1)).astype("float32"), np.array([0, 1] * 8)
    return x, tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


class Snap(keras.callbacks.Callback):
    """What the network's weights were at the end of every epoch (to check the vote against)."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch + 1] = [np.array(w) for w in self.model.get_weights()]


def test_the_fit_path_returns_the_vote_of_the_cycles_last_weights():
    x, ds = tiny_data()
    job = tiny_job(train_cfg(epochs=4, snapshots=2, lr=3e-3))
    seen = Snap()
    result = keras_fit.fit(job, ds, batch_size=8, extra_callbacks=(seen,))
    members = [layer for layer in result.model.layers if isinstance(layer, keras.Model)]
    assert [m.name for m in members] == ["small_cnn_snapshot1", "small_cnn_snapshot2"]
    expected = []
    for end, member in zip((2, 4), members):
        for a, b in zip(member.get_weights(), seen.weights[end]):
            np.testing.assert_array_equal(a, b)  # the weights at the end of each cycle
        net = job.build_model()
        net.set_weights(seen.weights[end])
        expected.append(net.predict(x, verbose=0))
    np.testing.assert_allclose(result.model.predict(x, verbose=0), np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)
    assert result.history["learning_rate"] == pytest.approx([3e-3, 1.5e-3, 3e-3, 1.5e-3])  # the restart


def test_a_resumed_fit_votes_with_the_snapshots_written_before_it(tmp_path):
    """A fit killed after the first cycle (here: stopped there), then resumed from its checkpoint, votes with the
    first cycle's snapshot read back from the checkpoint folder and the second one it takes itself."""
    from medspark.resume import Checkpoint

    x, ds = tiny_data()
    train = train_cfg(epochs=4, snapshots=2, lr=3e-3)

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 3:
                raise KeyboardInterrupt  # a kill after epoch 3: its backup and the first snapshot are written

    first = Checkpoint(directory=str(tmp_path / "ckpt"), owner={"run_id": "r1"})
    seen = Snap()
    with pytest.raises(KeyboardInterrupt):
        keras_fit.fit(tiny_job(train, first), ds, batch_size=8, extra_callbacks=(seen, StopAfter()))
    assert (tmp_path / "ckpt" / "snapshot-2.npz").exists()

    again = Checkpoint(directory=str(tmp_path / "ckpt"), owner={"run_id": "r2"})
    result = keras_fit.fit(tiny_job(train, again), ds, batch_size=8)
    assert again.resumed_epochs == 3
    first_member = [layer for layer in result.model.layers if isinstance(layer, keras.Model)][0]
    for a, b in zip(first_member.get_weights(), seen.weights[2]):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "ckpt").exists(), "the checkpoint, snapshots included, goes when fit ends normally"
