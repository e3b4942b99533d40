"""DICOM pixels: file bytes -> each chosen frame as a windowed uint8 array, or Rejected with the reason.

The pixel pipeline of DICOM PS3.3 C.11, in order: the Modality LUT (RescaleSlope/Intercept or a Modality LUT
Sequence: stored values -> modality units, e.g. Hounsfield), then the VOI transform to 0..255 (the window of
`preprocess.window`: a preset or [center, width]; else the file's own WindowCenter/Width or VOI LUT; else a
percentile window), then MONOCHROME1 inverted (0 is white there). Colour (RGB, YBR_*, PALETTE COLOR) becomes RGB
and takes no window. Sizes are judged from the header (Rows x Columns x frames x bits) before pixel data is decoded.

pydicom is imported inside the functions so that workers that only ever see JPEGs/PNGs never load it. No tag value
(PatientName, ids, dates) is ever put into a reason or a log line: reasons say what is wrong, never who.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from medspark.data.preprocess import MB, PreprocessConfig, Rejected, check_dims, percentile_window, scale, to_uint8

# Window presets [center, width] in Hounsfield units (CT), the values radiology viewers ship with.
PRESETS = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
}
DICOMDIR_UID = "1.2.840.10008.1.3.10"
_NO_PIXELS = {"SR": "a structured report (SR)", "RTPLAN": "an RT plan", "RTSTRUCT": "an RT structure set",
              "ECG": "an ECG waveform", "HD": "a waveform", "KO": "a key object selection",
              "PR": "a presentation state",
              "REG": "a registration", "RTRECORD": "an RT treatment record", "DOC": "an encapsulated document"}
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then 'DICM'."""
    return data[128:132] == b"DICM"


def is_bare_dataset(data: bytes) -> bool:
    """A DICOM data set written without preamble and file meta (old modalities, some exports): its first element
    is a tag of group 0x0008 (or 0x0002) in little or big endian, followed by an explicit VR or a plausible
    implicit length. Checked only after 'DICM' and the NIfTI headers."""
    if len(data) < 8:
        return False
    for order in ("little", "big"):
        group, element = int.from_bytes(data[0:2], order), int.from_bytes(data[2:4], order)
        if group in (0x0002, 0x0008) and element < 0x0200:
            if data[4:6] in _VRS or int.from_bytes(data[4:8], "little") < min(len(data), 1 << 16):
                return True
    return False


@contextlib.contextmanager
def quiet(*loggers: str):
    """pydicom's (and nibabel's) warnings and log records quote offending values ("Invalid value for VR ...:
    '<value>'"), which may be a patient's name or id: silenced while a file is read, never printed."""
    logs = [logging.getLogger(name) for name in (loggers or ("pydicom",))]
    before = [log.disabled for log in logs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in logs:
            log.disabled = True
        try:
            yield
        finally:
            for log, was in zip(logs, before):
                log.disabled = was


def read(data: bytes):
    """The data set of a DICOM file's bytes (files without preamble/file meta are read with force, see
    is_bare_dataset); Rejected when pydicom cannot parse it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
        _set_transfer_syntax(ds)
        return ds
    except (InvalidDicomError, EOFError) as e:
        raise Rejected(f"not a readable DICOM file: {_short(e)}") from None
    except Exception as e:  # pydicom's parser raises many types on garbage; the reason names the type only
        raise Rejected(f"corrupt DICOM header ({type(e).__name__})") from None


def _set_transfer_syntax(ds) -> None:
    """A data set without file meta (or without its Transfer Syntax UID) is uncompressed: its syntax is the encoding
    pydicom found while parsing it (implicit/explicit VR, byte order); the pixel decoder needs it named."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def read_tags(path: str, keywords) -> dict[str, str]:
    """The named tags of one DICOM file (e.g. PatientID, SOPInstanceUID), read without its pixel data; a missing
    or unreadable tag is "". Values are returned to the caller only: never log them (they may be PHI)."""
    import pydicom

    with quiet():
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(keywords))
        except Exception:
            return {k: "" for k in keywords}
        out = {}
        for k in keywords:
            try:
                v = ds.get(k, "")
                out[k] = "" if v is None else str(v).strip()
            except Exception:
                out[k] = ""
    return out


