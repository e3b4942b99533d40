"""The per-image transform: every mode and format a real archive holds becomes the configured tensor, and
everything that cannot is rejected with a reason a user understands."""
import io
import os

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
                                     ({"resize": "crop"}, "resize"), ({"denoise": "nlm"}, "denoise")])
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"preprocess.{key}"):
        PreprocessConfig(**kw)


def header_only_png(side: int) -> bytes:
    """A PNG declaring side x side grey pixels, with no pixel data: only the header can be judged."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
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
