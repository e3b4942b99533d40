"""A flattened-input MLP: the no-convolution baseline the CNNs should beat."""

import keras

from medspark.models._common import check_args, check_rate, head, int_tuple


def build(input_shape: tuple[int, int, int], num_classes: int, name: str = "dense",
          multilabel: bool = False,
          units: tuple[int, ...] = (256, 128), dropout: float = 0.3, pool: int = 4) -> keras.Model:
    """Rescaling(1/255) -> AveragePooling2D(pool) -> Flatten -> [Dense(relu) -> Dropout] per entry -> softmax.

    units: hidden layer widths; two shrinking layers are a standard MLP baseline.
    dropout: 0.3 after each hidden layer; the first layer is wide and overfits easily.
    pool: average-pool factor before flattening (1 = off); 4 turns 128x128 into 32x32 = 1024 inputs,
          keeping the first Dense at ~262k weights instead of ~4.2M.
    """
    units = int_tuple(units, "model.units")
    dropout = check_rate(dropout, "model.dropout")
    pool = int(pool)
    if pool < 1:
        raise ValueError(f"model.pool must be an integer >= 1 (1 = no pooling), got {pool!r}")
    shape, num_classes = check_args(input_shape, num_classes, pool, name, " or lower model.pool", multilabel=multilabel)

    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)  # [0, 255] -> [0, 1]
    if pool > 1:
        x = keras.layers.AveragePooling2D(pool, name="downsample")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, u in enumerate(units, 1):
        x = keras.layers.Dense(u, activation="relu", name=f"dense{i}")(x)
        x = keras.layers.Dropout(dropout, name=f"dropout{i}")(x)
    outputs = head(x, num_classes, multilabel)  # softmax, or one sigmoid per finding (multilabel)
    return keras.Model(inputs, outputs, name=name)
