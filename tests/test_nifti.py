"""NIfTI volumes -> slices on the real volumes that nibabel ships (nibabel/tests/data: anatomical and functional
volumes, 4D, NIfTI-2, a CIFTI file): each accepted with the slices nibabel's own loader gives after the same
transforms (canonical orientation, first volume, percentile window, within 1 grey level) or rejected with the
reason; slice modes and axes, gzip bombs and broken files. Pure functions: no Spark."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import nibabel as nib  # noqa: E402  (a dependency: a missing one fails here, never skips)

from medspark.data import nifti  # noqa: E402
from medspark.data.preprocess import PreprocessConfig, Rejected, decode_frames  # noqa: E402

DATA = Path(nib.__file__).parent / "tests" / "data"
OPEN = PreprocessConfig(image_size=32, min_side=1, max_aspect=100)
VOLUMES = sorted(p.name for p in DATA.iterdir() if p.name.endswith((".nii", ".nii.gz")))
REJECTED = {"row_major.dconn.nii": r"^not a 2D/3D/4D image volume: dimensions \(1, 1, 1, 1, 10, 10\)"}


def expected(path: Path, axis: int = 2, percentiles=(0.5, 99.5)) -> list[np.ndarray]:
    """nibabel's own reading of the file: canonical, first volume, percentile window, slices as viewers show them."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = img.get_fdata()
    while vol.ndim > 3:
        vol = vol[..., 0]
    vol[~np.isfinite(vol)] = np.nanmin(vol)  # NaN (outside a resampled field of view): the volume's minimum
    lo, hi = np.percentile(vol, percentiles)
    u8 = np.rint(np.clip((vol - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8)
    return [np.rot90(np.take(u8, i, axis=axis)) for i in range(vol.shape[axis])]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1


def test_nibabel_ships_the_volumes_these_tests_use():
    assert {"anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"} <= set(VOLUMES)


@pytest.mark.parametrize("name", VOLUMES)
def test_every_volume_in_nibabels_wheel_is_sliced_like_nibabel_or_rejected(name):
    data = (DATA / name).read_bytes()
    assert nifti.is_nifti(data)
    if name in REJECTED:
        with pytest.raises(Rejected, match=REJECTED[name]):
            decode_frames(data, OPEN)
        return
    got = nifti.slices(data, OPEN)
    want = expected(DATA / name)
    assert [i for i, _, _ in got] == list(range(len(want)))
    for (_, g, _), w in zip(got, want):
        assert_close(g, w)
    images = decode_frames(data, OPEN)
    assert [i for i, _ in images] == list(range(len(want)))
    assert all(a.shape == (32, 32, 1) and a.dtype == np.uint8 for _, a in images)


def test_4d_volume_gives_its_first_volume_only():
    path = DATA / "example4d.nii.gz"  # 128 x 96 x 24 x 2
    got = [g for _, g, _ in nifti.slices(path.read_bytes(), OPEN)]
    assert len(got) == 24
    img = nib.as_closest_canonical(nib.load(str(path)))
    second = img.get_fdata()[..., 1]
    lo, hi = np.percentile(second, (0.5, 99.5))
    other = [np.rot90(np.rint(np.clip((second[:, :, i] - lo) / (hi - lo) * 255, 0, 255))) for i in range(24)]
    assert any(np.abs(g.astype(int) - o.astype(int)).max() > 1 for g, o in zip(got, other))  # not volume 2


def test_nifti2_is_read():
    data = (DATA / "example_nifti2.nii.gz").read_bytes()
    assert nifti._version(gzip.decompress(data)[:548]) == 2
    assert len(nifti.slices(data, OPEN)) == 12


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_axis(axis):
    path = DATA / "anatomical.nii"  # 33 x 41 x 25
    got = nifti.slices(path.read_bytes(), PreprocessConfig(slice_axis=axis, min_side=1))
    want = expected(path, axis=axis)
    assert len(got) == len(want) == nib.as_closest_canonical(nib.load(str(path))).shape[axis]
    for (_, g, _), w in zip(got, want):
        assert_close(g, w)
    zooms = nib.as_closest_canonical(nib.load(str(path))).header.get_zooms()
    other = [a for a in range(3) if a != axis]
    assert got[0][2] == (zooms[other[1]], zooms[other[0]])  # rows follow the second in-plane axis (rot90)


def test_central_slices():
    data = (DATA / "anatomical.nii").read_bytes()  # 25 axial slices
    got = nifti.slices(data, PreprocessConfig(slices="central", num_slices=4, min_side=1))
    assert [i for i, _, _ in got] == [10, 11, 12, 13]
    assert [i for i, _, _ in nifti.slices(data, PreprocessConfig(slices="central", num_slices=99, min_side=1))] == \
        list(range(25))


def synthetic(shape=(40, 40, 20), cube=slice(5, 10), dtype=np.int16, zooms=(1.0, 1.0, 3.0)) -> bytes:
    """A NIfTI-1 volume: zeros with a bright block in slices `cube` along the last axis."""
    vol = np.zeros(shape, dtype=dtype)
    vol[8:32, 8:32, cube] = 1000
    img = nib.Nifti1Image(vol, np.diag([*zooms, 1.0]))
    return img.to_bytes()


def test_foreground_slices_are_those_with_tissue():
    data = synthetic()
    got = nifti.slices(data, PreprocessConfig(slices="foreground", min_foreground=0.1))
    assert [i for i, _, _ in got] == [5, 6, 7, 8, 9]  # 24 x 24 of 40 x 40 = 36 % above the background
    with pytest.raises(Rejected, match=r"no slice has more than preprocess.min_foreground=0.5"):
        nifti.slices(data, PreprocessConfig(slices="foreground", min_foreground=0.5))
    real = (DATA / "reoriented_anat_moved.nii").read_bytes()  # a head: 0 % to 63 % of each slice above background
    kept = [i for i, _, _ in nifti.slices(real, PreprocessConfig(slices="foreground", min_foreground=0.3, min_side=1))]
    vol = nib.as_closest_canonical(nib.load(str(DATA / "reoriented_anat_moved.nii"))).get_fdata()
    fraction = (vol > np.percentile(vol, 0.5)).mean(axis=(0, 1))
    assert kept == [i for i in range(vol.shape[2]) if fraction[i] > 0.3] and 0 < len(kept) < vol.shape[2]


def test_gzip_is_sniffed_from_content_and_plain_gzip_is_not_nifti():
    vol = synthetic()
    assert nifti.is_nifti(vol) and nifti.is_nifti(gzip.compress(vol))
    assert [i for i, _ in decode_frames(gzip.compress(vol), OPEN)] == list(range(20))
    not_nifti = gzip.compress(b"just text, not a volume" * 30)
    assert not nifti.is_nifti(not_nifti)
    with pytest.raises(Rejected, match="not an image"):
        decode_frames(not_nifti, OPEN)


def test_gzip_bomb_is_bounded_by_max_decoded_mb():
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512))  # 268 MB of int16 declared
    header.set_data_dtype(np.int16)
    bomb = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * (64 * 1_000_000), compresslevel=1)  # 64 MB
    assert len(bomb) < 1_000_000
    with pytest.raises(Rejected, match=r"gzip content over preprocess.max_decoded_mb=8 MB when decompressed"):
        decode_frames(bomb, PreprocessConfig(max_decoded_mb=8))
    with pytest.raises(Rejected, match=r"too large to decode: volume 512x512x512 as float32 takes 537 MB"):
        decode_frames(bomb, PreprocessConfig(max_decoded_mb=100))


