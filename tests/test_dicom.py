"""DICOM pixels on the real files that pydicom ships in its wheel: every one accepted with the pixels pydicom's own
`pixel_array` gives after the same standard transforms (pydicom's apply_modality_lut / apply_voi_lut + numpy,
within 1 grey level), or rejected with the expected reason; then windows, presets, MONOCHROME1, colour,
multi-frame, pixel spacing, size guards and broken files. Pure functions: no Spark."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

import pydicom  # noqa: E402  (a dependency: a missing one fails here, never skips)
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut  # noqa: E402

from medspark.data import dicom  # noqa: E402
from medspark.data.preprocess import PreprocessConfig, Rejected, decode, decode_frames, finish  # noqa: E402

FILES = Path(pydicom.data.__file__).parent / "test_files"
# Small test files (3x3, 10x10) and slivers (45x10) are real DICOM too: judged here without the size floor
OPEN = PreprocessConfig(image_size=64, min_side=1, max_aspect=100, multi_frame="all")
NO_PIXELS = r"no pixel data"
REJECTED = {  # file -> the reason (regex) its rejection must give
    "ExplVR_BigEndNoMeta.dcm": r"^no pixel data: an RT plan",  # bare data sets (no preamble/meta): read, no pixels
    "ExplVR_LitEndNoMeta.dcm": r"^no pixel data: an RT plan",
    "JPEG-lossy.dcm": r"^unsupported or broken compressed pixel data \(JPEG Extended",
    "JPEG2000-embedded-sequence-delimiter.dcm": r"^unsupported or broken compressed pixel data \(JPEG 2000",
    "MR_truncated.dcm": r"^truncated pixel data",
    "UN_sequence.dcm": NO_PIXELS, "empty_charset_LEI.dcm": NO_PIXELS, "no_meta_group_length.dcm": NO_PIXELS,
    "priv_SQ.dcm": NO_PIXELS,
    "badVR.dcm": r"^malformed image header value \(ValueError: wrong VR",
    "meta_missing_tsyntax.dcm": r"^incomplete image header: pixel data without Rows, Columns",
    "nested_priv_SQ.dcm": r"^incomplete image header: pixel data without Rows, Columns",
    "no_meta.dcm": r"^not an image: no decoder recognises",  # garbled bytes: no preamble, no parseable first tag
    "reportsi.dcm": r"^no pixel data: a structured report \(SR\)",
    "reportsi_with_empty_number_tags.dcm": r"^no pixel data: a structured report \(SR\)",
    "test-SR.dcm": r"^no pixel data: a structured report \(SR\)",
    "rtplan.dcm": r"^no pixel data: an RT plan", "rtplan_truncated.dcm": r"^no pixel data: an RT plan",
    "rtstruct.dcm": r"^no pixel data: an RT structure set",
    "waveform_ecg.dcm": r"^no pixel data: an ECG waveform",
}
WHEEL = sorted(p.relative_to(FILES).as_posix() for p in FILES.rglob("*")
               if p.is_file() and p.suffix not in (".txt", ".json", ".dump", ".icc", ".gz") and p.name != "README")
# Files pydicom downloads on demand (its urls.json): absent offline; a test that cannot run says so
ON_DEMAND = sorted(json.loads((Path(pydicom.data.__file__).parent / "urls.json").read_text()))


def expected(path: Path | str, mode: str = "all", percentiles=(0.5, 99.5)) -> list[np.ndarray]:
    """What the standard pipeline gives, computed with pydicom's own functions: pixel_array, apply_color_lut,
    apply_modality_lut, apply_voi_lut (its output range, as pydicom defines it, mapped to 0..255)."""
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = list(arr) if n > 1 else [arr]
    frames = {"all": frames, "first": frames[:1], "middle": frames[n // 2:n // 2 + 1]}[mode]
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        return [np.rint(apply_color_lut(f, ds) / (np.iinfo(apply_color_lut(f, ds).dtype).max / 255)).astype(np.uint8)
                for f in frames]
    if ds.SamplesPerPixel == 3:
        top = 2 ** ds.BitsStored - 1
        return [f.astype(np.uint8) if top == 255 else np.rint(f / top * 255).astype(np.uint8) for f in frames]
    values = [apply_modality_lut(f, ds).astype(np.float64) for f in frames]
    if "WindowCenter" in ds:
        lo, hi = pydicom_window_range(ds)
        out = [(apply_voi_lut(v, ds) - lo) / (hi - lo) * 255 for v in values]
    else:
        lo, hi = np.percentile(np.concatenate([v.ravel() for v in values]), percentiles)
        out = [np.clip((v - lo) / (hi - lo) * 255, 0, 255) for v in values]
    out = [np.rint(o).astype(np.uint8) for o in out]
    return [255 - o for o in out] if pi == "MONOCHROME1" else out


def pydicom_window_range(ds) -> tuple[float, float]:
    """The output range of pydicom's apply_windowing (PS3.3 C.11.2.1.2: the stored range after rescale)."""
    bits = int(ds.BitsStored)
    lo, hi = (0, 2 ** bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        s, i = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * s + i, hi * s + i
    return lo, hi


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"{int((diff > 1).sum())} pixels differ by more than 1 grey level (max {diff.max()})"


@pytest.mark.parametrize("name", WHEEL)
def test_every_file_in_pydicoms_wheel_is_decoded_like_pydicom_or_rejected_with_its_reason(name):
    data = (FILES / name).read_bytes()
    reason = "a DICOMDIR index, not an image" if Path(name).name.startswith("DICOMDIR") else REJECTED.get(name)
    if "TINY_ALPHA/PT" in name:  # the DICOMDIR test set's records carry no pixels
        reason = NO_PIXELS
    if reason:
        with pytest.raises(Rejected, match=reason):
            decode_frames(data, OPEN)
        return
    frames = dicom.frames(data, OPEN)
    want = expected(FILES / name)
    assert [i for i, _, _ in frames] == list(range(len(want)))
    for (_, got, _), w in zip(frames, want):
        assert_close(got, w)
    images = decode_frames(data, OPEN)  # then the shared resize/pad: the model's input
    assert [i for i, _ in images] == [i for i, _, _ in frames]
    assert all(a.shape == OPEN.shape and a.dtype == np.uint8 for _, a in images)


def test_files_pydicom_downloads_on_demand_when_present():
    """pydicom fetches more test files (its urls.json) on demand into its data folder; offline they are absent."""
    from pydicom.data.data_manager import get_data_dir

    present = [p for p in (Path(get_data_dir()) / n for n in ON_DEMAND if n.endswith(".dcm")) if p.exists()]
    if not present:
        pytest.skip(f"none of the {len(ON_DEMAND)} files pydicom downloads on demand is here (no network)")
    for path in present:
        try:
            want = expected(path)
        except Exception:
            with pytest.raises(Rejected):
                decode_frames(path.read_bytes(), OPEN)
            continue
        for (_, got, _), w in zip(dicom.frames(path.read_bytes(), OPEN), want):
            assert_close(got, w)


def with_changes(name: str, **tags) -> bytes:
    """A pydicom test file with some tags changed (None removes one), written back as bytes."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for k, v in tags.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def hounsfield(name: str = "CT_small.dcm") -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file(name))
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def pydicom_windowed(name: str, center: float, width: float) -> np.ndarray:
    """pydicom's own windowing of a file with WindowCenter/Width set to (center, width), on 0..255."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.WindowCenter, ds.WindowWidth = center, width
    lo, hi = pydicom_window_range(ds)
    return np.rint((apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - lo) / (hi - lo) * 255).astype(np.uint8)


@pytest.mark.parametrize("preset, cw", [("brain", (40, 80)), ("subdural", (75, 215)), ("stroke", (40, 40)),
                                        ("lung", (-600, 1500)), ("mediastinum", (50, 350)), ("bone", (400, 1800)),
                                        ("abdomen", (50, 400)), ("liver", (30, 150))])
def test_window_presets_are_the_radiology_windows_in_hounsfield_units(preset, cw):
    data = get_testdata_file("CT_small.dcm")
    got = dicom.frames(Path(data).read_bytes(), PreprocessConfig(window=preset))[0][1]
    assert_close(got, pydicom_windowed("CT_small.dcm", *cw))
    hu = hounsfield()
    assert (got[hu <= cw[0] - cw[1] / 2] == 0).all() and (got[hu > cw[0] + cw[1] / 2] == 255).all()


def test_config_window_overrides_the_files_own_window():
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()  # its own window: 600/1600
    own = dicom.frames(data, PreprocessConfig())[0][1]
    assert_close(own, expected(get_testdata_file("MR_small.dcm"))[0])
    cfg = PreprocessConfig.from_mapping({"window": [300, 200]})  # YAML gives a list
    assert cfg.window == (300, 200)
    got = dicom.frames(data, cfg)[0][1]
    assert_close(got, pydicom_windowed("MR_small.dcm", 300, 200))
    assert not np.array_equal(got, own)


def test_file_without_a_window_gets_the_percentile_window():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # no WindowCenter
    for pct in ((0.5, 99.5), (5, 95)):
        got = dicom.frames(data, PreprocessConfig(percentiles=pct))[0][1]
        assert_close(got, expected(get_testdata_file("CT_small.dcm"), percentiles=pct)[0])
    hu = hounsfield()
    assert (got[hu <= np.percentile(hu, 5)] == 0).all() and (got[hu >= np.percentile(hu, 95)] == 255).all()


def test_rescale_slope_and_intercept_are_applied_before_the_window():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    plain = dicom.frames(with_changes("CT_small.dcm"), PreprocessConfig(window="abdomen"))[0][1]
    # the same tissue stored at half scale: slope 2 brings it back to the same Hounsfield units
    stored = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelData = ((stored + 1024) // 2).astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    buf = io.BytesIO()
    ds.save_as(buf)
    halved = dicom.frames(buf.getvalue(), PreprocessConfig(window="abdomen"))[0][1]
    assert np.abs(halved.astype(int) - plain.astype(int)).max() <= 4  # one stored step = 2 HU = 1.3 grey levels


def test_monochrome1_is_inverted_after_windowing():
    normal = dicom.frames(with_changes("MR_small.dcm"), PreprocessConfig())[0][1]
    inverted = dicom.frames(with_changes("MR_small.dcm", PhotometricInterpretation="MONOCHROME1"),
                            PreprocessConfig())[0][1]
    assert np.array_equal(inverted, 255 - normal)


def test_voi_lut_sequence_is_used_when_the_file_has_one():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    item = pydicom.Dataset()
    lut = (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # a gamma curve: not a linear window
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = pydicom.Sequence([item])
    for k in ("WindowCenter", "WindowWidth"):
        delattr(ds, k)
    buf = io.BytesIO()
    ds.save_as(buf)
    got = dicom.frames(buf.getvalue(), PreprocessConfig())[0][1]
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    want = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    assert_close(got, np.rint((want - lut.min()) / (lut.max() - lut.min()) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["examples_palette.dcm", "examples_ybr_color.dcm", "SC_rgb_rle_16bit.dcm"])
def test_colour_files_become_rgb_or_grey(name):
    data = Path(get_testdata_file(name)).read_bytes()
    rgb = decode_frames(data, PreprocessConfig(image_size=64, channels=3, multi_frame="first"))[0][1]
    grey = decode_frames(data, PreprocessConfig(image_size=64, channels=1, multi_frame="first"))[0][1]
    assert rgb.shape == (64, 64, 3) and grey.shape == (64, 64, 1)
    assert (rgb[..., 0] != rgb[..., 1]).any()  # real colour, not grey copied thrice
    from PIL import Image

    want = np.asarray(Image.fromarray(rgb).convert("L"))  # the JPEG path's RGB -> L (ITU-R 601-2)
    assert np.abs(grey[..., 0].astype(int) - want.astype(int)).max() <= 2


@pytest.mark.parametrize("mode, indices", [("first", [0]), ("middle", [15]), ("all", list(range(30)))])
def test_multi_frame_first_middle_all(mode, indices):
    path = get_testdata_file("examples_ybr_color.dcm")  # 30 frames
    frames = dicom.frames(Path(path).read_bytes(), PreprocessConfig(multi_frame=mode))
    assert [i for i, _, _ in frames] == indices
    for (_, got, _), want in zip(frames, expected(path, mode)):
        assert_close(got, want)
    with pytest.raises(Rejected, match=r"multi-frame file \(30 frames\).*multi_frame=first \| middle \| all"):
        decode_frames(Path(path).read_bytes(), PreprocessConfig(multi_frame="reject"))


def test_multi_frame_percentile_window_spans_the_kept_frames():
    path = get_testdata_file("rtdose.dcm")  # 15 frames, no window: one window for the file's frames
    frames = dicom.frames(Path(path).read_bytes(), PreprocessConfig(multi_frame="all", min_side=1))
    for (_, got, _), want in zip(frames, expected(path)):
        assert_close(got, want)


def test_pixel_spacing_resamples_to_the_configured_mm_per_pixel():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # 128 x 128 at 0.661468 mm
    assert dicom.frames(data, PreprocessConfig())[0][2] == (0.661468, 0.661468)
    cfg = PreprocessConfig(image_size=128, resize="pad", pixel_spacing_mm=0.661468 * 2)
    img = decode_frames(data, cfg)[0][1][..., 0]  # 64 x 64 pixels of 1.32 mm, centred in 128, never scaled up
    assert (img[:32] == 0).all() and (img[-32:] == 0).all() and (img[:, :32] == 0).all() and (img[:, -32:] == 0).all()
    assert (img[32:96, 32:96] > 0).mean() > 0.5
    half = decode_frames(data, PreprocessConfig(image_size=64, pixel_spacing_mm=0.661468 / 2))[0][1][..., 0]
    assert (half > 0).mean() > 0.9  # 256 x 256 at 0.33 mm: its centre 64 x 64 (21 mm), cropped
    same = decode_frames(data, PreprocessConfig(image_size=128, pixel_spacing_mm=0.661468))[0][1]
    assert np.array_equal(same, decode_frames(data, PreprocessConfig(image_size=128))[0][1])
    no_spacing = with_changes("CT_small.dcm", PixelSpacing=None)
    with pytest.raises(Rejected, match=r"no PixelSpacing or ImagerPixelSpacing.*pixel_spacing_mm=1.0"):
        decode_frames(no_spacing, PreprocessConfig(pixel_spacing_mm=1.0))
    imager = with_changes("CT_small.dcm", PixelSpacing=None, ImagerPixelSpacing=[0.5, 0.25])
    assert dicom.frames(imager, PreprocessConfig())[0][2] == (0.5, 0.25)
    with pytest.raises(Rejected, match=r"too large once resampled: 128x128 at 0.661468x0.661468 mm is 8467x8467"):
        decode_frames(data, PreprocessConfig(pixel_spacing_mm=0.01, max_pixels=10_000_000))


def test_size_guards_judge_the_header_before_decoding():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with pytest.raises(Rejected, match=r"too large to decode: 128x128 x 1 frame\(s\).*max_decoded_mb=0.01"):
        decode_frames(data, PreprocessConfig(max_decoded_mb=0.01))
    with pytest.raises(Rejected, match=r"too large: declared 128x128 exceeds preprocess.max_pixels=1000"):
        decode_frames(data, PreprocessConfig(max_pixels=1000))
    with pytest.raises(Rejected, match=r"too small: 128x128, below preprocess.min_side=200"):
        decode_frames(data, PreprocessConfig(min_side=200))
    # a header that declares 60000 x 60000 x 16 bits (7 GB) over 32 KB of pixels: judged, never allocated
    with pytest.raises(Rejected, match=r"too large"):
        decode_frames(with_changes("CT_small.dcm", Rows=60000, Columns=60000), PreprocessConfig(max_pixels=10 ** 10))


def test_file_without_preamble_and_file_meta_is_read_when_it_has_pixels():
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # explicit VR little endian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)  # the data set alone: no preamble, no 'DICM', no group 0002
    bare = buf.getvalue()
    assert not dicom.is_dicom(bare) and dicom.is_bare_dataset(bare)
    assert np.array_equal(decode_frames(bare, PreprocessConfig())[0][1],
                          decode_frames(Path(get_testdata_file("CT_small.dcm")).read_bytes(), PreprocessConfig())[0][1])


def test_decode_gives_the_first_image_for_serving():
    data = Path(get_testdata_file("examples_ybr_color.dcm")).read_bytes()
    cfg = PreprocessConfig(image_size=32, channels=3, multi_frame="all")
    assert np.array_equal(decode(data, cfg), decode_frames(data, cfg)[0][1])


def test_broken_files_are_rejected_never_raised_and_reasons_carry_no_tag_values():
    """Truncations and garbles of real files (uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000) carrying fake PHI:
    each one decodes or is Rejected; nothing else escapes, and no reason quotes a tag value."""
    rng = random.Random(13)
    phi = {"PatientName": "Fakename^Zelda", "PatientID": "PHI-ID-93651", "AccessionNumber": "ACC77120"}
    outcomes = {"ok": 0, "rejected": 0}
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_jp2klossless.dcm"):
        data = with_changes(name, **phi)
        variants = [data[:n] for n in (130, 200, 400, len(data) // 2, len(data) - 10)]
        for _ in range(12):
            b = bytearray(data)
            at = rng.randrange(132, len(b) - 40)
            b[at:at + 40] = bytes(rng.randrange(256) for _ in range(40))
            variants.append(bytes(b))
        for v in variants:
            try:
                decode_frames(v, PreprocessConfig(min_side=1))
                outcomes["ok"] += 1
            except Rejected as e:
                outcomes["rejected"] += 1
                assert not any(value.split("^")[0] in str(e) for value in phi.values()), str(e)
    assert outcomes["rejected"] >= 25  # every truncation at least


def test_truncated_file_reason():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with pytest.raises(Rejected, match=r"^truncated pixel data"):
        decode_frames(data[:-1000], PreprocessConfig())


def test_read_tags_reads_the_header_only_and_gives_empty_strings_for_missing_tags(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(with_changes("CT_small.dcm", PatientID="PHI-ID-1", AccessionNumber=None))
    tags = dicom.read_tags(str(path), ["PatientID", "AccessionNumber", "SOPInstanceUID", "Modality"])
    assert tags == {"PatientID": "PHI-ID-1", "AccessionNumber": "",
                    "SOPInstanceUID": str(pydicom.dcmread(path).SOPInstanceUID), "Modality": "CT"}
    garbage = tmp_path / "g.dcm"
    garbage.write_bytes(b"not dicom at all")
    assert dicom.read_tags(str(garbage), ["PatientID"]) == {"PatientID": ""}


@pytest.mark.parametrize("kw, key", [({"window": "kidney"}, "window"), ({"window": [40, 0.5]}, "window"),
                                     ({"window": [40]}, "window"), ({"percentiles": [99, 1]}, "percentiles"),
                                     ({"percentiles": [0, 101]}, "percentiles"),
                                     ({"pixel_spacing_mm": 0}, "pixel_spacing_mm"),
                                     ({"pixel_spacing_mm": "1mm"}, "pixel_spacing_mm"),
                                     ({"multi_frame": "last"}, "multi_frame"), ({"slice_axis": 3}, "slice_axis"),
                                     ({"slices": "some"}, "slices"), ({"num_slices": 0}, "num_slices"),
                                     ({"min_foreground": 1.5}, "min_foreground")])
def test_bad_medical_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"preprocess.{key}="):
        PreprocessConfig.from_mapping(kw)


def test_shared_finish_is_the_last_step_of_every_format():
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    cfg = PreprocessConfig(image_size=48, denoise="median")
    from PIL import Image

    assert np.array_equal(decode_frames(data, cfg)[0][1], finish(Image.fromarray(dicom.frames(data, cfg)[0][1]), cfg))


def test_modality_lut_sequence_is_applied_before_the_window():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    item = pydicom.Dataset()
    lut = np.clip(np.arange(4096) * 3 // 2 + 100, 0, 65535).astype(np.uint16)  # not a rescale the file states
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", lut.tolist())
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    buf = io.BytesIO()
    ds.save_as(buf)
    got = dicom.frames(buf.getvalue(), PreprocessConfig(window=[1500, 2000]))[0][1]
    values = lut[np.clip(ds.pixel_array, 0, 4095)].astype(np.float64)  # PS3.3 C.11.1: the LUT, clamped at its ends
    want = np.clip(((values - 1499.5) / 1999 + 0.5) * 255, 0, 255)
    want[values <= 1499.5 - 999.5], want[values > 1499.5 + 999.5] = 0, 255
    assert_close(got, np.rint(want).astype(np.uint8))


def test_other_multi_frame_images_give_their_first_frame_for_middle_and_all():
    """GIF animations and multi-page TIFFs are no series: multi_frame middle/all use the first page, like first."""
    from PIL import Image

    pages = [Image.fromarray(np.full((32, 32), v, dtype=np.uint8)) for v in (40, 120, 200)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    first = decode_frames(buf.getvalue(), PreprocessConfig(image_size=16, multi_frame="first"))
    for mode in ("middle", "all"):
        got = decode_frames(buf.getvalue(), PreprocessConfig(image_size=16, multi_frame=mode))
        assert len(got) == 1 and got[0][0] == 0 and np.array_equal(got[0][1], first[0][1])
    assert int(first[0][1].mean()) == 40


def test_values_quoted_by_pydicoms_warnings_never_reach_logs_or_stderr(caplog, capfd):
    """pydicom warns "Invalid value for VR IS: '<value>'", quoting the value: a name typed into the wrong field
    would reach the executor's log. Decoding silences those messages; the file is still rejected with its reason."""
    import logging
    import warnings as w

    data = Path(get_testdata_file("badVR.dcm")).read_bytes()  # NumberOfFrames (IS) = '1A'
    bad = data.replace(b"IS\x02\x001A", b"IS\x08\x00ZoeDoe1 ", 1)  # a name where a number belongs
    assert bad != data
    caplog.set_level(logging.DEBUG)
    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        with pytest.raises(Rejected, match=r"^malformed image header value") as e:
            decode_frames(bad, PreprocessConfig())
    out, err = capfd.readouterr()
    assert "ZoeDoe" not in caplog.text + out + err + str(e.value) + " ".join(str(m.message) for m in seen)
    with w.catch_warnings(record=True) as seen:  # the same access without the silencer quotes it
        w.simplefilter("always")
        pydicom.dcmread(io.BytesIO(bad)).NumberOfFrames
    assert any("ZoeDoe" in str(m.message) for m in seen) or "ZoeDoe" in caplog.text


def write_dicom(grey: np.ndarray, *, monochrome1: bool = False, syntax: str = "ExplicitVRLittleEndian",
                window: tuple[float, float] | None = (128, 256), **tags) -> bytes:
    """A 12-bit-in-16 MR DICOM whose modality values (after its rescale) are the uint8 `grey`, as scanners write them:
    stored = grey x 16 + 8 (12 bits) with RescaleSlope 1/16, RescaleIntercept -0.5 (MONOCHROME1: stored inverted).
    The default window (128, 256) maps the values back to themselves. syntax: a pydicom.uid name; RLELossless and
    JPEG2000Lossless are compressed by pydicom's own encoders. Extra tags (PatientID=...) are set as given."""
    import pydicom.uid as uids
    from pydicom.dataset import Dataset, FileMetaDataset

    values = 255 - grey.astype(np.uint16) if monochrome1 else grey.astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids.MRImageStorage
    meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "0.0625", "-0.5"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = (values * 16 + 8).astype(np.uint16).tobytes()
    if syntax != "ExplicitVRLittleEndian":
        ds.compress(getattr(uids, syntax))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.real_data
@pytest.mark.parametrize("variant", [{}, {"monochrome1": True}, {"syntax": "RLELossless"},
                                     {"syntax": "JPEG2000Lossless", "monochrome1": True}, {"window": None}])
def test_real_brain_mris_as_scanner_dicom_decode_to_the_same_pixels_as_their_jpegs(variant):
    """Real brain MRIs (../shared/datasets) written as 16-bit DICOM with a rescale, inverted or compressed: the
    DICOM path gives the JPEG path's pixels (the file window maps the values back; without one, the percentile
    window stretches them, still monotone)."""
    from PIL import Image

    from conftest import shared_dataset

    folder = shared_dataset("brain-tumor-mri") / "Training" / "glioma"
    cfg = PreprocessConfig(image_size=96, draft=False)
    for path in sorted(folder.glob("*.jpg"))[:3]:
        jpeg = path.read_bytes()
        grey = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
        data = write_dicom(grey, **variant)
        got = decode_frames(data, cfg)
        assert [i for i, _ in got] == [0]
        if variant.get("window", (128, 256)) is None:
            windowed = dicom.frames(data, cfg)[0][1]
            lo, hi = np.percentile(grey, (0.5, 99.5))
            assert_close(windowed, np.rint(np.clip((grey - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8))
        else:
            assert_close(dicom.frames(data, cfg)[0][1], grey)
            assert_close(got[0][1], decode(jpeg, cfg))


def test_missing_reader_package_is_a_rejection_not_a_crash(monkeypatch):
    """A served model's environment without pydicom: DICOM bytes are rejected with the package to install."""
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(Rejected, match=r"a DICOM/NIfTI file, but pydicom is not installed here"):
        decode_frames(Path(get_testdata_file("CT_small.dcm")).read_bytes(), PreprocessConfig())
