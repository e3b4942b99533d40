"""A zoo of bad and odd files through the real pipeline: listing, the real Spark session, `materialize()` and the
Petastorm splits it writes. Every kind of file is its own test: decoded to the right tensor, or rejected with its
reason, or (not an input at all) ignored with its reason; the run finishes, every file under the root is
accounted for, and the rejected list is an artifact of the MLflow run that trained on the folder."""
from __future__ import annotations

import csv
import io
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from medspark.data import materialize as mat
from medspark.data.names import from_text
from medspark.data.preprocess import PreprocessConfig, decode
from medspark.data.sources.class_folders import ClassFolders
from medspark.data.sources.split_folders import SplitFolders
from test_preprocess import animation, garbled, header_only_png

SIZE = 32  # every decodable zoo image is SIZE x SIZE, so `pad` keeps its pixels exactly (no resampling)
PRE = PreprocessConfig(image_size=SIZE, channels=3)  # RGB out: colour conversions are visible in the tensor
SPLIT = {"val": 0.2, "test": 0.2, "seed": 0}
GOOD_PER_CLASS = 8
RED, TEAL = (200, 40, 40), (30, 160, 220)


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(left, right) -> np.ndarray:
    """SIZE x SIZE RGB: left half one colour, right half another."""
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[:, : SIZE // 2], arr[:, SIZE // 2:] = left, right
    return arr


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 50_000) -> bytes:
    """A PNG whose header declares side x side 8-bit grey pixels (2.5 G at 50000) with only the first rows of
    data: a few hundred bytes on disk. Decoding it would take gigabytes; the header alone must reject it."""
    rows = zlib.compress(b"".join(b"\0" + bytes(side) for _ in range(4)))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))


GRADIENT16 = np.tile(np.arange(SIZE, dtype=np.uint16) * 1000 + 1000, (SIZE, 1))  # 1000..32000 of 65535


# ---------------------------------------------------------------- makers: (path, root) -> None

def write(data: bytes | Callable[[], bytes]):
    return lambda path, root: path.write_bytes(data() if callable(data) else data)