def test_broken_volumes_are_rejected():
    data = synthetic()
    noise = nib.Nifti1Image(np.random.default_rng(0).integers(0, 999, (40, 40, 20), dtype=np.int16), np.eye(4))
    with pytest.raises(Rejected, match=r"^truncated gzip data"):
        decode_frames(gzip.compress(noise.to_bytes())[:-200], OPEN)
    with pytest.raises(Rejected, match=r"^NIfTI data cannot be read"):
        decode_frames(data[:len(data) // 2], OPEN)
    hdr = bytearray(data[:348])
    hdr[344:348] = b"ni1\0"  # the header of a .hdr/.img pair
    with pytest.raises(Rejected, match=r"NIfTI header without its image"):
        decode_frames(bytes(hdr) + b"\0" * 4, OPEN)
    nan = nib.Nifti1Image(np.full((20, 20, 3), np.nan, dtype=np.float32), np.eye(4)).to_bytes()
    with pytest.raises(Rejected, match=r"no finite voxel"):
        decode_frames(nan, OPEN)


def test_size_guards_and_spacing():
    data = synthetic(shape=(40, 20, 6), cube=slice(1, 3), zooms=(0.5, 2.0, 3.0))
    with pytest.raises(Rejected, match=r"too small: 40x20, below preprocess.min_side=32"):
        decode_frames(data, PreprocessConfig(min_side=32))
    got = nifti.slices(data, PreprocessConfig())
    assert got[0][1].shape == (20, 40) and got[0][2] == (2.0, 0.5)  # rows: y (2 mm), columns: x (0.5 mm)
    img = decode_frames(data, PreprocessConfig(image_size=64, pixel_spacing_mm=1.0))[1][1][..., 0]
    rows, cols = np.nonzero(img)  # the block 24 x 12 voxels: 12 mm x 24 mm at 1 mm per pixel
    assert abs((rows.max() - rows.min() + 1) - 24) <= 2 and abs((cols.max() - cols.min() + 1) - 12) <= 2


def test_nifti_bytes_decode_to_the_first_slice_for_serving():
    from medspark.data.preprocess import decode

    data = synthetic()
    assert np.array_equal(decode(data, OPEN), decode_frames(data, OPEN)[0][1])


def test_configured_window_applies_to_ct_volumes_in_hounsfield_units():
    hu = np.linspace(-1000, 1000, 40 * 40 * 4).reshape(40, 40, 4).astype(np.float32)
    data = nib.Nifti1Image(hu, np.eye(4)).to_bytes()
    got = nifti.slices(data, PreprocessConfig(window="brain"))  # 40 +- 40 HU
    canonical = np.rot90(hu[:, :, 2])
    s = got[2][1]
    assert (s[canonical <= 0] == 0).all() and (s[canonical > 80] == 255).all()
    assert ((s > 0) & (s < 255)).sum() > 0