def frames(data: bytes, cfg: PreprocessConfig) -> list[tuple[int, np.ndarray, tuple[float, float] | None]]:
    """DICOM bytes -> [(frame index, uint8 (H, W) or (H, W, 3), (row, column) pixel spacing in mm or None)] for the
    frames that preprocess.multi_frame selects, windowed (see the module docstring)."""
    with quiet():
        try:
            return _frames(data, cfg)
        except (Rejected, MemoryError, ImportError):
            raise
        except Exception as e:  # a malformed value met later than the header checks: still this file's problem only
            raise Rejected(f"DICOM cannot be decoded ({type(e).__name__}: malformed or unusual header)") from None


def _frames(data: bytes, cfg: PreprocessConfig) -> list[tuple[int, np.ndarray, tuple[float, float] | None]]:
    ds = read(data)
    count = _check(ds, cfg)
    spacing = pixel_spacing(ds)
    if cfg.pixel_spacing_mm is not None and spacing is None:
        raise Rejected(f"no PixelSpacing or ImagerPixelSpacing: cannot resample to preprocess.pixel_spacing_mm="
                       f"{cfg.pixel_spacing_mm} (set it to null to keep each file's pixel size)")
    raw = [(i, _pixels(ds, None if count == 1 else i)) for i in select_frames(count, cfg.multi_frame)]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in _COLOUR or int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        return [(i, _colour(a, ds, photometric), spacing) for i, a in raw]
    values = [modality(a, ds) for i, a in raw]
    out = voi(values, ds, cfg)
    if photometric == "MONOCHROME1":
        out = [255 - o for o in out]
    return [(i, o, spacing) for (i, _), o in zip(raw, out)]


