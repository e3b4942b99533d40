"""NIfTI volumes: file bytes (.nii, or gzip-compressed .nii.gz) -> 2D slices as windowed uint8 arrays, or Rejected.

A volume is read with nibabel from memory (NIfTI-1 or NIfTI-2), turned to the closest canonical orientation (RAS:
slice_axis 0 = sagittal, 1 = coronal, 2 = axial), its first volume kept when it is 4D (fMRI, DWI: a time or
direction series, not a label per volume), windowed once per volume at `preprocess.percentiles` (or at
`preprocess.window` when set: CT volumes in Hounsfield units), and cut into the
slices that `preprocess.slices` keeps. Slices are shown the way viewers show them (np.rot90 of the canonical
array: anterior/superior up). gzip is inflated with a bound of preprocess.max_decoded_mb, so a small .nii.gz that
inflates to gigabytes is rejected after reading that much, never more.

nibabel is imported inside the functions so that PIL-only workers never load it.
"""
from __future__ import annotations

import zlib

import numpy as np

from medspark.data.preprocess import MB, PreprocessConfig, Rejected, check_dims, percentile_window, scale

_HEADER = 548  # NIfTI-2 header (540) + extension flag (4) + slack; NIfTI-1 is 348 + 4
_N2_MAGIC = (b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n")


def is_nifti(data: bytes) -> bool:
    """NIfTI-1 or NIfTI-2 bytes, plain or gzip-compressed (judged from the header, never the file name)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = zlib.decompressobj(wbits=31).decompress(data[:65536], _HEADER)
        except zlib.error:
            return False
    return _version(data) is not None


def _version(head: bytes) -> int | None:
    """1 or 2 from the header's size and magic (either byte order), else None."""
    for order in ("little", "big"):
        size = int.from_bytes(head[0:4], order) if len(head) >= 4 else 0
        if size == 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
            return 1
        if size == 540 and head[4:12] in _N2_MAGIC:
            return 2
    return None


def inflate(data: bytes, max_mb: float) -> bytes:
    """gzip bytes -> their content, reading at most max_mb decompressed megabytes (a gz bomb stops there)."""
    limit = int(max_mb * MB)
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise Rejected(f"corrupt gzip data: {e}") from None
    if len(out) > limit:
        raise Rejected(f"gzip content over preprocess.max_decoded_mb={max_mb} MB when decompressed")
    if not d.eof:
        raise Rejected("truncated gzip data: the compressed stream ends before its end marker")
    return out


def load(data: bytes, cfg: PreprocessConfig):
    """NIfTI bytes -> (3D float32 canonical volume, its voxel sizes in mm); the size guards run on the header."""
    import nibabel as nib

    raw = inflate(data, cfg.max_decoded_mb) if data[:2] == b"\x1f\x8b" else data
    version = _version(raw[:_HEADER])
    if version is None:
        raise Rejected("not a NIfTI file: no NIfTI-1/2 header")
    if raw[344:348] == b"ni1\0" or raw[4:8] == b"ni2\0":
        raise Rejected("a NIfTI header without its image (.hdr/.img pair): convert it to a single .nii file")
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    try:
        img = cls.from_bytes(raw)
        shape = tuple(int(n) for n in img.header.get_data_shape())
    except Exception as e:  # nibabel's many ways of saying 'corrupt header'
        raise Rejected(f"corrupt NIfTI header ({type(e).__name__}): {str(e)[:100]}") from None
    if any(n > 1 for n in shape[4:]) or len(shape) < 2 or min(shape) < 1:
        raise Rejected(f"not a 2D/3D/4D image volume: dimensions {shape} (CIFTI or other N-D data)")
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels * 4 / MB > cfg.max_decoded_mb:
        raise Rejected(f"too large to decode: volume {'x'.join(map(str, shape[:3]))} as float32 takes "
                       f"{voxels * 4 / MB:.0f} MB, over preprocess.max_decoded_mb={cfg.max_decoded_mb}")
    try:
        if len(shape) >= 4:
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]  # 4D: the first volume
        elif len(shape) == 2:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine)
        img = nib.as_closest_canonical(img)
        vol = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as e:  # truncated data, bad affine, unreadable dtype
        raise Rejected(f"NIfTI data cannot be read ({type(e).__name__}): {str(e)[:100]}") from None
    finite = np.isfinite(vol)
    if not finite.all():
        if not finite.any():
            raise Rejected("NIfTI volume has no finite voxel (all NaN/inf)")
        vol[~finite] = vol[finite].min()
    return vol, zooms


def select_slices(vol: np.ndarray, cfg: PreprocessConfig) -> list[int]:
    """The slice indices along cfg.slice_axis that preprocess.slices keeps."""
    n = vol.shape[cfg.slice_axis]
    if cfg.slices == "central":
        k = min(cfg.num_slices, n)
        return list(range((n - k) // 2, (n - k) // 2 + k))
    if cfg.slices == "foreground":
        low = float(np.percentile(vol, cfg.percentiles[0]))
        other = tuple(a for a in range(3) if a != cfg.slice_axis)
        fraction = (vol > low).mean(axis=other)
        keep = [i for i in range(n) if fraction[i] > cfg.min_foreground]
        if not keep:
            raise Rejected(f"no slice has more than preprocess.min_foreground={cfg.min_foreground} of its pixels "
                           f"above the volume's {cfg.percentiles[0]} percentile")
        return keep
    return list(range(n))


def slices(data: bytes, cfg: PreprocessConfig) -> list[tuple[int, np.ndarray, tuple[float, float]]]:
    """NIfTI bytes -> [(slice index, uint8 (H, W), (row, column) pixel spacing in mm)] (see the module docstring)."""
    from medspark.data.dicom import quiet

    with quiet("nibabel"):  # its header warnings may quote the free-text fields (descrip, aux_file)
        try:
            vol, zooms = load(data, cfg)
        except (Rejected, MemoryError, ImportError):
            raise
        except Exception as e:  # what load's own checks did not foresee: still this file's problem only
            raise Rejected(f"NIfTI cannot be read ({type(e).__name__}: malformed or unusual header)") from None
    p, q = (a for a in range(3) if a != cfg.slice_axis)  # the slice's axes; rot90 puts q on rows (reversed)
    check_dims(vol.shape[p], vol.shape[q], cfg)
    chosen = select_slices(vol, cfg)
    if cfg.window is not None:  # a CT volume in Hounsfield units (dcm2niix output) takes the DICOM windows too
        from medspark.data.dicom import window, window_of

        center, width = window_of(cfg.window)
        u8 = lambda s: window(s, center, width)  # noqa: E731
    else:
        lo, hi = percentile_window([vol], cfg.percentiles)
        u8 = lambda s: scale(s, lo, hi)  # noqa: E731
    return [(i, np.ascontiguousarray(np.rot90(u8(np.take(vol, i, axis=cfg.slice_axis)))), (zooms[q], zooms[p]))
            for i in chosen]
