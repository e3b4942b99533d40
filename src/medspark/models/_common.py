"""Argument checks shared by the builders; errors name the config key to change."""

import numbers


def head(x, num_classes: int, multilabel: bool, **dense_kwargs):
    """The output layer every model ends in: a softmax over the classes (one class per image), or for a multilabel
    dataset one independent sigmoid per finding. float32 keeps both stable under a mixed-precision policy."""
    import keras

    return keras.layers.Dense(num_classes, activation="sigmoid" if multilabel else "softmax", dtype="float32",
                              name="probs", **dense_kwargs)(x)


def check_args(input_shape, num_classes, min_size: int, model: str, size_hint: str = "", multilabel: bool = False):
    """Validate; return ((H, W, C), num_classes) as plain ints (Hydra may pass a ListConfig, data code numpy ints)."""
    try:
        h, w, c = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{model}: input_shape must be (height, width, channels), got {input_shape!r}; "
                         "it comes from preprocess.image_size and preprocess.channels") from None
    if c not in (1, 3):
        raise ValueError(f"{model}: input has {c} channels, expected 1 (grayscale) or 3 (RGB); "
                         "set preprocess.channels to 1 or 3")
    if h < min_size or w < min_size:
        raise ValueError(f"{model}: input {h}x{w} is too small, this model needs at least {min_size}x{min_size} "
                         f"(its pooling stages would shrink it to nothing); raise preprocess.image_size{size_hint}")
    least = 1 if multilabel else 2  # one finding is a multilabel set; one class is not a classifier
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < least:
        raise ValueError(f"{model}: num_classes must be an integer >= {least}, got {num_classes!r}; "
                         f"it is the number of labels in the dataset, which needs at least {least}")
    return (h, w, c), int(num_classes)


def int_tuple(values, key: str) -> tuple[int, ...]:
    """A list/tuple/ListConfig of positive ints as a plain tuple (keeps Keras configs JSON-serializable)."""
    if isinstance(values, (int, float)):
        values = (values,)
    out = tuple(int(v) for v in values)
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"{key} must be a non-empty list of positive integers, got {list(out)!r}")
    return out


def check_rate(value, key: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be in [0, 1), got {value!r}")
    return value
