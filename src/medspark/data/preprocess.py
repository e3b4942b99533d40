"""Pure image functions: file bytes -> fixed-size uint8 tensor, or a reason why not.

The same functions run inside Spark executors and in the sequential baseline (benchmarks), and are
packaged with the served model, so that training, benchmarking and inference see identical pixels.
Nothing here knows about Spark, Petastorm or Keras.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently half-grey
SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini", "._.ds_store", "ehthumbs.db", ".directory",
                "icon\r"}  # OS litter found in real folders (macOS, Windows Explorer, KDE)
RESIZE_MODES = ("stretch", "pad")
DENOISE_MODES = ("none", "median", "gaussian")


class Rejected(Exception):
    """An input that cannot become a training image; `str(e)` is the reason shown to the user."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 128  # side of the square output; the model's input size
    channels: int = 1  # 1 = grayscale (MRI, X-ray), 3 = RGB (ImageNet-pretrained models)
    resize: str = "pad"  # pad keeps the aspect ratio (anatomy undistorted); stretch fills the square
    denoise: str = "none"  # none | median (3x3, salt-and-pepper) | gaussian (sigma 0.8, sensor noise)
    draft: bool = True  # JPEG draft mode: decode at reduced scale when the target is small (2-4x faster)
    min_side: int = 16  # smaller images carry no usable anatomy: rejected, not upsampled
    max_pixels: int = 100_000_000  # declared sizes above this are rejected (decompression bombs)

    def __post_init__(self):
        problems = []
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            problems.append(f"preprocess.image_size={self.image_size!r} must be an integer in 8..4096")
        if self.channels not in (1, 3):
            problems.append(f"preprocess.channels={self.channels!r} must be 1 or 3")
        if self.resize not in RESIZE_MODES:
            problems.append(f"preprocess.resize={self.resize!r} must be one of {', '.join(RESIZE_MODES)}")
        if self.denoise not in DENOISE_MODES:
            problems.append(f"preprocess.denoise={self.denoise!r} must be one of {', '.join(DENOISE_MODES)}")
        if self.min_side < 1 or self.max_pixels < 1:
            problems.append("preprocess.min_side and preprocess.max_pixels must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_mapping(cls, m) -> "PreprocessConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(m) - names
        if unknown:
            raise ValueError(f"unknown preprocess option(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**{k: m[k] for k in m})

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def is_system_file(path: str) -> bool:
    """OS litter: .DS_Store, Thumbs.db, ..., and macOS AppleDouble companions (`._scan.jpg`, from zips and
    non-Mac filesystems), which carry a resource fork, never pixels."""
    name = os.path.basename(path)
    return name.lower() in SYSTEM_FILES or name.startswith("._")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_bytes(path: str) -> bytes:
    """The file's bytes, or Rejected with the OS's reason (permissions, symlink loops, directories)."""
    if is_system_file(path):
        raise Rejected("system file, not an image")
    try:
        mode = os.stat(path).st_mode  # follows symlinks: what open() would read
        if not stat.S_ISREG(mode):  # a FIFO would block the task forever, /dev/zero would never end
            kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a regular file")
            raise Rejected(f"not a regular file: {kind}")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Rejected(f"unreadable: {e.strerror or type(e).__name__}") from None
    if not data:
        raise Rejected("empty file (0 bytes)")
    return data


def content_hash(data: bytes) -> str:
    """Identity of an image's content: equal files land in the same split whatever their names."""
    return hashlib.sha1(data).hexdigest()


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit and float images (DICOM exports, 16-bit PNG): min-max window to 0..255."""
    arr = np.asarray(img, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> L or RGB. Transparency is flattened onto black, the background of a scan."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        img = _flatten_alpha(img)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """RGBA/LA composited onto black: colour scaled by alpha."""
    arr = np.asarray(img, dtype=np.float32)
    out = (arr[..., :-1] * arr[..., -1:] / 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(out if out.shape[-1] == 3 else out[..., 0])


def decode(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """Image file bytes (any format PIL reads, whatever the file's extension) -> uint8 (H, W, C)."""
    try:
        with warnings.catch_warnings():
            # preprocess.max_pixels decides, right after the header is read (below), not Pillow's own warning
            # at 89 M pixels; Pillow's hard limit (twice that) still raises DecompressionBombError in open().
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise Rejected(f"too large: declared {w}x{h} exceeds preprocess.max_pixels={cfg.max_pixels}")
            if min(w, h) < cfg.min_side:
                raise Rejected(f"too small: {w}x{h}, below preprocess.min_side={cfg.min_side}")
            if cfg.draft and img.format == "JPEG":
                img.draft("L" if cfg.channels == 1 else "RGB", (cfg.image_size, cfg.image_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image: no decoder recognises its content") from None
    except Image.DecompressionBombError as e:
        raise Rejected(_bomb_reason(e, cfg)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's ways of saying 'corrupt'
        raise Rejected(f"corrupt or truncated: {e}") from None
    img = _to_mode(img, cfg.channels)
    size = (cfg.image_size, cfg.image_size)
    if cfg.resize == "pad":
        img = ImageOps.pad(img, size, method=Image.BILINEAR, color=0)
    elif img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if cfg.denoise == "median":
        img = img.filter(ImageFilter.MedianFilter(3))
    elif cfg.denoise == "gaussian":
        img = img.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(img, dtype=np.uint8).reshape(cfg.shape)


def _bomb_reason(e: Exception, cfg: PreprocessConfig) -> str:
    """Pillow refused the header before our own check could run: say so in the terms of preprocess.max_pixels."""
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    if not m:
        return f"too large: {e} (preprocess.max_pixels={cfg.max_pixels})"
    declared, hard = int(m.group(1)), int(m.group(2))
    if declared > cfg.max_pixels:
        return f"too large: declared {declared} pixels exceeds preprocess.max_pixels={cfg.max_pixels}"
    return (f"too large: declared {declared} pixels exceeds Pillow's hard limit of {hard} "
            f"(PIL.Image.MAX_IMAGE_PIXELS x 2; preprocess.max_pixels={cfg.max_pixels} cannot raise it)")


def load(path: str, cfg: PreprocessConfig) -> np.ndarray:
    """read_bytes + decode: the whole per-file transform."""
    return decode(read_bytes(path), cfg)
