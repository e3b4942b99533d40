"""A small residual CNN for CPUs: a cheap stride-2 stem, then stages of residual blocks whose convolutions are
depthwise-separable (MobileNet / ResNet-D ideas at a size that trains from scratch in minutes on 2 cores).

FLOPs go where accuracy comes from: the stem halves the image at once (a 3x3 stride-2 convolution over 1-3 input
channels costs little), each stage halves it again with a strided block, and the separable convolutions cost about
1/8 of a full 3x3 convolution of the same width, so the network can be wider and deeper than small_cnn at fewer
multiply-adds per image (`models.flops_per_image` counts them).
"""

import keras

from medspark.models._common import check_args, check_rate, head, int_tuple


def _block(x, filters: int, stride: int, bn_momentum: float, name: str):
    """Pre-activation-free residual block: [sepconv 3x3 (stride) -> BN -> ReLU -> sepconv 3x3 -> BN] + shortcut -> ReLU.
    The shortcut is the identity, or (new width or stride) avg-pool + 1x1 conv + BN (ResNet-D: no information dropped
    by a strided 1x1)."""
    shortcut = x
    y = keras.layers.SeparableConv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_sep1")(x)
    y = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep2")(y)
    y = keras.layers.BatchNormalization(momentum=bn_momentum, gamma_initializer="zeros", name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        if stride != 1:
            shortcut = keras.layers.AveragePooling2D(stride, padding="same", name=f"{name}_pool")(shortcut)
        shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_proj_bn")(shortcut)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))


def build(input_shape: tuple[int, int, int], num_classes: int, name: str = "res_cnn", multilabel: bool = False,
          stem: int = 32, filters: tuple[int, ...] = (48, 96, 192, 288), blocks: tuple[int, ...] = (1, 2, 2, 1),
          dropout: float = 0.2, bn_momentum: float = 0.9) -> keras.Model:
    """Rescaling(1/255) -> stem [Conv 3x3 stride 2 -> BN -> ReLU] -> per stage: a stride-2 residual block then
    `blocks[i] - 1` more -> GAP -> Dropout -> head.

    stem: width of the stride-2 stem. filters/blocks: one entry per stage (each halves H and W: 128 px -> 4 at the end
    with the defaults). bn_momentum: 0.9, as small_cnn, so inference statistics settle within a short CPU run; the
    second BN of every block starts at zero (each block starts as the identity: steadier early epochs)."""
    filters, blocks = int_tuple(filters, "model.filters"), int_tuple(blocks, "model.blocks")
    if len(filters) != len(blocks):
        raise ValueError(f"model.filters ({len(filters)} stages) and model.blocks ({len(blocks)}) must have the same "
                         "length: one entry per stage")
    dropout = check_rate(dropout, "model.dropout")
    bn_momentum = check_rate(bn_momentum, "model.bn_momentum")
    shape, num_classes = check_args(input_shape, num_classes, 2 ** (len(filters) + 1), name, multilabel=multilabel)

    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = keras.layers.Conv2D(int(stem), 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for s, (f, n) in enumerate(zip(filters, blocks), 1):
        for b in range(n):
            x = _block(x, f, 2 if b == 0 else 1, bn_momentum, f"s{s}b{b + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, head(x, num_classes, multilabel), name=name)
