"""The per-image transform: every mode and format a real archive holds becomes the configured tensor, and
everything that cannot is rejected with a reason a user understands."""
import io
import os
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from medspark.data.preprocess import PreprocessConfig, Rejected, content_hash, decode, load, read_bytes

CFG = PreprocessConfig(image_size=32, channels=1)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "CMYK", "I;16", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_becomes_the_configured_tensor(mode, channels):
    base = Image.fromarray(gradient()).convert("RGB")
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((gradient().astype(np.uint16) * 200).astype(np.uint16))
        img = img if mode == "I;16" else img.convert(mode)
        fmt = "PNG" if mode == "I;16" else "TIFF"  # 32-bit integer and float scans come as TIFF
    else:
        img, fmt = base.convert(mode), ("JPEG" if mode == "CMYK" else "PNG")
    out = decode(encode(img, fmt), PreprocessConfig(image_size=32, channels=channels))
    assert out.shape == (32, 32, channels) and out.dtype == np.uint8
    assert out.max() > 100, "content survived the conversion"


def test_sixteen_bit_is_windowed_not_clipped():
    arr = (np.arange(64 * 64).reshape(64, 64) % 1000 + 30000).astype(np.uint16)  # narrow window high in the range
    out = decode(encode(Image.fromarray(arr), "PNG"), PreprocessConfig(image_size=64, resize="stretch"))
    assert out.min() == 0 and out.max() == 255


def test_alpha_is_flattened_onto_black():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 20:, 3] = 255  # right half opaque, left half transparent
    out = decode(encode(Image.fromarray(rgba), "PNG"), PreprocessConfig(image_size=40, resize="stretch"))
    assert out[:, :18].max() == 0 and out[:, 22:].min() > 150


