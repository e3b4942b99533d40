"""Model builders: the contract (shapes, softmax, self-contained save/load), ResNet-50 options, and learning."""

import json

import keras
import numpy as np
import pytest

from medspark.models import dense, flops_per_image, param_count, res_cnn, resnet50, small_cnn

BUILDERS = {"small_cnn": small_cnn, "dense": dense, "resnet50": resnet50, "res_cnn": res_cnn}
SIZE = {"small_cnn": 32, "dense": 32, "resnet50": 32, "res_cnn": 32}  # small sizes keep the tests fast
NO_DOWNLOAD = {"resnet50": {"weights": None}}  # no internet here; the imagenet path is tested separately


def _build(name, channels=1, num_classes=3, **kw):
    s = SIZE[name]
    return BUILDERS[name].build((s, s, channels), num_classes, **{**NO_DOWNLOAD.get(name, {}), **kw})


def _images(n, size, channels, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype("float32")


@pytest.fixture(scope="module")
def resnet_gray():
    return _build("resnet50", channels=1, num_classes=3)


# --- the contract, for every builder -------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_probabilities(name, channels):
    model = _build(name, channels=channels, num_classes=3)
    assert model.name == name and model.input_shape == (None, SIZE[name], SIZE[name], channels)
    p = model.predict(_images(5, SIZE[name], channels), verbose=0)
    assert p.shape == (5, 3) and p.dtype == np.float32
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_no_lambda_layers_and_uncompiled(name):
    model = _build(name)
    layers = list(model.layers)
    if name == "resnet50":
        layers += _base(model).layers
    assert not any(isinstance(l, keras.layers.Lambda) for l in layers)
    assert not model.compiled


@pytest.mark.parametrize("name", ["small_cnn", "dense", "res_cnn", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_save_load_roundtrip(name, tmp_path):
    model = _build(name, channels=1)
    x = _images(4, SIZE[name], 1)
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # no custom_objects: everything is stock Keras
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert param_count(loaded) == param_count(model)  # trainable flags survive too
    # How models reach Spark workers: architecture JSON + weight arrays.
    rebuilt = keras.models.model_from_json(model.to_json())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_array_equal(rebuilt.predict(x, verbose=0), expected)


def test_hydra_instantiate_with_list_hparams():
    from omegaconf import OmegaConf
    from hydra.utils import instantiate

    for cfg in ({"_target_": "medspark.models.small_cnn.build", "name": "small_cnn", "filters": [8, 16], "l2": 1e-4},
                {"_target_": "medspark.models.dense.build", "name": "dense", "units": [16], "pool": 2}):
        model = instantiate(OmegaConf.create(cfg), input_shape=(32, 32, 1), num_classes=4)
        assert model.output_shape == (None, 4)
        json.loads(model.to_json())  # ListConfig values were converted to plain Python types
    assert len(model.get_layer("flatten").output.shape) == 2 and model.get_layer("flatten").output.shape[1] == 256


@pytest.mark.parametrize("name", BUILDERS)
def test_invalid_arguments_name_the_config_key(name):
    build = BUILDERS[name].build
    kw = NO_DOWNLOAD.get(name, {})
    with pytest.raises(ValueError, match="preprocess.channels"):
        build((64, 64, 2), 3, **kw)
    with pytest.raises(ValueError, match="preprocess.image_size"):
        build((2, 2, 1), 3, **kw)
    with pytest.raises(ValueError, match="num_classes"):
        build((64, 64, 1), 1, **kw)


def test_minimum_sizes():
    with pytest.raises(ValueError, match="at least 16x16"):
        small_cnn.build((15, 64, 1), 2)
    small_cnn.build((16, 16, 1), 2)
    with pytest.raises(ValueError, match="at least 32x32"):
        resnet50.build((31, 31, 3), 2, weights=None)
    with pytest.raises(ValueError, match="model.pool"):
        dense.build((3, 3, 1), 2, pool=4)


# --- small_cnn / dense specifics -----------------------------------------------------------------------------

def test_small_cnn_structure_and_l2():
    model = small_cnn.build((128, 128, 1), 4)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 256] and not any(c.use_bias for c in convs)
    assert model.get_layer("pool4").output.shape[1:3] == (8, 8)
    assert param_count(model)["total"] < 500_000  # CPU-sized
    assert not model.losses
    assert len(small_cnn.build((32, 32, 1), 2, l2=1e-4).losses) == 5  # 4 convs + classifier


def test_res_cnn_structure_and_cost():
    model = res_cnn.build((128, 128, 1), 4)
    assert model.get_layer("stem_conv").output.shape[1:3] == (64, 64)  # the cheap stride-2 stem
    assert model.get_layer("s4b1_out").output.shape[1:] == (4, 4, 288)
    assert [model.get_layer(f"s{s}b1_proj") for s in (1, 2, 3, 4)]  # strided stages: avg-pool + 1x1 shortcut
    assert param_count(model)["total"] < 500_000
    # an eighth of small_cnn's multiply-adds at the same input and a similar parameter count
    assert flops_per_image(model) * 6 < flops_per_image(small_cnn.build((128, 128, 1), 4))
    with pytest.raises(ValueError, match="model.filters .* model.blocks"):
        res_cnn.build((64, 64, 1), 4, filters=[8, 16], blocks=[1])
    with pytest.raises(ValueError, match="at least 32x32"):
        res_cnn.build((16, 16, 1), 4)


def test_flops_per_image_counts_each_kind_of_layer():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)                     # 8*8 * 3*3*2*4 = 4608
    x = keras.layers.SeparableConv2D(6, 3, strides=2, padding="same")(x)       # 4*4 * (3*3*4 + 4*6) = 960
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3)(x)                                             # 6*3 = 18
    assert flops_per_image(keras.Model(inputs, out)) == 4608 + 960 + 18