def select_frames(count: int, mode: str) -> list[int]:
    """The frame indices that preprocess.multi_frame keeps of a file with `count` frames."""
    if count <= 1:
        return [0]
    if mode == "reject":
        raise Rejected(f"multi-frame file ({count} frames), not one image; preprocess.multi_frame=first | middle | "
                       f"all would use its first, middle or every frame")
    return {"first": [0], "middle": [count // 2]}.get(mode, list(range(count)))


def _check(ds, cfg: PreprocessConfig) -> int:
    """Everything the header tells before pixels are decoded: an image at all, its sizes; returns the frame count."""
    meta = getattr(ds, "file_meta", None)
    sop = str((meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or "")
    if sop == DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        raise Rejected("a DICOMDIR index, not an image")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = _NO_PIXELS.get(str(ds.get("Modality", "")).strip().upper())
        raise Rejected(f"no pixel data: {kind}, not an image" if kind else "no pixel data (not an image object)")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise Rejected(f"incomplete image header: pixel data without {', '.join(missing)}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits, samples = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1) or 1)
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (ValueError, TypeError) as e:  # a malformed value (wrong VR, garbage digits)
        raise Rejected(f"malformed image header value ({type(e).__name__}: wrong VR or corrupt)") from None
    check_dims(cols, rows, cfg)
    # the kept frames as decoded, or their float32 working copy (what peaks in memory), whichever is larger
    size = len(select_frames(count, cfg.multi_frame)) * rows * cols * samples * max(bits, 32) // 8
    if size / MB > cfg.max_decoded_mb:
        raise Rejected(f"too large to decode: {cols}x{rows} x {count} frame(s) x {samples} sample(s) x {bits} bits "
                       f"takes {size / MB:.0f} MB, over preprocess.max_decoded_mb={cfg.max_decoded_mb}")
    return count


def _pixels(ds, index: int | None) -> np.ndarray:
    """One frame's stored values (YBR converted to RGB by pydicom), or Rejected with the decoder's reason."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except (NotImplementedError, RuntimeError) as e:  # no plugin for the transfer syntax / every plugin failed
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise Rejected(f"unsupported or broken compressed pixel data ({name}): {_short(e)}") from None
    except ValueError as e:
        if "less than expected" in str(e) or "truncated" in str(e).lower():
            raise Rejected("truncated pixel data: fewer bytes than Rows x Columns x frames declare") from None
        raise Rejected(f"pixel data cannot be decoded: {_short(e)}") from None
    except BaseException as e:  # a Rust decoder's panic (pylibjpeg-rle on a garbled stream) is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise Rejected(f"pixel data cannot be decoded ({type(e).__name__}): {_short(e)}") from None


def modality(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality units (float32): RescaleSlope/Intercept or the Modality LUT Sequence."""
    from pydicom.pixels import apply_modality_lut

    try:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    except Exception as e:
        raise Rejected(f"invalid Modality LUT / rescale ({type(e).__name__})") from None


def voi(values: list[np.ndarray], ds, cfg: PreprocessConfig) -> list[np.ndarray]:
    """Modality values -> uint8 through the VOI transform: preprocess.window (preset or [center, width]), else the
    file's VOI LUT Sequence or WindowCenter/Width (its first view), else one percentile window over the frames."""
    if cfg.window is not None:
        center, width = window_of(cfg.window)
        return [window(v, center, width) for v in values]
    if ds.get("VOILUTSequence"):
        return [_voi_lut(v, ds) for v in values]
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            return [window(v, center, width, function) for v in values]
        except (ValueError, TypeError):
            pass  # an unusable file window (width 0, garbage): the percentile window below, as if none
    lo, hi = percentile_window(values, cfg.percentiles)
    return [scale(v, lo, hi) for v in values]


def window_of(setting) -> tuple[float, float]:
    """preprocess.window -> (center, width): a preset name or a [center, width] pair."""
    if isinstance(setting, str):
        return PRESETS[setting.lower()]
    return float(setting[0]), float(setting[1])


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) mapped to 0..255 as uint8."""
    v = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError("window width must be > 0")
        out = 255.0 / (1 + np.exp(-4 * (v - center) / width))
    elif function in ("LINEAR", "LINEAR_EXACT"):
        if function == "LINEAR":
            if width < 1:
                raise ValueError("window width must be >= 1")
            center, width = center - 0.5, width - 1
        if width <= 0:
            raise ValueError("window width must be > 0")
        out = ((v - center) / width + 0.5) * 255.0
        out[v <= center - width / 2] = 0
        out[v > center + width / 2] = 255
    else:
        raise ValueError(f"unsupported VOILUTFunction {function}")
    return to_uint8(out)


def _voi_lut(values: np.ndarray, ds) -> np.ndarray:
    """The file's VOI LUT (first of the sequence) applied by pydicom, its output range mapped to 0..255."""
    from pydicom.pixels import apply_voi

    try:
        item = ds.VOILUTSequence[0]
        out = np.asarray(apply_voi(values, ds, 0), dtype=np.float64)
        lut = np.asarray(item.LUTData if not isinstance(item.LUTData, bytes) else [], dtype=np.float64)
        lo, hi = (float(lut.min()), float(lut.max())) if lut.size else (float(out.min()), float(out.max()))
    except Exception as e:
        raise Rejected(f"invalid VOI LUT Sequence ({type(e).__name__})") from None
    return scale(out, lo, hi)


def _colour(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Colour pixels -> uint8 RGB: PALETTE COLOR through its LUTs, samples of more than 8 bits scaled down."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise Rejected(f"invalid palette colour lookup tables ({type(e).__name__})") from None
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 255.0
    else:
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
    if arr.dtype == np.uint8 and top == 255:
        return np.ascontiguousarray(arr)
    return scale(arr, 0.0, top)


def pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None when absent or unusable."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(key)
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def _first(value) -> float:
    """A multi-valued DS (several windows = several views): the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _short(e: Exception) -> str:
    """An exception's first line, cut to 120 characters (pydicom's messages never quote tag values)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]
