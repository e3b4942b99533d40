"""ResNet-50 transfer learning: an (optionally ImageNet-pretrained) base with a small classification head."""

import os

import keras
import numpy as np

from medspark.models._common import check_args, check_rate, head

# ImageNet channel means in BGR order: the "caffe" preprocessing the Keras ResNet-50 weights were trained with.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)
PREPROCESS_LAYER = "imagenet_preprocess"
BASE_LAYER = "resnet50_base"


def preprocess_weights(channels: int) -> list[np.ndarray]:
    """[kernel (1, 1, C, 3), bias (3,)] of the 1x1 conv that does caffe preprocessing.

    C=3: RGB -> BGR permutation; C=1: gray copied to B, G and R. Bias subtracts the BGR means.
    """
    if channels == 3:
        kernel = np.eye(3, dtype="float32")[:, ::-1]  # input channel i -> output channel 2 - i
    else:
        kernel = np.ones((1, 3), dtype="float32")
    bias = -np.asarray(IMAGENET_BGR_MEANS, dtype="float32")
    return [kernel.reshape(1, 1, channels, 3).copy(), bias]


def _weights_arg(weights):
    """Normalize model.weights: "imagenet", None (random init), or an expanded local file path."""
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("", "null", "none")):
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"model.weights must be 'imagenet', null or a file path, got {weights!r}")
    weights = os.fspath(weights)
    if weights == "imagenet":
        return weights
    path = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ResNet-50 weights file not found: {path!r} (from model.weights={weights!r}); "
                                "set model.weights to an existing .h5/.weights.h5 file of the no-top base, "
                                "'imagenet', or null")
    return path


def _base(input_shape: tuple[int, int, int], weights):
    """keras.applications.ResNet50 without top, loading weights per _weights_arg."""
    kwargs = dict(include_top=False, input_shape=input_shape, name=BASE_LAYER)
    if weights == "imagenet":
        try:
            return keras.applications.ResNet50(weights="imagenet", **kwargs)
        except Exception as e:  # get_file raises a bare Exception on network failures
            raise RuntimeError(
                f"Could not download/load the ImageNet ResNet-50 weights ({type(e).__name__}: {e}). Without "
                "internet access use model.weights=null (random init) or model.weights=/path/to/resnet50_notop.h5 "
                "(Keras' resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5, fetched elsewhere; placed in "
                "~/.keras/models/ under that name, model.weights=imagenet also works offline)") from e
    base = keras.applications.ResNet50(weights=None, **kwargs)
    if weights is not None:
        try:
            base.load_weights(weights)
        except Exception as e:
            raise ValueError(f"Could not load ResNet-50 base weights from {weights!r} (model.weights): {e}") from e
    return base


def build(input_shape: tuple[int, int, int], num_classes: int, name: str = "resnet50",
          multilabel: bool = False,
          weights: str | None = "imagenet", trainable_layers: int = 0, head_units: int = 128,
          dropout: float = 0.5, freeze_bn: bool = True) -> keras.Model:
    """[fixed 1x1 conv: gray/RGB -> BGR minus ImageNet means] -> ResNet-50 base (BN in inference mode) ->
    GAP -> Dense(head_units, relu) -> Dropout -> Dense(num_classes, softmax).

    weights: "imagenet" (pretrained features are the point of transfer learning on small medical datasets);
        null for random init; or a local .h5/.weights.h5 file of the no-top base (offline clusters).
    trainable_layers: 0 trains only the head (safe first stage); N unfreezes the last N layers of the base
        (fine-tuning stage); -1 unfreezes the whole base.
    head_units: 128, a small head so that few labelled images suffice to fit it.
    dropout: 0.5 before the classifier; the head sits on 2048 pretrained features and overfits fast.
    freeze_bn: True keeps the base's BatchNormalization layers frozen (trainable=False, hence inference mode)
        even inside the unfrozen last N layers: small medical batches would wreck the pretrained statistics.
    """
    # ResNet-50 downsamples 32x; keras.applications refuses inputs under 32x32.
    (h, w, c), num_classes = check_args(input_shape, num_classes, 32, name, multilabel=multilabel)
    weights = _weights_arg(weights)
    dropout = check_rate(dropout, "model.dropout")
    head_units = int(head_units)
    if head_units < 1:
        raise ValueError(f"model.head_units must be >= 1, got {head_units!r}")
    if isinstance(trainable_layers, bool) or int(trainable_layers) != trainable_layers or trainable_layers < -1:
        raise ValueError(f"model.trainable_layers must be -1 (all), 0 (frozen) or N > 0, got {trainable_layers!r}")
    trainable_layers = int(trainable_layers)

    base = _base((h, w, 3), weights)
    n_layers = len(base.layers)
    if trainable_layers > n_layers:
        raise ValueError(f"model.trainable_layers={trainable_layers} exceeds the {n_layers} layers of the "
                         "ResNet-50 base; use -1 to unfreeze all of them")
    if trainable_layers == 0:
        base.trainable = False
    else:
        frozen = {id(layer) for layer in base.layers[:-trainable_layers]} if trainable_layers > 0 else set()
        for layer in base.layers:
            if id(layer) in frozen or (freeze_bn and isinstance(layer, keras.layers.BatchNormalization)):
                layer.trainable = False

    inputs = keras.Input(shape=(h, w, c), dtype="float32", name="image")
    prep = keras.layers.Conv2D(3, 1, name=PREPROCESS_LAYER)
    x = prep(inputs)
    prep.set_weights(preprocess_weights(c))
    prep.trainable = False  # a fixed affine map, not a parameter
    # training=False as in the Keras transfer-learning guide. Keras 3 lets fit()'s training=True override it
    # (keras-team/keras#20285), so what actually keeps BN in inference mode is BN.trainable=False (freeze_bn).
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(head_units, activation="relu", name="head")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = head(x, num_classes, multilabel)  # softmax, or one sigmoid per finding (multilabel)
    return keras.Model(inputs, outputs, name=name)