def truncated_jpeg(path, root):
    data = png(Image.fromarray(halves(RED, TEAL)), "JPEG", quality=90)
    path.write_bytes(data[: len(data) * 6 // 10])  # a download cut off at 60%


def palette_with_transparency(path, root):
    img = Image.new("P", (SIZE, SIZE), 1)
    img.putpalette([0, 0, 0, 250, 250, 250, 10, 200, 10])
    img.paste(2, (SIZE // 2, 0, SIZE, SIZE))
    img.save(path, "PNG", transparency=1)  # index 1 (the left half, white) is fully transparent


def locked(path, root):
    path.write_bytes(png(Image.fromarray(halves(RED, RED))))
    path.chmod(0)


def symlink_to(target):
    return lambda path, root: os.symlink(target, path)


def fifo(path, root):
    os.mkfifo(path)  # a reader blocks until a writer comes: before the fix, the Spark task hung forever


def linked_folder(path, root):
    """A class folder assembled from links: <class>/batch2 -> a folder elsewhere, holding one image."""
    outside = root.parent / "elsewhere" / "batch2"
    outside.mkdir(parents=True)
    Image.fromarray(halves(TEAL, RED)).save(outside / "scan.png")
    path.parent.rmdir()  # made empty by build_zoo: the link takes its place
    os.symlink(outside, path.parent)


def folder_loop(path, root):
    os.symlink("..", path)  # a/nested/up -> a: walking it would never end


def garbled_jpeg(path, root):
    """A grainy 256 px scan as JPEG with 40 bytes garbled mid-file: Pillow decodes it to garbage without a word."""
    noise = np.random.default_rng(0).integers(0, 90, (256, 256))
    scan = np.clip(np.tile(np.linspace(0, 255, 256), (256, 1)) // 2 + noise, 0, 255).astype(np.uint8)
    path.write_bytes(garbled(png(Image.fromarray(scan).convert("RGB"), "JPEG", quality=90), seed=0))


def sparse_file(size: int):
    def make(path, root):
        with open(path, "wb") as f:
            f.truncate(size)  # a 600 MB export that takes no disk here
    return make


def check_not_read(path):
    """Rejected from its size alone: read_bytes never opened it (a 600 MB read takes far longer than this)."""
    from medspark.data.preprocess import Rejected, read_bytes

    t0 = time.perf_counter()
    with pytest.raises(Rejected, match="file too large"):
        read_bytes(str(path))
    assert time.perf_counter() - t0 < 0.05


TWIN = png(Image.fromarray(halves((5, 90, 5), (90, 5, 5))))  # one content, filed under a and under b
LINKED = png(Image.fromarray(halves((7, 7, 120), (120, 7, 7))))  # one file, linked into b from a


# ---------------------------------------------------------------- checks of decoded tensors

def exact(expected: np.ndarray):
    def check(t):
        np.testing.assert_array_equal(t, expected)
    return check


def check_16bit(t):
    """Min-max windowed to 8 bits: the darkest column 0, the brightest 255, linear in between, still grey."""
    assert (t[..., 0] == t[..., 1]).all() and (t[..., 1] == t[..., 2]).all()
    lo, hi = GRADIENT16.min(), GRADIENT16.max()
    want = np.floor((GRADIENT16.astype(np.float64) - lo) * 255 / (hi - lo) + 0.5)
    assert np.abs(t[..., 0].astype(int) - want).max() <= 1
    assert t[0, 0, 0] == 0 and t[0, -1, 0] == 255 and (np.diff(t[0, :, 0].astype(int)) > 0).all()


def check_cmyk(t):
    """CMYK JPEG (print workflows, some PACS exports) comes back as the colours it was made from, not inverted."""
    left, right = t[:, 2: SIZE // 2 - 2].reshape(-1, 3).mean(0), t[:, SIZE // 2 + 2: -2].reshape(-1, 3).mean(0)
    assert np.abs(left - RED).max() < 10 and np.abs(right - TEAL).max() < 10, (left, right)


def check_rgba(t):
    """Transparency flattened onto black, opaque pixels kept."""
    assert t[:, : SIZE // 2].max() == 0
    assert (t[:, SIZE // 2:] == (0, 180, 90)).all()


def check_palette_transparency(t):
    assert t[:, : SIZE // 2].max() == 0 and (t[:, SIZE // 2:] == (10, 200, 10)).all()


def check_bomb_is_cheap(path):
    """The reason is the declared size, from the header: decoding the data would have said 'corrupt', and the
    whole rejection takes microseconds and no memory."""
    data = path.read_bytes()
    assert len(data) < 2000
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="declared 2500000000 pixels"):
        decode(data, PRE)
    assert time.perf_counter() - t0 < 0.1


@dataclass(frozen=True)
class Case:
    id: str
    rel: str  # path under the dataset root
    make: Callable
    outcome: str  # decoded | rejected | ignored
    reason: str = ""  # rejected/ignored: the text the user reads (a substring of it)
    check: Callable | None = None  # decoded: check(tensor); rejected: check(path)


ZOO = [
    Case("zero_byte_file", "a/empty.jpg", write(b""), "rejected", "empty file (0 bytes)"),
    Case("truncated_jpeg", "a/truncated.jpg", truncated_jpeg, "rejected", "corrupt or truncated"),
    Case("text_file_named_jpg", "a/protocol.jpg", write(b"MR protocol v2: T1, T2, FLAIR\n"), "rejected",
         "not an image: no decoder recognises its content"),
    Case("png_data_in_jpg", "a/really_a_png.jpg", write(lambda: png(Image.fromarray(halves(RED, TEAL)))), "decoded",
         check=exact(halves(RED, TEAL))),
    Case("grayscale_16bit_png", "a/scan16.png", write(lambda: png(Image.fromarray(GRADIENT16))), "decoded",
         check=check_16bit),
    Case("cmyk_jpeg", "a/cmyk.jpg", write(lambda: png(Image.fromarray(halves(RED, TEAL)).convert("CMYK"), "JPEG",
                                                      quality=95)), "decoded", check=check_cmyk),
    Case("rgba_png", "a/rgba.png", write(lambda: png(Image.fromarray(np.dstack(
        [halves((200, 200, 200), (0, 180, 90)), halves(0, 255)[..., 0]])))), "decoded", check=check_rgba),
    Case("palette_png", "a/palette.png", write(lambda: png(Image.fromarray(halves(RED, TEAL)).quantize(2))),
         "decoded", check=exact(halves(RED, TEAL))),
    Case("palette_png_with_transparency", "a/palette_t.png", palette_with_transparency, "decoded",
         check=check_palette_transparency),
    Case("one_pixel_image", "a/dot.png", write(lambda: png(Image.new("L", (1, 1), 200))), "rejected",
         "too small: 1x1, below preprocess.min_side=16"),
    Case("decompression_bomb", "a/bomb.png", write(bomb_png), "rejected",
         "too large: declared 2500000000 pixels exceeds preprocess.max_pixels=100000000", check=check_bomb_is_cheap),
    Case("no_read_permission", "a/locked.png", locked, "rejected", "unreadable: Permission denied"),
    Case("symlink_loop", "a/loop.jpg", symlink_to("loop.jpg"), "rejected",
         "unreadable: Too many levels of symbolic links"),
    Case("dangling_symlink", "a/moved_away.jpg", symlink_to("/nonexistent/medspark/moved_away.jpg"), "rejected",
         "unreadable: No such file or directory"),
    Case("named_pipe", "a/pipe.jpg", fifo, "rejected", "not a regular file: a named pipe"),
    Case("ds_store", "a/.DS_Store", write(b"\0\0\0\1Bud1" + bytes(64)), "rejected", "system file, not an image"),
    Case("thumbs_db", "b/Thumbs.db", write(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)), "rejected",
         "system file, not an image"),
    Case("appledouble_companion", "a/._scan.jpg", write(b"\0\5\26\7\0\2\0\0Mac OS X        " + bytes(32)),
         "rejected", "system file, not an image"),
    Case("txt_file", "b/notes.txt", write(b"patient 12: motion artefacts\n"), "rejected",
         "not an image: no decoder recognises its content"),
    Case("image_in_symlinked_folder", "a/batch2/scan.png", linked_folder, "decoded", check=exact(halves(TEAL, RED))),
    Case("folder_symlink_loop", "a/nested/up", folder_loop, "ignored", "symlink to a folder already listed"),
    Case("file_outside_class_folders", "README.txt", write(b"scans from site 3\n"), "ignored",
         "not in a class folder"),
    Case("ds_store_outside_class_folders", ".DS_Store", write(b"\0\0\0\1Bud1" + bytes(64)), "ignored",
         "not in a class folder"),
    Case("macosx_archive_folder", "__MACOSX/a/._0.png", write(b"\0\5\26\7\0\2\0\0Mac OS X        "), "ignored",
         "__MACOSX holds archive metadata, not a class"),
    Case("hidden_folder", ".ipynb_checkpoints/0-checkpoint.png", write(lambda: png(Image.new("L", (SIZE, SIZE)))),
         "ignored", "hidden folder, not a class"),
    Case("jpeg_garbled_mid_file", "a/garbled.jpg", garbled_jpeg, "rejected",
         "corrupt JPEG data: the image was complete before the end of its data"),
    Case("sliver_20x5000", "a/sliver.png", write(lambda: png(Image.new("L", (20, 5000), 128))), "rejected",
         "extreme aspect ratio: 20x5000 (250:1), over preprocess.max_aspect=10"),
    Case("animated_gif", "a/cine.gif", write(lambda: animation("GIF")), "rejected",
         "multi-frame file (3 frames: animation or pages), not one image; preprocess.multi_frame=first"),
    Case("multi_page_tiff", "b/series.tif", write(lambda: animation("TIFF")), "rejected",
         "multi-frame file (3 frames: animation or pages)"),
    Case("png_declaring_324_mb_decoded", "b/huge_rgba.png", write(lambda: header_only_png(9000, color=6)),
         "rejected", "too large to decode: 9000x9000 RGBA takes 324 MB, over preprocess.max_decoded_mb=128"),
    Case("file_over_max_file_mb", "b/export_600mb.dat", sparse_file(600 * 10**6), "rejected",
         "file too large: 600 MB, over preprocess.max_file_mb=128", check=check_not_read),
    Case("content_under_two_labels", "a/scan_17.png", write(TWIN), "rejected", "conflicting labels: a, b"),
    Case("content_under_two_labels_copy", "b/scan_17_copy.png", write(TWIN), "rejected", "conflicting labels: a, b"),
    Case("file_linked_into_two_classes", "b/from_a.png", symlink_to("../a/linked.png"), "rejected",
         "conflicting labels: a, b"),
    Case("file_linked_into_two_classes_target", "a/linked.png", write(LINKED), "rejected",
         "conflicting labels: a, b"),
]


@dataclass
class Zoo:
    root: Path
    listing: object
    m: mat.Materialized
    rows: dict  # path -> decoded tensor, from the Petastorm splits
    rejected: dict  # path -> reason
    ignored: dict  # path -> reason


def build_zoo(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, base in (("a", 60), ("b", 160)):
        (root / cls).mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            noise = rng.integers(0, 40, (SIZE, SIZE), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / cls / f"{i}.png")
    for case in ZOO:
        path = root / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path, root)


def read_split(url: str) -> dict:
    from petastorm import make_reader

    with make_reader(url, schema_fields=["image", "path"], num_epochs=1, shuffle_row_groups=False,
                     reader_pool_type="dummy") as reader:
        return {row.path: row.image for row in reader}


@pytest.fixture(scope="module")
def zoo(spark, tmp_path_factory) -> Zoo:
    """One real run of listing + Spark + Petastorm over the whole zoo, shared by the per-kind tests."""
    tmp = tmp_path_factory.mktemp("zoo")
    root = tmp / "scans"
    build_zoo(root)
    listing = ClassFolders(str(root)).list()
    m = mat.materialize(spark, listing, PRE, SPLIT, str(tmp / "petastorm"), "zoo")  # it must finish
    rows = {}
    for split, n in m.sizes.items():
        if n:
            rows.update(read_split(m.split_url(split)))
    return Zoo(root, listing, m, rows, dict(m.rejected), dict(listing.ignored))


def readable_anyway(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("case", ZOO, ids=[c.id for c in ZOO])
def test_zoo_file(zoo, case):
    path = str(zoo.root / case.rel)
    if case.id == "no_read_permission" and readable_anyway(zoo.root / case.rel):
        pytest.skip("running with root's CAP_DAC_OVERRIDE: chmod 000 does not stop reads here, so the file was read "
                    "and decoded; as an ordinary user it is rejected with 'unreadable: Permission denied'")
    listed = {r.path for r in zoo.listing.records}
    if case.outcome == "decoded":
        assert path in zoo.rows, zoo.rejected.get(path, "not listed")
        tensor = zoo.rows[path]
        assert tensor.shape == PRE.shape and tensor.dtype == np.uint8
        case.check(tensor)
    elif case.outcome == "rejected":
        assert path in listed and path not in zoo.rows
        assert case.reason in zoo.rejected[path]
        if case.check:
            case.check(zoo.root / case.rel)
    else:
        assert path not in listed and case.reason in zoo.ignored[path]


def test_the_run_finishes_and_every_file_is_accounted_for(zoo):
    m, listing = zoo.m, zoo.listing
    # listed = accepted + rejected, and each listed file is exactly one of them
    assert m.listed == len(listing.records) == m.accepted + len(m.rejected)
    assert m.accepted == len(zoo.rows) == sum(m.sizes.values())
    assert set(zoo.rows) | set(zoo.rejected) == {r.path for r in listing.records}
    assert not set(zoo.rows) & set(zoo.rejected)
    decoded = sum(c.outcome == "decoded" for c in ZOO)
    assert m.accepted >= 2 * GOOD_PER_CLASS + decoded
    # everything a plain walk of the root finds is an input or ignored with a reason: nothing silently dropped
    accounted = set(zoo.rows) | set(zoo.rejected) | set(zoo.ignored)
    for dirpath, dirnames, filenames in os.walk(zoo.root):
        for name in filenames:
            assert os.path.join(dirpath, name) in accounted, name
        for name in dirnames:
            link = os.path.join(dirpath, name)
            if os.path.islink(link):
                assert link in accounted or any(p.startswith(link + os.sep) for p in accounted), link
    assert all(why for why in list(zoo.rejected.values()) + list(zoo.ignored.values()))


def test_the_datasets_rejected_csv_lists_every_rejected_file(zoo):
    """rejected.csv beside the splits (what a reused dataset reads back) holds exactly the run's rejections; the
    copies of one content under two classes are all there, and in no split."""
    with open(Path(urlparse(zoo.m.url).path) / mat.REJECTED, newline="", encoding="utf-8") as f:
        rows = {from_text(r["path"]): from_text(r["reason"]) for r in csv.DictReader(f)}
    assert rows == zoo.rejected
    twins = [str(zoo.root / c.rel) for c in ZOO if c.reason == "conflicting labels: a, b"]
    assert len(twins) == 4 and not set(twins) & set(zoo.rows)
    assert zoo.m.label_conflicts == 2 and zoo.m.summary()["data_label_conflicts"] == 2


def test_what_is_not_an_input_is_ignored_with_its_reason(tmp_path):
    """Listing only (no Spark): files beside the split folders (chest_xray's val/), class folders that
    dataset.classes leaves out, and unreadable folders are counted in `ignored`, each with the reason."""
    root = tmp_path / "cx"
    for split in ("train", "test", "val"):
        for cls in ("NORMAL", "PNEUMONIA", "maybe"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "1.png").write_bytes(b"x")
    (root / "LICENSE").write_text("CC BY 4.0")
    chest_xray = SplitFolders(str(root), ["NORMAL", "PNEUMONIA"], split_dirs={"train": "train", "test": "test"})
    listing = chest_xray.list()
    ignored = dict(listing.ignored)
    assert len(listing.records) == 4 and len(ignored) == 3 + 1 + 2
    assert all("outside the split folders" in ignored[str(root / "val" / c / "1.png")]
               for c in ("NORMAL", "PNEUMONIA", "maybe"))
    assert "outside the split folders" in ignored[str(root / "LICENSE")]
    assert "folder 'maybe' is not one of dataset.classes ['NORMAL', 'PNEUMONIA']" in ignored[
        str(root / "train" / "maybe" / "1.png")]
    locked = root / "train" / "NORMAL" / "locked"
    locked.mkdir()
    (locked / "2.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        if readable_anyway(locked / "2.png"):
            return  # root reads everything: the unreadable-folder part is real only for ordinary users
        again = dict(chest_xray.list().ignored)
        assert "unreadable folder: Permission denied" in again[str(locked)]
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_rejected_files_are_an_artifact_of_the_training_run(zoo, spark, cfg_factory):
    """Through `medspark.train.train(cfg)`: 1 epoch on the zoo folder (grayscale, 32 px); the run's
    data/rejected.csv in the MLflow artifact store lists every rejected file with its reason."""
    import mlflow

    from medspark.train import train

    cfg = cfg_factory("dataset=image_folder", f"dataset.root={zoo.root}", f"preprocess.image_size={SIZE}",
                      "train.epochs=1", "train.batch_size=8", "model.filters=[8,16]", "tracking.champion_alias=null")
    train(cfg, spark=spark)
    run = mlflow.search_runs(experiment_names=["medspark-image_folder"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    store = Path(unquote(urlparse(run.info.artifact_uri).path))
    with open(store / "data" / "rejected.csv", newline="") as f:
        logged = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    expected = {str(zoo.root / c.rel): c.reason for c in ZOO if c.outcome == "rejected"}
    if readable_anyway(zoo.root / "a" / "locked.png"):  # root: read and decoded (see test_zoo_file)
        expected.pop(str(zoo.root / "a" / "locked.png"))
    assert set(logged) == set(expected)
    for path, reason in expected.items():
        assert reason in logged[path], (path, logged[path])
    metrics = run.data.metrics
    assert metrics["data_rejected"] == len(logged)
    assert metrics["data_listed"] == metrics["data_accepted"] + metrics["data_rejected"] == len(zoo.listing.records)


def test_ignored_files_are_logged_to_mlflow(zoo, cfg_factory):
    """tracking.log_listing: data/ignored.csv (path, reason) and the metric data_ignored, in the configured MLflow
    store (sqlite + local artifact folder, as a training run has them)."""
    import mlflow

    from medspark import tracking

    cfg = cfg_factory("dataset=image_folder", f"dataset.root={zoo.root}")
    tracking.configure(cfg.tracking)
    with tracking.run("ignored") as run:
        tracking.log_listing(zoo.listing)
    store = Path(unquote(urlparse(run.info.artifact_uri).path))
    with open(store / "data" / "ignored.csv", newline="") as f:
        logged = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert logged == zoo.ignored and len(logged) >= sum(c.outcome == "ignored" for c in ZOO)
    assert mlflow.get_run(run.info.run_id).data.metrics["data_ignored"] == len(logged)
