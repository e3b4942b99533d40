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
MULTI_FRAME = ("reject", "first", "middle", "all")  # middle/all: DICOM frames; a GIF/TIFF's pages -> first
SLICE_MODES = ("all", "central", "foreground")  # NIfTI: which 2D slices of a volume become images
WINDOW_PRESETS = ("brain", "subdural", "stroke", "lung", "mediastinum", "bone", "abdomen", "liver")  # dicom.PRESETS
MB = 1_000_000  # the *_mb settings count decimal megabytes, as serving's limits do


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
    max_aspect: float = 10  # longer side / shorter side above this is rejected: a sliver pads to a black square
    multi_frame: str = "reject"  # reject | first | middle | all: DICOM frames (GIF/TIFF pages: not reject = first)
    max_decoded_mb: float = 128  # declared pixels x bytes per pixel above this is rejected before decoding
    max_file_mb: float = 128  # bigger files are rejected from their size, before a byte is read
    window: object = None  # DICOM VOI: None (the file's window, else percentiles) | [center, width] | a preset name
    percentiles: tuple = (0.5, 99.5)  # the percentile window (DICOM without a window; every NIfTI volume)
    pixel_spacing_mm: float | None = None  # DICOM: resample to this mm/pixel (PixelSpacing) before the resize
    slice_axis: int = 2  # NIfTI: slices along this axis of the canonical (RAS) volume; 2 = axial
    slices: str = "all"  # NIfTI: all | central (the num_slices central ones) | foreground (see min_foreground)
    num_slices: int = 8  # NIfTI slices=central: how many central slices
    min_foreground: float = 0.1  # NIfTI slices=foreground: fraction of pixels above the volume's low percentile

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
        if not _number(self.max_aspect) or self.max_aspect < 1:
            problems.append(f"preprocess.max_aspect={self.max_aspect!r} must be a number >= 1 (longer side / shorter)")
        if self.multi_frame not in MULTI_FRAME:
            problems.append(f"preprocess.multi_frame={self.multi_frame!r} must be one of {', '.join(MULTI_FRAME)}")
        for key in ("max_decoded_mb", "max_file_mb"):
            if not _number(getattr(self, key)) or getattr(self, key) <= 0:
                problems.append(f"preprocess.{key}={getattr(self, key)!r} must be a positive number of MB")
        problems += self._medical_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _medical_problems(self) -> list[str]:
        """The DICOM/NIfTI settings' problems, one line each (window, percentiles, spacing, slices)."""
        problems = []
        w = self.window
        if w is not None and not (isinstance(w, str) and w.lower() in WINDOW_PRESETS) and not (
                isinstance(w, (list, tuple)) and len(w) == 2 and all(_number(x) for x in w) and w[1] >= 1):
            problems.append(f"preprocess.window={w!r} must be null (the file's own window), [center, width] with "
                            f"width >= 1, or a preset: {', '.join(WINDOW_PRESETS)}")
        p = self.percentiles
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_number(x) for x in p)
                and 0 <= p[0] < p[1] <= 100):
            problems.append(f"preprocess.percentiles={p!r} must be [low, high] with 0 <= low < high <= 100")
        s = self.pixel_spacing_mm
        if s is not None and (not _number(s) or not 0.01 <= s <= 100):
            problems.append(f"preprocess.pixel_spacing_mm={s!r} must be null (keep each file's pixel size) or a "
                            f"number of mm per pixel in 0.01..100")
        if self.slice_axis not in (0, 1, 2) or isinstance(self.slice_axis, bool):
            problems.append(f"preprocess.slice_axis={self.slice_axis!r} must be 0, 1 or 2 (2 = axial)")
        if self.slices not in SLICE_MODES:
            problems.append(f"preprocess.slices={self.slices!r} must be one of {', '.join(SLICE_MODES)}")
        if not isinstance(self.num_slices, int) or isinstance(self.num_slices, bool) or self.num_slices < 1:
            problems.append(f"preprocess.num_slices={self.num_slices!r} must be an integer >= 1")
        if not _number(self.min_foreground) or not 0 <= self.min_foreground < 1:
            problems.append(f"preprocess.min_foreground={self.min_foreground!r} must be a fraction in [0, 1)")
        return problems

    @classmethod
    def from_mapping(cls, m) -> "PreprocessConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(m) - names
        if unknown:
            raise ValueError(f"unknown preprocess option(s) {sorted(unknown)}; valid: {sorted(names)}")
        values = {k: m[k] for k in m}
        for key in ("window", "percentiles"):  # lists from YAML/OmegaConf -> hashable tuples (frozen config)
            if not isinstance(values.get(key), (str, type(None))) and hasattr(values[key], "__len__"):
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_system_file(path: str) -> bool:
    """OS litter: .DS_Store, Thumbs.db, ..., and macOS AppleDouble companions (`._scan.jpg`, from zips and
    non-Mac filesystems), which carry a resource fork, never pixels."""
    name = os.path.basename(path)
    return name.lower() in SYSTEM_FILES or name.startswith("._")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_bytes(path: str, max_file_mb: float = PreprocessConfig.max_file_mb) -> bytes:
    """The file's bytes, or Rejected with the OS's reason (permissions, symlink loops, directories) or its size
    (over max_file_mb: judged from the directory entry, so a 600 MB file costs no read and no memory)."""
    if is_system_file(path):
        raise Rejected("system file, not an image")
    try:
        st = os.stat(path)  # follows symlinks: what open() would read
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the task forever, /dev/zero would never end
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise Rejected(f"not a regular file: {kind}")
        _check_size(st.st_size, max_file_mb)
        with open(path, "rb") as f:
            data = f.read()  # sized from the file's length: a bounded read argument would allocate the bound
    except OSError as e:
        raise Rejected(f"unreadable: {e.strerror or type(e).__name__}") from None
    if not data:
        raise Rejected("empty file (0 bytes)")
    _check_size(len(data), max_file_mb)  # a file that grew since stat
    return data


