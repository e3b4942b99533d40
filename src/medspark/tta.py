"""Test-time augmentation: a prediction averaged over a few transformed views of each image.

`evaluate.tta` (conf/config.yaml) picks the views; evaluation (evaluate.predict_split) and the packaged classifier
(serving.ImageClassifier.predict_arrays) both call `predict`, so the shipped model answers what was evaluated:
  none        the image alone (no averaging, the network's own output)
  flip        the image and its left-right mirror
  flip_shift  the two above plus the image moved SHIFT pixels left, right, up and down (6 views); the pixels a shift
              uncovers repeat the edge row or column, so no black bar appears in a scan whose border is not black
numpy only: the network is whatever `predict_fn` calls.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

MODES = ("none", "flip", "flip_shift")
SHIFT = 2  # pixels: small against any image_size the models accept (>= 32)


def check_mode(mode) -> str:
    """The mode as a string, or a one-line error naming the config key."""
    if str(mode) not in MODES:
        raise ValueError(f"evaluate.tta={mode!r} is not one of {', '.join(MODES)}: set evaluate.tta=none (off), flip "
                         "or flip_shift")
    return str(mode)


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(N, H, W, C) moved dy rows down and dx columns right; the uncovered border repeats the edge pixels."""
    h, w = x.shape[1:3]
    pad = np.pad(x, ((0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    top, left = max(-dy, 0), max(-dx, 0)
    return pad[:, top:top + h, left:left + w]


def views(x, mode: str) -> list[np.ndarray]:
    """The images of each view of a (N, H, W, C) batch, the untouched batch first."""
    mode = check_mode(mode)
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"test-time augmentation needs a batch of shape (N, H, W, C), got shape {x.shape}")
    out = [x]
    if mode in ("flip", "flip_shift"):
        out.append(np.ascontiguousarray(x[:, :, ::-1]))
    if mode == "flip_shift":
        out += [_shift(x, 0, SHIFT), _shift(x, 0, -SHIFT), _shift(x, SHIFT, 0), _shift(x, -SHIFT, 0)]
    return out


def predict(predict_fn: Callable, x, mode: str):
    """predict_fn(batch) averaged over the views of `mode` (float64); mode none: predict_fn(x) as it is."""
    if check_mode(mode) == "none":
        return predict_fn(x)
    preds = [np.asarray(predict_fn(v), dtype=np.float64) for v in views(x, mode)]
    return np.mean(preds, axis=0)
