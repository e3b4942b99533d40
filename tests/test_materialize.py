"""Spark -> Petastorm on real files: every listed file is accounted for, odd real-world files are handled,
a finished dataset is reused, and a half-written one never is."""
import os
import shutil

import numpy as np
import pytest

from medspark.data import materialize as mat
from medspark.data import tasks
from medspark.data.loader import read_arrays
from medspark.data.preprocess import PreprocessConfig
from medspark.data.sources.class_folders import ClassFolders
from medspark.data.sources.split_folders import SplitFolders
from conftest import shared_dataset

PRE = PreprocessConfig(image_size=48, channels=1)
SPLIT = {"val": 0.2, "test": 0.2, "seed": 0}


def sample(src_root, dst, per_class, extra=()):
    """A small real sample: the first files of each class folder (symlinked), plus named quirky files."""
    for cls_dir in sorted(p for p in src_root.iterdir() if p.is_dir()):
        out = dst / cls_dir.name
        out.mkdir(parents=True)
        names = sorted(os.listdir(cls_dir))[:per_class] + [n for n in extra if (cls_dir / n).exists()]
        for name in dict.fromkeys(names):
            os.symlink(cls_dir / name, out / name)
    return dst


def listing_of(root, source=ClassFolders, **kw):
    return source(str(root), **kw).list()


def check_accounting(m, listing):
    assert m.listed == len(listing.records) == m.accepted + len(m.rejected)
    assert m.accepted == sum(m.sizes.values())


@pytest.mark.real_data
def test_real_brain_tumor_sample_with_png_in_jpg(spark, tmp_path):
    src = shared_dataset("brain-tumor-mri") / "Training"
    png_in_jpg = [f"Tr-no_{i}.jpg" for i in (1005, 1011, 1012, 1019, 1020)]
    root = sample(src, tmp_path / "brain", per_class=12, extra=png_in_jpg)
    listing = listing_of(root)
    m = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "brain")
    check_accounting(m, listing)
    assert not m.rejected, "every real image decodes, PNG data in .jpg files included"
    images, labels = read_arrays(m.split_url("train"))
    assert images.shape[1:] == (48, 48, 1) and images.dtype == np.uint8 and len(images) == m.sizes["train"]
    assert set(labels) == {0, 1, 2, 3} and images.std() > 10
    # The listing is sorted by class; the file order must not be, or each Petastorm row group holds one class
    # and training batches see one class at a time (sorted, the labels would change 3 times).
    assert np.count_nonzero(np.diff(labels)) > len(labels) / 2, f"rows are written class-sorted: {labels}"


@pytest.mark.real_data
def test_real_chest_xray_sample_with_ds_store_and_predefined_test(spark, tmp_path):
    src = shared_dataset("chest-xray-pneumonia")
    for split in ("train", "test"):
        sample(src / split, tmp_path / "cx" / split, per_class=8)
        os.symlink(src / split / ".DS_Store", tmp_path / "cx" / split / "NORMAL" / ".DS_Store")  # the real one
        os.symlink(src / split / ".DS_Store", tmp_path / "cx" / split / ".DS_Store")  # outside class folders: ignored
    listing = listing_of(tmp_path / "cx", SplitFolders, split_dirs={"train": "train", "test": "test"})
    assert listing.has_test_split
    m = mat.materialize(spark, listing, PreprocessConfig(image_size=48, channels=3), SPLIT, str(tmp_path / "d"), "cx")
    check_accounting(m, listing)
    ds_store = [why for path, why in m.rejected if path.endswith(".DS_Store")]
    assert len(ds_store) == 2 and all("system file" in w for w in ds_store)
    assert len(m.rejected) == len(ds_store)
    assert m.sizes["test"] == 16, "the dataset's own test folder is the test split"
    assert read_arrays(m.split_url("test"))[0].shape[1:] == (48, 48, 3)


@pytest.mark.real_data
def test_real_yes_no_mixed_extensions_and_duplicates(spark, tmp_path):
    root = shared_dataset("brain-mri-yes-no")
    listing = listing_of(root)
    exts = {os.path.splitext(r.path)[1] for r in listing.records}
    assert {".jpg", ".JPG", ".jpeg", ".png"} <= exts
    m = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "yesno")
    check_accounting(m, listing)
    assert m.accepted == 253 and m.duplicate_groups > 0
    where = {}
    for split in ("train", "val", "test"):
        from petastorm import make_reader
        with make_reader(m.split_url(split), schema_fields=["sha1"], num_epochs=1) as r:
            for row in r:
                assert where.setdefault(row.sha1, split) == split, "a duplicated content straddles splits"


def test_corrupt_files_are_skipped_counted_and_listed(spark, tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((32, 32), 40 * i + (100 if cls == "b" else 0), np.uint8)).save(
                tmp_path / "ds" / cls / f"{i}.png")
    (tmp_path / "ds" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "ds" / "b" / "empty.png").write_bytes(b"")
    (tmp_path / "ds" / "b" / "notes.txt").write_text("scan protocol v2")
    listing = listing_of(tmp_path / "ds")
    m = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "zoo")
    check_accounting(m, listing)
    reasons = dict((os.path.basename(p), why) for p, why in m.rejected)
    assert set(reasons) == {"broken.jpg", "empty.png", "notes.txt"}
    assert "empty file" in reasons["empty.png"] and "not an image" in reasons["notes.txt"]
    assert m.accepted == 12
    csv_text = (tmp_path / "data" / "zoo" / m.fingerprint / mat.REJECTED).read_text()
    assert "broken.jpg" in csv_text, "the rejected list is kept next to the data"