def _check_size(size: int, max_file_mb: float) -> None:
    if size > max_file_mb * MB:
        raise Rejected(f"file too large: {size / MB:.0f} MB, over preprocess.max_file_mb={max_file_mb}")


def content_hash(data: bytes) -> str:
    """Identity of an image's content: equal files land in the same split whatever their names."""
    return hashlib.sha1(data).hexdigest()


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit and float images (DICOM exports, 16-bit PNG): min-max window to 0..255."""
    arr = np.array(img, dtype=np.float32)  # one float copy, then in place: peak 2 copies, not 5 (7000x7000: 0.4 GB)
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr -= lo
        arr *= 255.0 / (hi - lo)
        arr += 0.5
        np.clip(arr, 0, 255, out=arr)
    else:
        arr[...] = 0
    return Image.fromarray(arr.astype(np.uint8))


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
    """Image file bytes (any format PIL reads, whatever the file's extension) -> uint8 (H, W, C). The header is
    judged before any pixel is decoded (sizes, aspect, frames, decoded memory); a JPEG that the decoder finished
    before the end of its data is rejected after decoding (see _JpegFence). DICOM and NIfTI bytes give the first
    image of decode_frames (serving: one image in, one prediction out)."""
    _check_size(len(data), cfg.max_file_mb)
    if is_medical(data):
        return decode_frames(data, cfg)[0][1]
    fence = _JpegFence.of(data)
    try:
        with warnings.catch_warnings():
            # preprocess.max_pixels decides, right after the header is read (below), not Pillow's own warning
            # at 89 M pixels; Pillow's hard limit (twice that) still raises DecompressionBombError in open().
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fence or io.BytesIO(data))
            _check_header(img, cfg)
            if cfg.draft and img.format == "JPEG":
                img.draft("L" if cfg.channels == 1 else "RGB", (cfg.image_size, cfg.image_size))
            w, h = img.size  # after draft: what will be decoded
            decoded_mb = w * h * bytes_per_pixel(img.mode) / MB
            if decoded_mb > cfg.max_decoded_mb:
                raise Rejected(f"too large to decode: {w}x{h} {img.mode} takes {decoded_mb:.0f} MB, over "
                               f"preprocess.max_decoded_mb={cfg.max_decoded_mb}")
            img.load()
            if fence is not None and not fence.reached:
                raise Rejected("corrupt JPEG data: the image was complete before the end of its data (bytes "
                               "garbled or inserted mid-file)")
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image: no decoder recognises its content") from None
    except Image.DecompressionBombError as e:
        raise Rejected(_bomb_reason(e, cfg)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's ways of saying 'corrupt'
        raise Rejected(f"corrupt or truncated: {e}") from None
    return finish(img, cfg)


def finish(img: Image.Image, cfg: PreprocessConfig, keep_scale: bool = False) -> np.ndarray:
    """A decoded image (any mode) -> uint8 (H, W, C): channels, resize or pad to the square, denoise. The one last
    step of every format (PIL images, DICOM frames, NIfTI slices). keep_scale (images resampled to
    preprocess.pixel_spacing_mm): centred crop or black padding to the square, never scaled, so that a pixel stays
    pixel_spacing_mm wide and the field of view is image_size x pixel_spacing_mm."""
    img = _to_mode(img, cfg.channels)
    size = (cfg.image_size, cfg.image_size)
    if keep_scale:
        left, top = (img.size[0] - size[0]) // 2, (img.size[1] - size[1]) // 2
        img = img.crop((left, top, left + size[0], top + size[1]))  # outside the image: black
    elif cfg.resize == "pad":
        img = ImageOps.pad(img, size, method=Image.BILINEAR, color=0)
    elif img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if cfg.denoise == "median":
        img = img.filter(ImageFilter.MedianFilter(3))
    elif cfg.denoise == "gaussian":
        img = img.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(img, dtype=np.uint8).reshape(cfg.shape)


def _check_header(img: Image.Image, cfg: PreprocessConfig) -> None:
    """What the header alone tells: declared size, aspect ratio, frames."""
    check_dims(*img.size, cfg)
    # MPO (camera JPEGs carrying a preview or a second view) is not a series: its first image is the photo
    if cfg.multi_frame == "reject" and img.format != "MPO" and getattr(img, "n_frames", 1) > 1:
        raise Rejected(f"multi-frame file ({img.n_frames} frames: animation or pages), not one image; "
                       f"preprocess.multi_frame=first would use its first frame")


def check_dims(w: int, h: int, cfg: PreprocessConfig) -> None:
    """Declared width x height against max_pixels, min_side and max_aspect (every format, before decoding)."""
    if w * h > cfg.max_pixels:
        raise Rejected(f"too large: declared {w}x{h} exceeds preprocess.max_pixels={cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise Rejected(f"too small: {w}x{h}, below preprocess.min_side={cfg.min_side}")
    if max(w, h) > cfg.max_aspect * min(w, h):
        raise Rejected(f"extreme aspect ratio: {w}x{h} ({max(w, h) / min(w, h):.0f}:1), over "
                       f"preprocess.max_aspect={cfg.max_aspect}")


def bytes_per_pixel(mode: str) -> int:
    """Bytes of one pixel of a Pillow mode as decoded (RGB 3, RGBA and 32-bit 4, 16-bit 2); unknown modes 4."""
    from PIL import ImageMode

    try:
        desc = ImageMode.getmode(mode)
    except KeyError:
        return 4
    return np.dtype(desc.typestr).itemsize * len(desc.bands)


_MARKER = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])")  # in entropy-coded data: a marker, not a stuffed byte/RST


class _JpegFence(io.BytesIO):
    """A baseline JPEG's bytes, read in two parts: up to 2 bytes before the marker that ends its scan, then the rest.

    Pillow's JPEG decoder drops libjpeg's 'Corrupt JPEG data' warnings (JpegDecode.c), so bytes garbled mid-file
    decode to garbage silently. One trace is left: an intact scan needs its very last bytes to finish, so the
    decoder must ask for the second part. Garbled bytes throw its Huffman decoding off, and most often it then
    runs out of rows with data left over and never asks: `reached` stays False (same decode, no second pass).
    With Pillow's own errors, 2 in 3 to nearly all random 40-byte garbles are caught (tests/test_preprocess.py);
    garbling that resynchronises, or makes the scan run long, stays undetectable without libjpeg's warnings."""

    def __init__(self, data: bytes, fence: int):
        super().__init__(data)
        self.fence, self.reached = fence, False

    def read(self, n: int | None = -1) -> bytes:
        pos = self.tell()
        if pos < self.fence and (n is None or n < 0 or pos + n > self.fence):
            n = self.fence - pos
        self.reached = self.reached or pos >= self.fence
        return super().read(n)

    @classmethod
    def of(cls, data: bytes) -> "_JpegFence | None":
        """The fenced reader of a JPEG whose first scan ends at the end-of-image marker (baseline); None for
        anything else (other formats, progressive or multi-scan JPEGs, truncated scans: Pillow judges those)."""
        if not data.startswith(b"\xff\xd8"):
            return None
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF:  # header segments, by their lengths: an EXIF thumbnail's
            marker = data[i + 1]                         # own scan and end marker are skipped whole
            if marker == 0xFF:  # fill byte
                i += 1
            elif marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
                end = _MARKER.search(data, i + 2 + int.from_bytes(data[i + 2:i + 4], "big"))
                # fenced 2 bytes early: the last data byte carries bits of the last symbol, which an intact scan needs
                return cls(data, end.start() - 2) if end and data[end.start() + 1] == 0xD9 else None
            else:
                i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        return None


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


def decode_frames(data: bytes, cfg: PreprocessConfig) -> list[tuple[int, np.ndarray]]:
    """One file's bytes -> its training images [(frame, uint8 (H, W, C))]: frame 0 for a 2D image (PIL path,
    `decode`), the frame index of a multi-frame DICOM (cfg.multi_frame: first | middle | all), the slice index of
    a NIfTI volume (cfg.slices ...). Format sniffed from the bytes (DICOM: 'DICM' at 128, or a bare data set
    without preamble/file meta; NIfTI-1/2 headers, gzip-compressed .nii.gz), never from the file name.
    Raises Rejected(reason)."""
    _check_size(len(data), cfg.max_file_mb)
    from medspark.data import dicom, nifti  # lazy: they import this module; pydicom/nibabel load only when used

    try:
        if nifti.is_nifti(data):
            found = nifti.slices(data, cfg)
        elif dicom.is_dicom(data) or dicom.is_bare_dataset(data):
            found = dicom.frames(data, cfg)
        else:
            return [(0, decode(data, cfg))]
    except ImportError as e:  # an environment built without the medical extras (a served model's, say)
        raise Rejected(f"a DICOM/NIfTI file, but {e.name or 'its reader'} is not installed here (requirements.txt "
                       f"pins pydicom, the pylibjpeg plugins and nibabel)") from None
    scaled = cfg.pixel_spacing_mm is not None
    return [(i, finish(resample(Image.fromarray(a), spacing, cfg), cfg, keep_scale=scaled)) for i, a, spacing in found]


def percentile_window(values: list[np.ndarray], percentiles) -> tuple[float, float]:
    """The (low, high) percentiles of all the given arrays' values together (one window for a file's frames or a
    volume's slices, so that they stay comparable)."""
    flat = np.concatenate([np.ravel(v) for v in values]) if len(values) > 1 else np.ravel(values[0])
    lo, hi = np.percentile(flat, [float(percentiles[0]), float(percentiles[1])])
    return float(lo), float(hi)


def scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to 0..255 as uint8, clipped; a flat image (hi <= lo) is black."""
    if hi <= lo:
        return np.zeros(np.shape(values), dtype=np.uint8)
    return to_uint8((np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo)))


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Values already on the 0..255 scale -> uint8, rounded to nearest and clipped."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def is_medical(data: bytes) -> bool:
    """DICOM or NIfTI bytes (see decode_frames), judged from the content."""
    from medspark.data import dicom, nifti

    return dicom.is_dicom(data) or nifti.is_nifti(data) or dicom.is_bare_dataset(data)


def resample(img: Image.Image, spacing: tuple[float, float] | None, cfg: PreprocessConfig) -> Image.Image:
    """Resize to preprocess.pixel_spacing_mm per pixel from the (row, column) spacing in mm; unchanged when either
    is None. The resampled size answers to preprocess.max_pixels like a declared one (10 mm pixels at 0.1 mm)."""
    target = cfg.pixel_spacing_mm
    if spacing is None or target is None:
        return img
    w, h = img.size
    size = (max(1, round(w * spacing[1] / target)), max(1, round(h * spacing[0] / target)))
    if size[0] * size[1] > cfg.max_pixels:
        raise Rejected(f"too large once resampled: {w}x{h} at {spacing[1]}x{spacing[0]} mm is {size[0]}x{size[1]} at "
                       f"preprocess.pixel_spacing_mm={target}, over preprocess.max_pixels={cfg.max_pixels}")
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def load(path: str, cfg: PreprocessConfig) -> np.ndarray:
    """read_bytes + decode: the whole per-file transform."""
    return decode(read_bytes(path, cfg.max_file_mb), cfg)


def load_frames(path: str, cfg: PreprocessConfig) -> list[tuple[int, np.ndarray]]:
    """read_bytes + decode_frames: the whole per-file transform of every format."""
    return decode_frames(read_bytes(path, cfg.max_file_mb), cfg)
