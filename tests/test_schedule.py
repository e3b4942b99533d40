"""train.lr_schedule is defined once (medspark.backends.schedule): the model.fit callback and elephas_sync's own
epoch loop get the same rates, and the plateau rule is Keras' ReduceLROnPlateau(factor=0.5, patience=2)."""
import math

import pytest
from omegaconf import OmegaConf

from medspark.backends import schedule

# val_loss per epoch: improves, stalls twice (cut), improves by less than min_delta twice (cut), improves, ...
VAL_LOSS = [1.0, 0.8, 0.85, 0.9, 0.79995, 0.79999, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]


def train_cfg(kind, **extra):
    return OmegaConf.create({"lr": 1e-3, "epochs": len(VAL_LOSS), "lr_schedule": kind, **extra})


def keras_model(lr=1e-3):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    return model


def drive(callback, model, losses):
    """The rate every epoch trained with, as model.fit would call the callback."""
    import keras

    callback.set_model(model)
    callback.on_train_begin()
    rates = []
    for epoch, loss in enumerate(losses):
        callback.on_epoch_begin(epoch)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": loss})
    return rates


def test_cosine_is_the_formula():
    s = schedule.LrSchedule(train_cfg("cosine"))
    rates = [s.lr_for(e) for e in range(len(VAL_LOSS))]
    assert rates[0] == pytest.approx(1e-3)
    assert rates == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * e / len(VAL_LOSS))) for e in range(len(VAL_LOSS))])


def test_plateau_matches_keras_reduce_lr_on_plateau():
    import keras

    reference = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6)
    expected = drive(reference, keras_model(), VAL_LOSS)
    assert expected[4] == pytest.approx(5e-4) and expected[6] == pytest.approx(2.5e-4), "the sequence cuts twice"
    [ours] = schedule.keras_callbacks(train_cfg("plateau"))
    assert drive(ours, keras_model(), VAL_LOSS) == pytest.approx(expected)

    loop = schedule.LrSchedule(train_cfg("plateau"))  # elephas_sync's loop: lr_for at the start, end_epoch at the end
    rates = []
    for epoch, loss in enumerate(VAL_LOSS):
        rates.append(loop.lr_for(epoch))
        loop.end_epoch({"val_loss": loss})
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["cosine", "none"])
def test_fit_callback_and_epoch_loop_agree(kind):
    callbacks = schedule.keras_callbacks(train_cfg(kind))
    model = keras_model()
    rates = drive(callbacks[0], model, VAL_LOSS) if callbacks else [1e-3] * len(VAL_LOSS)
    loop = schedule.LrSchedule(train_cfg(kind))
    assert [loop.lr_for(e) for e in range(len(VAL_LOSS))] == pytest.approx(rates)


@pytest.mark.parametrize("kind", ["cosine", "none", "plateau"])
def test_warmup_rises_linearly_then_the_schedule_runs_over_the_epochs_left(kind):
    epochs, w = len(VAL_LOSS), 3
    [cb] = schedule.keras_callbacks(train_cfg(kind, warmup_epochs=w))
    rates = drive(cb, keras_model(), VAL_LOSS)
    assert rates[:w] == pytest.approx([1e-3 * (e + 1) / (w + 1) for e in range(w)])
    assert rates[w] == pytest.approx(1e-3)  # the full rate once warm
    if kind == "cosine":
        assert rates[w:] == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * e / (epochs - w))) for e in range(epochs - w)])
    if kind == "none":
        assert rates[w:] == pytest.approx([1e-3] * (epochs - w))
    if kind == "plateau":  # the warm-up epochs are not judged: the first cut comes 2 stalls after warm-up
        assert rates[w] == rates[w + 1] == pytest.approx(1e-3) and min(rates[w:]) < 1e-3
    loop = schedule.LrSchedule(train_cfg(kind, warmup_epochs=w))  # elephas_sync's loop follows the same rates
    got = []
    for epoch, loss in enumerate(VAL_LOSS):
        got.append(loop.lr_for(epoch))
        loop.end_epoch({"val_loss": loss})
    assert got == pytest.approx(rates)


def test_the_rate_is_logged_and_a_wrong_kind_names_the_key():
    [cb] = schedule.keras_callbacks(train_cfg("cosine"))
    cb.set_model(keras_model())
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    logs = {"val_loss": 1.0}
    cb.on_epoch_end(0, logs)
    assert logs["learning_rate"] == pytest.approx(1e-3), "history/MLflow get epoch_learning_rate"
    with pytest.raises(ValueError, match="train.lr_schedule='step' must be one of none, plateau, cosine"):
        schedule.keras_callbacks(train_cfg("step"))


def test_early_stopping_of_the_epoch_loop_keeps_the_best():
    loop = schedule.EarlyStop(train_cfg("none", early_stopping={"monitor": "val_loss", "patience": 2}))
    for epoch, value in enumerate([1.0, 0.7, 0.8, 0.9, 0.5]):
        if loop.end_epoch(epoch, {"val_loss": value}, weights=f"w{epoch}"):
            break
    assert epoch == 3 and loop.best_epoch == 1 and loop.best_weights == "w1"


@pytest.mark.parametrize("monitor,mode,values", [
    ("val_accuracy", "auto", [0.5, 0.7, 0.6, 0.65, 0.9]),  # higher is better: stops at epoch 3, best epoch 1
    ("val_loss", "auto", [1.0, 0.7, 0.8, 0.9, 0.5]),
    ("val_loss", "max", [0.5, 0.7, 0.6, 0.65, 0.9]),  # an explicit mode wins over the name
])
def test_epoch_loop_and_keras_early_stopping_stop_at_the_same_epoch(monitor, mode, values):
    import keras

    train = train_cfg("none", early_stopping={"monitor": monitor, "patience": 2, "mode": mode})
    [keras_es] = schedule.keras_callbacks(train)  # what model.fit backends get
    model = keras_model()
    keras_es.set_model(model)
    keras_es.on_train_begin()
    stopped_keras = None
    for epoch, value in enumerate(values):
        keras_es.on_epoch_end(epoch, {monitor: value})
        if model.stop_training:
            stopped_keras = epoch
            break
    loop = schedule.EarlyStop(train)  # what elephas_sync's loop uses
    stopped_loop = next((e for e, v in enumerate(values) if loop.end_epoch(e, {monitor: v}, weights=e)), None)
    assert stopped_loop == stopped_keras == 3 and loop.best_epoch == 1
    assert isinstance(keras_es, keras.callbacks.EarlyStopping)
