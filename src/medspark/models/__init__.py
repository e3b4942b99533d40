"""Keras model builders, one module per architecture.

Contract: each module exposes
    build(input_shape: (H, W, C), num_classes: int, name: str = "<module>", **hparams) -> keras.Model
returning an UNCOMPILED functional model whose input is a float32 batch (N, H, W, C) with pixel values in
[0, 255] (C is 1 or 3) and whose output is softmax probabilities (N, num_classes), or with `multilabel=True`
(passed only for a multilabel dataset) one sigmoid per finding (`_common.head` builds either). Input scaling lives inside
the graph, built from standard serializable Keras layers only (no Lambda, no custom objects), so
`model.save("x.keras")` / `keras.models.load_model`, MLflow and JSON + weights round-trips need nothing extra.
Every hparam has a default; Hydra's `_target_: medspark.models.<module>.build` is the registry.
"""

import numpy as np


def param_count(model) -> dict[str, int]:
    """{"trainable": n, "non_trainable": n, "total": n} scalar parameter counts of a keras model."""
    t = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    n = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable": t, "non_trainable": n, "total": t + n}


def flops_per_image(model) -> int:
    """Multiply-adds of one forward pass, counted layer by layer (Conv2D, SeparableConv2D, DepthwiseConv2D, Dense):
    the cost that decides CPU time, comparable across models; nested models (resnet50) are counted inside."""
    import keras

    total = 0
    for layer in _layers(model):
        out = getattr(layer, "output", None)
        if out is None or not hasattr(layer, "kernel_size") and not isinstance(layer, keras.layers.Dense):
            continue
        shape = tuple(out.shape[1:])
        if isinstance(layer, keras.layers.Dense):
            total += int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
            continue
        h, w, c_out = int(shape[0]), int(shape[1]), int(shape[2])
        kh, kw = layer.kernel_size
        c_in = int(layer.input.shape[-1])
        if isinstance(layer, keras.layers.SeparableConv2D):
            total += h * w * (kh * kw * c_in + c_in * c_out)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            total += h * w * kh * kw * c_in
        else:
            total += h * w * kh * kw * c_in * c_out
    return total


def _layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer
