"""The model at work: the trained Keras model packaged with its own preprocessing as an MLflow pyfunc model.

A caller gives the raw image files' bytes, never paths and never pre-resized arrays. The model reads no file: when
it is served (`mlflow models serve`), a path would name a file on the server's disk. `medspark predict` reads the
caller's files on the caller's side and hands their bytes over. Every image goes through
`medspark.data.preprocess.decode` with the run's `PreprocessConfig`, the very function the Spark job applied to the
training data, so a served prediction sees the pixels training saw.

    model = mlflow.pyfunc.load_model("models:/medspark-synthetic-classifier/1")
    model.predict(pd.DataFrame({"image": [Path("scan.png").read_bytes()]}))   # or base64 text
      ->  predicted_class  prob_glioma  prob_meningioma  ...  error          (binary, multiclass: softmax)
      ->  findings  prob_Atelectasis  prob_Effusion  ...  error               (multilabel: a sigmoid per finding)

Single-label models answer the most probable class, except a binary model logged with an operating point
(`thresholds` {positive class: t}, chosen on the validation split by `evaluate.operating_point`, see
medspark.operating_points): it answers the positive class (class index 1) when p(positive) >= t. A multilabel
model answers every finding's probability and, in `findings`, the findings whose probability reaches that finding's threshold (chosen on the validation split when
the model was trained, see medspark.evaluate.THRESHOLD_RULE), joined by "|" as NIH ChestX-ray14's CSV writes them,
"No Finding" when there is none. Models logged before tasks existed carry no task: they are single-label.
The probabilities are the network's averaged over the test-time augmentation views the run evaluated with (`tta`)
and then temperature-scaled with the temperature fitted on its validation split (`temperature`), so they are the
calibrated probabilities the run's evaluation measured; models logged before either existed use none (T = 1).

A served request is untrusted. The run's `serving:` limits (`ServingLimits`, baked into the model when it is
logged) bound what one call may cost: images per call, their bytes, and each image's declared size, checked on
the file's header before any pixel is decoded. Only `FORMATS` are opened, so no other format's parser runs (EPS
would run Ghostscript). An image that cannot be used gets predicted_class (findings) and probabilities null and
its reason in `error`; the rest of the batch is predicted. A call that breaks a limit, or has no `image` column, is
refused whole with one short message (`RequestError`: HTTP 400 when served). Nothing the model answers carries a
stack trace: unexpected errors go to the server's log.

What the logged model contains (`log_model`):
  artifacts/model.keras       the trained network (Keras 3 format)
  artifacts/preprocess.json   {"preprocess": PreprocessConfig fields, "classes": [...], "serving": limits,
                              "task": "binary" | "multiclass" | "multilabel", "thresholds": {finding: t} (multilabel)
                              or {positive class: t} (binary), "temperature": T (medspark.calibration; 1.0 = the
                              network's own probabilities), "tta": "none" | "flip" | "flip_shift" (medspark.tta)}
  code/medspark/              this package's source, so the model loads where medspark is not installed
  python_model.pkl            an `ImageClassifier` (pickled by reference to this module)
plus a signature (input `image` binary; outputs as above), an input example (one PNG from the test split) and
pinned pip requirements.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR

from . import calibration
from . import tta as _tta  # log_model's `tta` argument shadows the module's name
from .data import targets
from .data.preprocess import MB, PreprocessConfig, Rejected, bytes_per_pixel, decode

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # what scans are exported as (Pillow's names; JPEG covers MPO)
KERAS_ARTIFACT = "keras_model"
META_ARTIFACT = "preprocess"
FORMAT = "medspark-classifier/1"
PACKAGE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("medspark.serving")


@dataclass(frozen=True)
class ServingLimits:
    """What one predict call (one HTTP request when served) may cost; conf/config.yaml's `serving:` says why each.
    These defaults apply to models logged before the limits existed."""
    max_images: int = 32
    max_request_mb: float = 32
    max_pixels: int = 20_000_000
    max_decoded_mb: float = 64

    def __post_init__(self):
        for f in fields(self):
            value, integer = getattr(self, f.name), f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value <= 0:
                raise ValueError(f"serving.{f.name}={value!r} must be a positive {'integer' if integer else 'number'}")

    @classmethod
    def from_mapping(cls, m) -> "ServingLimits":
        unknown = set(m) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown serving option(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**m)


class RequestError(MlflowException):
    """A call refused whole (a limit, no `image` column; INTERNAL_ERROR: our own failure): HTTP 400 (500) with
    this one-line message when served. MLflow's scoring server rewrites `message` to prefix it with a print of the
    request's data; keeping the first value keeps the answer one short line."""

    def __init__(self, message: str, error_code=BAD_REQUEST):
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str):
        self.__dict__.setdefault("_message", value)


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def answer_column(task: str | None) -> str:
    """The answer: `findings` (names joined by "|") for multilabel, else `predicted_class`."""
    return "findings" if task == "multilabel" else "predicted_class"


def output_columns(classes, task: str | None = None) -> list[str]:
    return [answer_column(task), *(prob_column(c) for c in classes), "error"]


def check_thresholds(thresholds, classes) -> dict[str, float]:
    """{finding: threshold} for every finding, each in [0, 1]; a sequence is taken in `classes` order."""
    if thresholds is None:
        raise ValueError("a multilabel classifier needs its per-finding thresholds (evaluate.choose_thresholds)")
    t = dict(thresholds) if hasattr(thresholds, "keys") else dict(zip(classes, thresholds))
    if set(t) != set(classes) or (not hasattr(thresholds, "keys") and len(thresholds) != len(classes)):
        raise ValueError(f"thresholds must name exactly the findings {list(classes)}, got {list(t)}")
    out = {c: float(t[c]) for c in classes}
    bad = {c: v for c, v in out.items() if not 0 <= v <= 1}  # NaN fails too
    if bad:
        raise ValueError(f"thresholds must be in [0, 1], got {bad}")
    return out


def check_temperature(temperature) -> float:
    """A temperature as a positive finite float (medspark.calibration.fit_temperature's)."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return t


def check_binary_threshold(thresholds, classes) -> dict[str, float]:
    """{positive class: threshold in [0, 1]} of a binary classifier; the positive class is classes[1]."""
    t = dict(thresholds) if hasattr(thresholds, "keys") else {}
    if len(classes) != 2 or set(t) != {classes[1]} or not 0 <= float(t[classes[1]]) <= 1:
        raise ValueError(f"a binary classifier's thresholds must be {{positive class {classes[1]!r}: a number in "
                         f"[0, 1]}} (medspark.operating_points), got {thresholds!r}")
    return {classes[1]: float(t[classes[1]])}


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def image_bytes(value) -> bytes:
    """A cell of the `image` column -> the file's bytes. Bytes as they are; text as base64 (what JSON and
    HTTP deliver), with or without a `data:image/...;base64,` prefix."""
    if _missing(value):
        raise Rejected("no image: give the file's bytes (base64 text in JSON)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("image: text that is not base64 (pass the file's bytes or base64 text)") from None
    else:
        raise Rejected(f"image: got {type(value).__name__}; pass the image file's bytes or base64 text "
                       "(the model does its own decoding and resizing), not decoded arrays")
    if not data:
        raise Rejected("empty file (0 bytes)")
    return data


def check_image(data: bytes, limits: ServingLimits) -> None:
    """Rejected unless the bytes are one of FORMATS within the declared-size limits, from the header alone
    (Pillow reads no pixel before `load()`): no other format's parser runs, nothing big is allocated. A DICOM file
    (Part 10: 'DICM' after the preamble) is judged from its header by pydicom instead (check_dicom)."""
    from PIL import Image, UnidentifiedImageError

    from .data import dicom

    if dicom.is_dicom(data):
        return check_dicom(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits below decide
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                fmt, (w, h), mode = img.format, img.size, img.mode
            # decode() opens the bytes without a format list (training takes any format): it must pick the same
            # reader, so that no other format's loader (EPS: Ghostscript) can ever see bytes accepted here
            with Image.open(io.BytesIO(data)) as img:
                same = img.format == fmt
    except UnidentifiedImageError:
        raise Rejected(f"not an image in an accepted format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise Rejected(f"too large: declared size over Pillow's limit (serving.max_pixels={limits.max_pixels})") \
            from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's ways of saying 'corrupt'
        raise Rejected(f"corrupt or truncated: {e}") from None
    if not same:
        raise Rejected(f"ambiguous file: reads as {fmt} and as another format")
    if w * h > limits.max_pixels:
        raise Rejected(f"too large: declared {w}x{h} exceeds serving.max_pixels={limits.max_pixels}")
    mb = w * h * bytes_per_pixel(mode) / MB
    if mb > limits.max_decoded_mb:
        raise Rejected(f"too large: declared {w}x{h} {mode} decodes to {mb:.0f} MB, over "
                       f"serving.max_decoded_mb={limits.max_decoded_mb}")


def check_dicom(data: bytes, limits: ServingLimits) -> None:
    """A DICOM file's declared size (all frames) within the limits, from its header (no pixel decoded); `decode`
    then gives the frame preprocess.multi_frame selects (first or middle; `all`: the first)."""
    from .data import dicom

    ds = dicom.read(data)  # pixel data kept as bytes (the request limit bounds them), not decoded
    w, h = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    if w * h > limits.max_pixels:
        raise Rejected(f"too large: declared {w}x{h} exceeds serving.max_pixels={limits.max_pixels}")
    mb = w * h * frames * samples * -(-int(ds.get("BitsAllocated") or 16) // 8) / MB
    if mb > limits.max_decoded_mb:
        raise Rejected(f"too large: declared {w}x{h} DICOM of {frames} frame(s) decodes to {mb:.0f} MB, over "
                       f"serving.max_decoded_mb={limits.max_decoded_mb}")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc model: image file bytes in, per-class probabilities and the predicted class (single-label) or the
    findings over their thresholds (multilabel) out."""

    batch_size = 64  # images per Keras call: bounds memory whatever the request size

    def load_context(self, context):
        import keras

        meta = json.loads(Path(context.artifacts[META_ARTIFACT]).read_text())
        self.classes = list(meta["classes"])
        self.preprocess = PreprocessConfig.from_mapping(meta["preprocess"])
        self.limits = ServingLimits.from_mapping(meta.get("serving", {}))  # logged before limits: the defaults
        self.task = meta.get("task") or targets.task_of(None, self.classes)  # logged before tasks: single-label
        if self.task == "multilabel":
            t = check_thresholds(meta.get("thresholds"), self.classes)
            self.thresholds = np.array([t[c] for c in self.classes])
        self.temperature = float(meta.get("temperature", 1.0))  # logged before calibration: the raw outputs
        self.tta = _tta.check_mode(meta.get("tta", "none"))
        self.threshold = None  # binary: p(positive) >= threshold answers the positive class; None (older): argmax
        if self.task == "binary" and meta.get("thresholds"):
            self.threshold = check_binary_threshold(meta["thresholds"], self.classes)[self.classes[1]]
        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return self.predict_images(model_input)
        except RequestError:
            raise
        except Exception:  # a stack trace names the server's paths: it goes to the server's log, not the answer
            log.exception("prediction failed")
            raise RequestError("internal error while predicting (details in the server's log)", INTERNAL_ERROR) \
                from None

    def predict_images(self, model_input) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in df.columns:
            raise RequestError("no `image` column: send each image file's bytes in `image` (base64 text in JSON); "
                               "the model reads no files, a `path` is never accepted")
        n, limits = len(df), self.limits
        if n > limits.max_images:
            raise RequestError(f"{n} images in one request, more than serving.max_images={limits.max_images}: "
                               "send smaller requests")
        images, errors, max_bytes = [None] * n, [None] * n, limits.max_request_mb * MB
        for i, value in enumerate(df["image"].tolist()):
            try:
                images[i] = image_bytes(value)
                if len(images[i]) > max_bytes:
                    images[i] = None
                    raise Rejected(f"too large: file over serving.max_request_mb={limits.max_request_mb}")
            except Rejected as e:
                errors[i] = str(e)
        total = sum(len(b) for b in images if b is not None)
        if total > max_bytes:
            raise RequestError(f"{total / MB:.1f} MB of images in one request, more than "
                               f"serving.max_request_mb={limits.max_request_mb}: send smaller requests")
        arrays, ok = [], []
        for i, data in enumerate(images):
            if data is None:
                continue
            try:
                check_image(data, limits)
                arrays.append(decode(data, self.preprocess))
                ok.append(i)
            except Rejected as e:
                errors[i] = str(e)
            except Exception as e:  # a decoder's own failure: this image's, not the request's; no trace in answers
                log.exception("image %d of the request", i)
                errors[i] = f"could not be decoded ({type(e).__name__})"
        probs = np.full((n, len(self.classes)), np.nan)
        if arrays:
            probs[ok] = self.predict_arrays(np.stack(arrays))
        # null, not NaN, where there is no prediction: answers are strict JSON
        out = pd.DataFrame(probs, columns=[prob_column(c) for c in self.classes], index=df.index).astype(object)
        out = out.where(~np.isnan(probs), None)
        out.insert(0, answer_column(self.task), pd.Series(self.answers(probs, ok, n), index=df.index, dtype=object))
        out["error"] = pd.Series(errors, index=df.index, dtype=object)
        return out

    def answers(self, probs: np.ndarray, ok: list[int], n: int) -> list[str | None]:
        """Per row: the argmax class (binary with a threshold: the positive class when its probability reaches it),
        or the findings at or over their thresholds as "A|B" ("No Finding" if none);
        None for the rows not predicted."""
        out = [None] * n
        for i in ok:
            if self.task == "multilabel":
                found = targets.bits(np.flatnonzero(probs[i] >= self.thresholds))
                out[i] = targets.names(found, self.task, self.classes)
            elif getattr(self, "threshold", None) is not None:
                out[i] = self.classes[int(probs[i, 1] >= self.threshold)]
            else:
                out[i] = self.classes[int(np.argmax(probs[i]))]
        return out

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) from `decode` -> float64 probabilities, exactly as evaluation fed the network
        (float32 pixels in 0..255), averaged over the `tta` views, then temperature-scaled."""
        x = images.astype(np.float32)
        probs = np.concatenate([np.asarray(_tta.predict(self.model.predict_on_batch, x[i:i + self.batch_size],
                                                       self.tta), np.float64)
                                for i in range(0, len(x), self.batch_size)])
        return calibration.apply_temperature(probs, self.temperature, self.task == "multilabel")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG file bytes (for input examples and tests)."""
    from PIL import Image

    arr = np.asarray(image, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def signature(classes, task: str | None = None):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    # optional, so that a request without it gets the model's own one-line refusal rather than MLflow's
    inputs = Schema([ColSpec(DataType.binary, "image", required=False)])
    outputs = Schema([ColSpec(DataType.string, answer_column(task), required=False),
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
              registered_model_name: str | None = None, limits: ServingLimits | None = None,
              task: str | None = None, thresholds=None, temperature: float = 1.0, tta: str = "none"):
    """Log the packaged classifier into the active run; returns MLflow's ModelInfo.
    example_images: uint8 (N, H, W, C) training-preprocessed images; the first becomes the input example
    (as a PNG file, which is what callers send). limits: the run's `serving:` config (None = the defaults).
    task: the dataset's (None: from the class count); multilabel needs `thresholds`, {finding: t} or one per class
    in order (evaluate.evaluate_split's); binary may have one, {positive class: t} (its decision threshold).
    temperature: the scale fitted on the validation split (medspark.calibration), applied to every prediction; tta:
    the test-time augmentation views (medspark.tta)."""
    classes = [str(c) for c in classes]
    limits = asdict(limits or ServingLimits())
    task = targets.task_of(task, classes)
    labels = {"task": task, **({"thresholds": check_thresholds(thresholds, classes)} if task == "multilabel" else {}),
              "temperature": check_temperature(temperature), "tta": _tta.check_mode(tta)}
    if task == "binary" and thresholds:  # its operating point (medspark.operating_points)
        labels["thresholds"] = check_binary_threshold(thresholds, classes)
    with tempfile.TemporaryDirectory(prefix="medspark-classifier-") as tmp:
        tmp = Path(tmp)
        keras_model.save(tmp / "model.keras")
        meta = {"format": FORMAT, "classes": classes, "preprocess": asdict(preprocess),
                "input_shape": list(preprocess.shape), "serving": limits, **labels}
        (tmp / "preprocess.json").write_text(json.dumps(meta, indent=2))
        code = tmp / "code" / "medspark"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        example = None
        if example_images is not None and len(example_images):
            example = pd.DataFrame({"image": [png_bytes(example_images[0])]})
        return mlflow.pyfunc.log_model(
            name=name, python_model=ImageClassifier(),
            artifacts={KERAS_ARTIFACT: str(tmp / "model.keras"), META_ARTIFACT: str(tmp / "preprocess.json")},
            code_paths=[str(code)], signature=signature(classes, task), input_example=example,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name or None,
            metadata={"medspark": {"format": FORMAT, "classes": classes, "preprocess": asdict(preprocess),
                                   "serving": limits, **labels, "input": "DataFrame with `image`: image file bytes "
                                                                         "(base64 text in JSON)"}})