def test_dense_pooling_keeps_first_layer_small():
    model = dense.build((128, 128, 1), 4)
    assert model.get_layer("dense1").kernel.shape == (32 * 32, 256)
    assert dense.build((32, 32, 1), 4, pool=1).get_layer("dense1").kernel.shape == (1024, 256)


@pytest.mark.parametrize("builder", [small_cnn, res_cnn])
def test_cnns_learn_bright_vs_dark(builder):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def data(n):
        y = np.arange(n) % 2
        x = rng.uniform(0, 100, (n, 32, 32, 1)) + 130 * y[:, None, None, None]  # dark [0,100] vs bright [130,230]
        return x.astype("float32"), y

    x, y = data(128)
    model = builder.build((32, 32, 1), 2)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=8, shuffle=True, verbose=0)
    xt, yt = data(64)
    # Inference mode (BN moving statistics, no dropout) on unseen images.
    assert (model.predict(xt, verbose=0).argmax(axis=1) == yt).mean() >= 0.95


# --- resnet50 specifics --------------------------------------------------------------------------------------

def _base(model):
    return model.get_layer(resnet50.BASE_LAYER)


def test_resnet_preprocess_is_caffe(resnet_gray):
    from keras.applications.resnet50 import preprocess_input

    rgb = _images(3, 32, 3, seed=1)
    model_rgb = resnet50.build((32, 32, 3), 3, weights=None)
    prep = model_rgb.get_layer(resnet50.PREPROCESS_LAYER)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(prep(rgb)), preprocess_input(rgb.copy()), atol=1e-4)

    gray = _images(3, 32, 1, seed=2)
    prep = resnet_gray.get_layer(resnet50.PREPROCESS_LAYER)
    expected = preprocess_input(np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(prep(gray)), expected, atol=1e-4)
    assert not prep.trainable and not prep.trainable_weights