def test_png_data_in_a_jpg_file_is_decoded(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    assert load(str(path), CFG).shape == (32, 32, 1)


def test_pad_keeps_aspect_ratio_and_stretch_fills():
    wide = Image.fromarray(np.full((20, 80), 255, np.uint8))
    padded = decode(encode(wide, "PNG"), PreprocessConfig(image_size=40, resize="pad"))[..., 0]
    stretched = decode(encode(wide, "PNG"), PreprocessConfig(image_size=40, resize="stretch"))[..., 0]
    assert padded[0].max() == 0 and padded[-1].max() == 0 and padded[20].min() == 255  # black bars top and bottom
    assert stretched.min() == 255


def test_draft_mode_matches_full_decode():
    rng = np.random.default_rng(0)
    img = Image.fromarray((gradient(512, 512) // 2 + rng.integers(0, 60, (512, 512))).astype(np.uint8)).convert("RGB")
    data = encode(img, "JPEG", quality=90)
    fast = decode(data, PreprocessConfig(image_size=64, draft=True)).astype(int)
    full = decode(data, PreprocessConfig(image_size=64, draft=False)).astype(int)
    assert np.abs(fast - full).mean() < 4


@pytest.mark.parametrize("denoise", ["median", "gaussian"])
def test_denoise_reduces_noise(denoise):
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 40, (64, 64)), 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(noisy), "PNG")
    plain = decode(data, PreprocessConfig(image_size=64))
    clean = decode(data, PreprocessConfig(image_size=64, denoise=denoise))
    assert clean.std() < plain.std() * 0.8


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am a text file named scan.jpg\n", "not an image"),
    (encode(Image.fromarray(gradient()).convert("RGB"), "JPEG")[:300], "corrupt or truncated"),
    (encode(Image.new("L", (1, 1)), "PNG"), "too small"),
])
def test_bad_inputs_are_rejected_with_a_reason(tmp_path, data, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    with pytest.raises(Rejected, match=reason):
        load(str(path), CFG)


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = encode(Image.new("L", (12000, 12000)), "PNG")  # tiny file, 144 M pixels declared
    with pytest.raises(Rejected, match="too large"):
        decode(bomb, CFG)


def test_unreadable_files_are_rejected(tmp_path):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(Rejected, match="unreadable"):
        read_bytes(str(loop))
    with pytest.raises(Rejected, match="system file"):
        read_bytes(str(tmp_path / ".DS_Store"))
    if os.geteuid() != 0:  # root reads everything: the permission case is real only for ordinary users
        locked = tmp_path / "locked.png"
        locked.write_bytes(b"x")
        locked.chmod(0)
        with pytest.raises(Rejected, match="unreadable"):
            read_bytes(str(locked))


def test_content_hash_ignores_names(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "copy of a.JPG"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert content_hash(read_bytes(str(a))) == content_hash(read_bytes(str(b)))


@pytest.mark.parametrize("kw, key", [({"image_size": 0}, "image_size"), ({"channels": 2}, "channels"),
                                     ({"resize": "crop"}, "resize"), ({"denoise": "nlm"}, "denoise"),
                                     ({"max_aspect": 0.5}, "max_aspect"), ({"multi_frame": "every"}, "multi_frame"),
                                     ({"max_decoded_mb": 0}, "max_decoded_mb"),
                                     ({"max_file_mb": "big"}, "max_file_mb")])
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"preprocess.{key}"):
        PreprocessConfig(**kw)


def header_only_png(side: int, depth: int = 8, color: int = 0) -> bytes:
    """A PNG declaring side x side pixels (grey 8-bit unless told: color 6 = RGBA), with no pixel data: only the
    header can be judged."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_max_pixels_is_the_limit_not_pillows_warning():
    """9500 x 9500 = 90.25 M pixels: over Pillow's warning threshold (89.5 M), under preprocess.max_pixels (100 M).
    The setting decides: the header passes (the missing data is what fails), and a lower setting rejects it."""
    data = header_only_png(9500)
    with pytest.raises(Rejected) as e:
        decode(data, CFG)
    assert "too large" not in str(e.value) and "corrupt or truncated" in str(e.value)
    with pytest.raises(Rejected, match=r"too large: declared 9500x9500 exceeds preprocess\.max_pixels=50000000"):
        decode(data, PreprocessConfig(image_size=32, max_pixels=50_000_000))


def test_pillows_hard_limit_is_reported_in_terms_of_the_setting():
    with pytest.raises(Rejected, match=r"too large: declared 2500000000 pixels exceeds preprocess\.max_pixels=100000000"):
        decode(header_only_png(50_000), CFG)
    with pytest.raises(Rejected, match=r"exceeds Pillow's hard limit of \d+ .*preprocess\.max_pixels=5000000000 cannot"):
        decode(header_only_png(50_000), PreprocessConfig(image_size=32, max_pixels=5_000_000_000))


def test_only_regular_files_are_read(tmp_path):
    """A named pipe would block the reading task forever, a device never end: refused by their kind."""
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(Rejected, match="not a regular file: a named pipe"):
        read_bytes(str(tmp_path / "pipe.jpg"))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(Rejected, match="not a regular file: a directory"):
        read_bytes(str(tmp_path / "folder.jpg"))
    (tmp_path / "._scan.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    with pytest.raises(Rejected, match="system file"):
        read_bytes(str(tmp_path / "._scan.jpg"))


def test_extreme_aspect_ratio_is_rejected():
    """A 20x5000 sliver (a scanner's calibration strip, a cropped ruler) would pad to a black square."""
    sliver = encode(Image.new("L", (20, 5000), 128), "PNG")
    with pytest.raises(Rejected, match=r"extreme aspect ratio: 20x5000 \(250:1\), over preprocess\.max_aspect=10"):
        decode(sliver, CFG)
    assert decode(sliver, PreprocessConfig(image_size=32, max_aspect=300)).shape == (32, 32, 1)
    assert decode(encode(Image.new("L", (1000, 100)), "PNG"), CFG).shape == (32, 32, 1)  # 10:1 is allowed


def animation(fmt: str, **kw) -> bytes:
    """3 frames (or pages) of 40x40 grey: 30, 90, 150."""
    frames = [Image.new("L", (40, 40), 30 + 60 * i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, kw", [("GIF", {}), ("TIFF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
                         ids=["animated_gif", "multi_page_tiff", "apng", "animated_webp"])
def test_multi_frame_files_are_rejected_or_give_their_first_frame(fmt, kw):
    data = animation(fmt, **kw)
    with pytest.raises(Rejected, match=r"multi-frame file \(3 frames: animation or pages\).*multi_frame=first"):
        decode(data, CFG)
    first = decode(data, PreprocessConfig(image_size=32, multi_frame="first"))
    assert np.abs(first.astype(int) - 30).max() <= 1


def test_decoded_memory_is_judged_from_the_header():
    """Declared pixels x bytes per pixel against preprocess.max_decoded_mb, before a pixel is decoded: a header
    of a few bytes declaring 9000x9000 RGBA (81 M pixels: under max_pixels) would take 324 MB."""
    t0 = time.perf_counter()
    with pytest.raises(Rejected, match=r"too large to decode: 9000x9000 RGBA takes 324 MB, over "
                                       r"preprocess\.max_decoded_mb=128"):
        decode(header_only_png(9000, color=6), CFG)
    assert time.perf_counter() - t0 < 0.1
    # the 95 KB PNG declaring 7000x7000 16-bit: 98 MB, within the default, over a lower setting
    with pytest.raises(Rejected, match=r"7000x7000 I;16 takes 98 MB, over preprocess\.max_decoded_mb=64"):
        decode(header_only_png(7000, depth=16), PreprocessConfig(image_size=32, max_decoded_mb=64))


def test_file_size_is_capped_before_reading(tmp_path):
    """A 600 MB file (sparse here: no disk used) is rejected from its size: no byte read, no memory taken."""
    big = tmp_path / "export.jpg"
    with open(big, "wb") as f:
        f.truncate(600 * 10**6)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(Rejected, match=r"file too large: 600 MB, over preprocess\.max_file_mb=128"):
            load(str(big), CFG)
        elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05 and peak < 1_000_000
    with pytest.raises(Rejected, match=r"file too large: 0 MB, over preprocess\.max_file_mb=0\.001"):
        decode(b"x" * 2000, PreprocessConfig(image_size=32, max_file_mb=0.001))  # bytes handed over (serving)


def jpeg_variants() -> list[bytes]:
    """Intact JPEGs of the kinds a decoder meets: grey, colour, CMYK; qualities; Huffman-optimised, progressive,
    restart markers, chroma subsampling; sizes that are not a multiple of the block; EXIF, comment, data after
    the end marker."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(np.clip(gradient(256, 256) // 2 + rng.integers(0, 90, (256, 256)), 0, 255).astype(np.uint8))
    out = []
    for mode in ("L", "RGB", "CMYK"):
        for size in ((256, 256), (37, 123), (1000, 139)):
            img = base.resize(size).convert(mode)
            for q, kw in [(50, {}), (95, {"optimize": True}), (100, {}), (75, {"progressive": True}),
                          (90, {"restart_marker_rows": 1}), (90, {"restart_marker_blocks": 3}),
                          (90, {"subsampling": 0}), (95, {"subsampling": 2, "optimize": True})]:
                out.append(encode(img, "JPEG", quality=q, **kw))
    exif = Image.Exif()
    exif[0x010E] = "MR T1"
    out += [encode(base, "JPEG", exif=exif), encode(base, "JPEG", comment=b"site 3"),
            encode(base, "JPEG") + b"trailer\xff\xd9 after the end marker"]
    return out


def garbled(data: bytes, seed: int, n: int = 40) -> bytes:
    """n random bytes written over the middle of the file: a bad sector, a flipped transfer."""
    out = bytearray(data)
    mid = len(out) // 2
    out[mid:mid + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(out)


def test_jpeg_garbled_mid_file_is_mostly_caught_and_an_intact_one_never():
    """Pillow decodes a garbled JPEG without a word (it drops libjpeg's warnings); decode() notices when the image
    was complete before its data ended (preprocess._JpegFence). On 200 seeded 40-byte garbles of each kind, at
    least 60% are rejected (measured: 67-76% of a smooth scan, 98% of a grainy one), and none of the 75 intact
    variants is, draft mode on or off."""
    for data in jpeg_variants():
        for cfg in (CFG, PreprocessConfig(image_size=64, channels=3, draft=False)):
            decode(data, cfg)  # raises on a false alarm
    rng = np.random.default_rng(0)
    for grain in (30, 90):
        pixels = np.clip(gradient(256, 256) // (1 + grain // 60) + rng.integers(0, grain, (256, 256)), 0, 255)
        for mode in ("L", "RGB"):
            data = encode(Image.fromarray(pixels.astype(np.uint8)).convert(mode), "JPEG", quality=90)
            reasons = []
            for seed in range(200):
                try:
                    decode(garbled(data, seed), CFG)
                except Rejected as e:
                    reasons.append(str(e))
            assert len(reasons) >= 120, (grain, mode, len(reasons))
            assert any(r.startswith("corrupt JPEG data: the image was complete before the end of its data")
                       for r in reasons)
