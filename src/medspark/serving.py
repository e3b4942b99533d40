"""The model at work: the trained Keras model packaged with its own preprocessing as an MLflow pyfunc model.

A caller gives raw image files (bytes, base64 text or paths), never pre-resized arrays: every row goes
through `medspark.data.preprocess.decode` with the run's `PreprocessConfig`, the very function the Spark
job applied to the training data, so a served prediction sees the pixels training saw.

    model = mlflow.pyfunc.load_model("models:/medspark-synthetic-classifier/1")
    model.predict(pd.DataFrame({"path": ["scan.png"]}))           # or {"image": [file bytes or base64 text]}
      ->  predicted_class  prob_glioma  prob_meningioma  ...  error

An input that cannot become an image gets predicted_class null, probabilities NaN and the reason in `error`;
the rest of the batch is predicted normally. What the logged model contains (`log_model`):
  artifacts/model.keras       the trained network (Keras 3 format)
  artifacts/preprocess.json   {"preprocess": PreprocessConfig fields, "classes": [...], "format": ...}
  code/medspark/              this package's source, so the model loads where medspark is not installed
  python_model.pkl            an `ImageClassifier` (pickled by reference to this module)
plus a signature (inputs `image` binary, `path` string, both optional; outputs as above), an input example
(one PNG from the test split) and pinned pip requirements.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import mlflow.pyfunc

from .data.preprocess import PreprocessConfig, Rejected, decode, is_system_file, read_bytes

FORMAT = "medspark-classifier/1"
KERAS_ARTIFACT = "keras_model"
META_ARTIFACT = "preprocess"
INPUT_COLUMNS = ("image", "path")
PACKAGE_DIR = Path(__file__).resolve().parent


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def output_columns(classes) -> list[str]:
    return ["predicted_class", *(prob_column(c) for c in classes), "error"]


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _image_bytes(value) -> bytes:
    """A cell of the `image` column -> the file's bytes. Bytes as they are; text as base64 (what JSON and
    HTTP deliver), with or without a `data:image/...;base64,` prefix."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("image: text that is not base64 (pass the file's bytes, base64 text or a `path`)") from None
    else:
        raise Rejected(f"image: got {type(value).__name__}; pass the image file's bytes or base64 text "
                       "(the model does its own decoding and resizing), not decoded arrays")
    if not data:
        raise Rejected("empty file (0 bytes)")
    return data


def row_bytes(image, path) -> bytes:
    """One input row -> file bytes, or Rejected with the reason. `image` wins when both are given; a `path`
    alone is read from the local filesystem. System files are refused by name as in training."""
    if not _missing(path) and is_system_file(str(path)):
        raise Rejected("system file, not an image")
    if not _missing(image):
        return _image_bytes(image)
    if not _missing(path):
        return read_bytes(str(path))
    raise Rejected("no input: give the file's bytes or base64 text in `image`, or a file `path`")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc model: raw image files in, predicted class and per-class probabilities out."""

    batch_size = 64  # images per Keras call: bounds memory whatever the request size

    def load_context(self, context):
        import keras

        meta = json.loads(Path(context.artifacts[META_ARTIFACT]).read_text())
        self.classes = list(meta["classes"])
        self.preprocess = PreprocessConfig.from_mapping(meta["preprocess"])
        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if not any(c in df.columns for c in INPUT_COLUMNS):
            raise ValueError(f"the input needs a column `image` (file bytes or base64 text) and/or `path` "
                             f"(file paths); got columns {list(df.columns)}")
        n = len(df)
        images = df["image"].tolist() if "image" in df.columns else [None] * n
        paths = df["path"].tolist() if "path" in df.columns else [None] * n
        arrays, ok, errors = [], [], [None] * n
        for i, (image, path) in enumerate(zip(images, paths)):
            try:
                arrays.append(decode(row_bytes(image, path), self.preprocess))
                ok.append(i)
            except Rejected as e:
                errors[i] = str(e)
        probs = np.full((n, len(self.classes)), np.nan)
        if arrays:
            probs[ok] = self.predict_arrays(np.stack(arrays))
        out = pd.DataFrame(probs, columns=[prob_column(c) for c in self.classes], index=df.index)
        predicted = [None] * n
        for i in ok:
            predicted[i] = self.classes[int(np.argmax(probs[i]))]
        out.insert(0, "predicted_class", pd.Series(predicted, index=df.index, dtype=object))
        out["error"] = pd.Series(errors, index=df.index, dtype=object)
        return out

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) from `decode` -> float64 probabilities, exactly as evaluation fed the network
        (float32 pixels in 0..255)."""
        x = images.astype(np.float32)
        return np.concatenate([np.asarray(self.model.predict_on_batch(x[i:i + self.batch_size]), np.float64)
                               for i in range(0, len(x), self.batch_size)])


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG file bytes (for input examples and tests)."""
    from PIL import Image

    arr = np.asarray(image, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def signature(classes):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.binary, "image", required=False),
                     ColSpec(DataType.string, "path", required=False)])
    outputs = Schema([ColSpec(DataType.string, "predicted_class", required=False),
                      *(ColSpec(DataType.double, prob_column(c), required=False) for c in classes),
                      ColSpec(DataType.string, "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """Pinned to what trained the model (saves MLflow's requirement inference, a subprocess that imports TF)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for names in (("mlflow",), ("tensorflow", "tensorflow-cpu"), ("keras",), ("pillow",), ("numpy",), ("pandas",),
                  ("cloudpickle",)):
        for name in names:
            try:
                reqs.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
    return reqs


def log_model(keras_model, preprocess: PreprocessConfig, classes, example_images=None, name: str = "classifier",
              registered_model_name: str | None = None):
    """Log the packaged classifier into the active run; returns MLflow's ModelInfo.
    example_images: uint8 (N, H, W, C) training-preprocessed images; the first becomes the input example
    (as a PNG file, which is what callers send)."""
    classes = [str(c) for c in classes]
    with tempfile.TemporaryDirectory(prefix="medspark-classifier-") as tmp:
        tmp = Path(tmp)
        keras_model.save(tmp / "model.keras")
        meta = {"format": FORMAT, "classes": classes, "preprocess": asdict(preprocess),
                "input_shape": list(preprocess.shape)}
        (tmp / "preprocess.json").write_text(json.dumps(meta, indent=2))
        code = tmp / "code" / "medspark"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        example = None
        if example_images is not None and len(example_images):
            example = pd.DataFrame({"image": [png_bytes(example_images[0])]})
        return mlflow.pyfunc.log_model(
            name=name, python_model=ImageClassifier(),
            artifacts={KERAS_ARTIFACT: str(tmp / "model.keras"), META_ARTIFACT: str(tmp / "preprocess.json")},
            code_paths=[str(code)], signature=signature(classes), input_example=example,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name or None,
            metadata={"medspark": {"format": FORMAT, "classes": classes, "preprocess": asdict(preprocess),
                                   "input": "DataFrame with `image` (file bytes or base64 text) and/or `path`"}})