def test_resnet_frozen_base_trains_head_only(resnet_gray):
    head = [resnet_gray.get_layer("head"), resnet_gray.get_layer("probs")]
    assert not _base(resnet_gray).trainable
    assert {id(w) for w in resnet_gray.trainable_weights} == {id(w) for l in head for w in l.weights}
    assert param_count(resnet_gray)["trainable"] == (2048 * 128 + 128) + (128 * 3 + 3)


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def test_resnet_trainable_layers_unfreezes_last_n():
    n = 7
    model = resnet50.build((32, 32, 3), 2, weights=None, trainable_layers=n, freeze_bn=False)
    layers = _base(model).layers
    assert [l.trainable for l in layers] == [False] * (len(layers) - n) + [True] * n
    expected = {id(w) for l in layers[-n:] for w in l.trainable_weights}
    expected |= {id(w) for name in ("head", "probs") for w in model.get_layer(name).weights}
    assert {id(w) for w in model.trainable_weights} == expected
    assert not model.get_layer(resnet50.PREPROCESS_LAYER).trainable_weights

    # Default freeze_bn=True: the same N layers, minus BatchNormalization ones.
    default = resnet50.build((32, 32, 3), 2, weights=None, trainable_layers=n)
    layers = _base(default).layers
    assert any(_is_bn(l) for l in layers[-n:])
    assert [l.trainable for l in layers] == [False] * (len(layers) - n) + [not _is_bn(l) for l in layers[-n:]]

    everything = resnet50.build((32, 32, 3), 2, weights=None, trainable_layers=-1)
    assert all(l.trainable != _is_bn(l) for l in _base(everything).layers)
    assert len(everything.trainable_weights) > len(model.trainable_weights)
    with pytest.raises(ValueError, match="model.trainable_layers"):
        resnet50.build((32, 32, 3), 2, weights=None, trainable_layers=10_000)
    with pytest.raises(ValueError, match="model.trainable_layers"):
        resnet50.build((32, 32, 3), 2, weights=None, trainable_layers=-2)


def test_resnet_base_bn_stays_in_inference_mode(tmp_path):
    # A training step (what fit() does) must not touch the pretrained BN statistics, even with the whole base
    # unfrozen and after a save/load round trip. Keras 3 ignores the nested training=False (keras-team/keras#20285).
    model = resnet50.build((32, 32, 1), 2, weights=None, trainable_layers=-1)
    model.save(tmp_path / "m.keras")
    for m in (model, keras.models.load_model(tmp_path / "m.keras")):
        bn = _base(m).get_layer("conv1_bn")
        before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
        m(_images(2, 32, 1), training=True)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before)

    # The opt-out really trains BN statistics (this is what the default protects against).
    model = resnet50.build((32, 32, 1), 2, weights=None, trainable_layers=-1, freeze_bn=False)
    bn = _base(model).get_layer("conv1_bn")
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    model(_images(2, 32, 1), training=True)
    assert not np.array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before)


@pytest.mark.parametrize("fmt", ["weights.h5", "legacy.h5"])
def test_resnet_loads_local_weights_file(fmt, tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / f"resnet50_notop.{fmt}"
    if fmt == "weights.h5":
        source.save_weights(path)
    else:  # the HDF5 layout of Keras' downloadable resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, source)
    # A different input size on purpose: convolution weights do not depend on it.
    model = resnet50.build((64, 64, 1), 2, weights=str(path))
    got, want = _base(model).get_weights(), source.get_weights()
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_resnet_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="model.weights") as info:
        resnet50.build((32, 32, 3), 2, weights=str(missing))
    assert str(missing) in str(info.value)


def test_resnet_null_weights_strings():
    for w in ("null", "None"):
        assert resnet50._weights_arg(w) is None
    with pytest.raises(ValueError, match="model.weights"):
        resnet50._weights_arg(3)


def test_resnet_imagenet_download_failure_is_explained(monkeypatch):
    from keras.src.utils import file_utils

    requested = []

    def offline_get_file(fname=None, origin=None, **kw):  # what keras.applications calls to fetch weights
        requested.append(fname)
        raise Exception(f"URL fetch failure on {origin}: no network")

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    with pytest.raises(RuntimeError, match=r"model\.weights=null") as info:
        resnet50.build((32, 32, 1), 2)  # default weights="imagenet"
    assert "resnet50_notop.h5" in str(info.value) and "could not download" in str(info.value).lower()
    assert requested == ["resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"]
