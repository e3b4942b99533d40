"""A small VGG-style CNN sized to train from scratch on CPUs (about 390k parameters with the defaults)."""

import keras

from medspark.models._common import check_args, check_rate, head, int_tuple


def build(input_shape: tuple[int, int, int], num_classes: int, name: str = "small_cnn",
          multilabel: bool = False,
          filters: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.3, l2: float = 0.0,
          bn_momentum: float = 0.9) -> keras.Model:
    """Rescaling(1/255) -> per block [Conv2D 3x3 (no bias) -> BN -> ReLU -> MaxPool 2x2] -> GAP -> Dropout -> softmax.

    filters: one conv block per entry; 4 doubling blocks downsample 16x (128 -> 8) at a cost CPUs can train.
    dropout: 0.3 before the classifier; mild, since GAP + BN already regularize a model this small.
    l2: kernel L2 penalty, off by default (BN + dropout suffice); try 1e-4 on tiny datasets.
    bn_momentum: 0.9 instead of Keras' 0.99 so BN's inference statistics converge within the few hundred
        steps of a short CPU run (with 0.99, early validation scores are garbage).
    """
    filters = int_tuple(filters, "model.filters")
    dropout = check_rate(dropout, "model.dropout")
    l2 = float(l2)
    bn_momentum = check_rate(bn_momentum, "model.bn_momentum")
    if l2 < 0:
        raise ValueError(f"model.l2 must be >= 0, got {l2!r}")
    # Each block halves H and W, so the image must survive len(filters) poolings.
    shape, num_classes = check_args(input_shape, num_classes, 2 ** len(filters), name, multilabel=multilabel)
    reg = keras.regularizers.L2(l2) if l2 > 0 else None

    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)  # [0, 255] -> [0, 1]
    for i, f in enumerate(filters, 1):
        # No bias: the following BatchNormalization's beta does that job.
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = head(x, num_classes, multilabel, kernel_regularizer=reg)  # softmax, or sigmoids (multilabel)
    return keras.Model(inputs, outputs, name=name)