def test_finished_dataset_is_reused_and_partial_one_rebuilt(spark, tmp_path):
    src = tmp_path / "ds"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(5):
            from PIL import Image
            Image.fromarray(np.full((20, 20), i * 30 + (cls == "b") * 7, np.uint8)).save(src / cls / f"{i}.png")
    listing = listing_of(src)
    first = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "tiny")
    assert not first.reused
    again = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "tiny")
    assert again.reused and again.sizes == first.sizes and again.url == first.url
    other = mat.materialize(spark, listing, PreprocessConfig(image_size=32), SPLIT, str(tmp_path / "data"), "tiny")
    assert other.url != first.url and not other.reused, "a preprocessing change gets its own dataset"
    # a write that died: the folder is there, the manifest is not -> rebuilt with the right row count
    folder = tmp_path / "data" / "tiny" / first.fingerprint
    (folder / mat.MANIFEST).unlink()
    shutil.rmtree(folder / "val")
    rebuilt = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "tiny")
    assert not rebuilt.reused and rebuilt.sizes == first.sizes
    assert len(read_arrays(rebuilt.split_url("val"))[1]) == first.sizes["val"]
    # a changed input file changes the fingerprint
    from PIL import Image
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(src / "a" / "0.png")
    os.utime(src / "a" / "0.png", ns=(1, 1))
    assert mat.fingerprint(listing, PRE, SPLIT) != first.fingerprint


def test_each_task_writes_one_complete_file_and_petastorm_indexes_it(spark, tmp_path):
    """The executors write Parquet themselves (temporary name, then rename): the splits hold only finished
    part files, Petastorm's row-group index matches the files, and a task retried after a crash (same chunk
    written twice, the second attempt renaming over the first) leaves the rows exactly once."""
    import json

    import pyarrow.parquet as pq
    from PIL import Image
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY
    from petastorm.fs_utils import FilesystemResolver

    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.full((24, 24), 3 * i + (cls == "b") * 128, np.uint8)).save(
                tmp_path / "ds" / cls / f"{i}.png")
    listing = listing_of(tmp_path / "ds")
    m = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "parts", row_group_size_mb=1)
    check_accounting(m, listing)
    for split, n in m.sizes.items():
        folder = tmp_path / "data" / "parts" / m.fingerprint / split
        names = sorted(os.listdir(folder))
        parts = [f for f in names if f.startswith("part-")]
        assert parts and set(names) == set(parts) | {"_common_metadata"}, f"leftovers in {split}: {names}"
        index = json.loads(pq.read_schema(folder / "_common_metadata").metadata[ROW_GROUPS_PER_FILE_KEY])
        assert index == {f: pq.ParquetFile(folder / f).num_row_groups for f in parts}
        assert sum(pq.ParquetFile(folder / f).metadata.num_rows for f in parts) == n == len(read_arrays(
            m.split_url(split))[1])
    # A retried task: the same chunk written again (as Spark does after losing an executor) replaces its file.
    folder = tmp_path / "data" / "parts" / m.fingerprint / "train"
    part = sorted(f for f in os.listdir(folder) if f.startswith("part-"))[0]
    rows = pq.read_table(folder / part, columns=["path", "label", "sha1"]).to_pylist()
    index = int(part.split("-")[1].split(".")[0])
    resolver = FilesystemResolver(m.url)
    tasks.write_chunk((index, [(r["path"], r["label"], "train", r["sha1"], None, None) for r in rows]), PRE,
                      resolver.get_dataset_path(), resolver.filesystem_factory(), 100, m.task, len(m.classes))
    assert all(f.startswith("part-") or f == "_common_metadata" for f in os.listdir(folder)), os.listdir(folder)
    assert pq.read_table(folder / part).num_rows == len(rows)
    assert len(read_arrays(m.split_url("train"))[1]) == m.sizes["train"]


def test_hash_paths_writes_a_pseudonym_for_every_path(spark, tmp_path):
    """privacy.hash_paths: a folder named after a patient appears in no Parquet row and no rejected.csv line; the
    pseudonym is the same for the same key, and the paths-kept and paths-hidden datasets are different datasets."""
    import pyarrow.parquet as pq
    from PIL import Image

    from medspark.data import phi

    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls / "Doe^Jane_0001").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((20, 20), i * 30 + (cls == "b") * 7, np.uint8)).save(
                root / cls / "Doe^Jane_0001" / f"{i}.png")
    (root / "a" / "Doe^Jane_0001" / "broken.png").write_bytes(b"\x89PNG truncated")
    listing = listing_of(root)

    def written(m):
        folder = tmp_path / "data" / "h" / m.fingerprint
        paths = {v for f in folder.rglob("*.parquet") for v in pq.read_table(f, columns=["path"])["path"].to_pylist()}
        return paths, (folder / mat.REJECTED).read_text()

    kept = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "h")
    hidden = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "h", path_key=b"k1")
    assert hidden.fingerprint != kept.fingerprint and not hidden.reused
    paths, rejected = written(kept)
    assert all("Doe^Jane_0001" in p for p in paths) and "Doe^Jane_0001" in rejected  # the control: paths kept
    paths, rejected = written(hidden)
    assert len(paths) == 10 and "Doe" not in "".join(paths) + rejected
    assert paths == {phi.shown_path(str(p), b"k1") for p in root.rglob("[0-9].png")}
    assert all(p.startswith("file-") and p.endswith(".png") for p in paths)
    assert [p for p, _ in hidden.rejected] == [phi.shown_path(str(root / "a" / "Doe^Jane_0001" / "broken.png"), b"k1")]
    other_key = mat.materialize(spark, listing, PRE, SPLIT, str(tmp_path / "data"), "h", path_key=b"k2")
    assert other_key.fingerprint not in (kept.fingerprint, hidden.fingerprint)
