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
