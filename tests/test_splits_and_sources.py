"""Listings and splits: layouts are read as users lay them out, bad roots fail with the key to set, and
equal contents never straddle train and test (the leak that inflates published accuracies)."""
import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medspark.data.sources import DatasetError, Listing, Record, list_dataset
from medspark.data.splits import assign
from conftest import shared_dataset


def listing(source="class_folders.ClassFolders", **kw):
    """The listing of a `dataset` config naming a built-in source, as training makes it."""
    return list_dataset(OmegaConf.create({"name": "t", "_target_": f"medspark.data.sources.{source}", **kw}))


def fill(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(n.encode())


def test_class_folders_and_split_folders(tmp_path):
    fill(tmp_path / "a" / "b", ["1.png", "2.png"])
    fill(tmp_path / "a" / "c", ["3.png"])
    found = listing(root=str(tmp_path / "a"))
    assert found.classes == ["b", "c"] and found.counts() == {"b": 2, "c": 1} and not found.has_test_split
    fill(tmp_path / "s" / "Training" / "x", ["1.jpg", "2.jpg"])
    fill(tmp_path / "s" / "Training" / "y", ["3.jpg"])
    fill(tmp_path / "s" / "Testing" / "x", ["4.jpg"])
    found = listing("split_folders.SplitFolders", root=str(tmp_path / "s"),
                    split_dirs={"train": "Training", "test": "Testing"})
    assert found.has_test_split and [r.split for r in found.records].count("test") == 1


@pytest.mark.parametrize("root, match", [(None, "dataset.root is not set"), ("???", "dataset.root is not set"),
                                         ("/nonexistent/scans", "dataset.root=/nonexistent/scans does not exist")])
def test_missing_root_names_the_key(root, match):
    with pytest.raises(DatasetError, match=match):
        listing(root=root)


def test_empty_class_folder_and_missing_class_fail_clearly(tmp_path):
    fill(tmp_path / "yes", ["1.png"])
    (tmp_path / "no").mkdir()
    with pytest.raises(DatasetError, match="class folder .*no is empty"):
        listing(root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"\['maybe'\] not found"):
        listing(root=str(tmp_path), classes=["yes", "maybe"])


class Csv:
    """A source from outside medspark, as a user's own module would define one: a CSV of `file,class` rows."""
    has_test_split = False

    def __init__(self, root, csv="labels.csv"):
        self.root, self.csv = Path(root), csv

    def list(self):
        rows = [line.split(",") for line in (self.root / self.csv).read_text().split()]
        classes = sorted({c for _, c in rows})
        return Listing([Record(str(self.root / f), classes.index(c), None) for f, c in rows], classes, False)


def test_a_new_source_is_one_class_named_by_the_dataset_config(tmp_path):
    (tmp_path / "labels.csv").write_text("a.png,x\nb.png,y\nc.png,x\n")
    found = list_dataset(OmegaConf.create({"name": "mine", "_target_": f"{__name__}.Csv", "root": str(tmp_path)}))
    assert found.classes == ["x", "y"] and found.counts() == {"x": 2, "y": 1}


def test_source_settings_are_checked_by_name(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.layout is not a setting of the ClassFolders source "
                                           r"\(medspark\.data\.sources\.class_folders\.ClassFolders\); its settings: "
                                           r"root, classes, patient_pattern$"):
        listing(root=str(tmp_path), layout="class_folders")
    with pytest.raises(DatasetError, match=r"dataset\._target_ is not set"):
        list_dataset(OmegaConf.create({"name": "t", "root": str(tmp_path)}))
    with pytest.raises(DatasetError, match=r"dataset\._target_=medspark\.data\.sources\.nope\.Nope cannot be imported"):
        listing("nope.Nope", root=str(tmp_path))


def items_from(n_per_class, dup_every=0, classes=2):
    out = []
    for c in range(classes):
        for i in range(n_per_class):
            sha = f"{c}-{i // 2}" if dup_every and i % dup_every < 2 else f"{c}-{i}-u"
            out.append((f"/d/{c}/{i}.png", c, sha, None))
    return out


def test_split_is_stratified_seeded_and_keeps_duplicates_together():
    items = items_from(100, dup_every=5)
    rep = assign(items, ["a", "b"], val=0.15, test=0.15, seed=3)
    for cls in ("a", "b"):
        assert 12 <= rep.per_class["test"][cls] <= 18 and 12 <= rep.per_class["val"][cls] <= 18
    where = defaultdict(set)
    for path, _, sha, _ in items:
        where[sha].add(rep.assignment[path])
    assert all(len(s) == 1 for s in where.values())
    assert rep.duplicate_groups > 0
    assert assign(items, ["a", "b"], 0.15, 0.15, seed=3).assignment == rep.assignment
    assert assign(items, ["a", "b"], 0.15, 0.15, seed=4).assignment != rep.assignment
    assert assign(list(reversed(items)), ["a", "b"], 0.15, 0.15, seed=3).assignment == rep.assignment


def test_predefined_test_split_is_honoured_and_wins_duplicates():
    items = [(f"/train/{i}.png", i % 2, f"h{i}", None) for i in range(40)]
    items += [("/test/0.png", 0, "h0", "test"), ("/test/x.png", 1, "hx", "test")]  # h0 is also in train
    rep = assign(items, ["a", "b"], val=0.2, test=0.3, seed=0, has_test_split=True)
    assert rep.assignment["/test/x.png"] == "test" and rep.assignment["/train/0.png"] == "test"
    assert rep.moved_to_test == 1 and rep.sizes["test"] == 3  # nothing else carved out for test


@pytest.mark.parametrize("val, test, match", [(0, 0.2, "split.val"), (0.2, 1.0, "split.test"), (0.2, 0, "split.test"),
                                              (0.5, 0.5, "leaves nothing to train")])
def test_bad_fractions_name_the_key(val, test, match):
    with pytest.raises(ValueError, match=match):
        assign(items_from(10), ["a", "b"], val, test, 0)


def test_one_content_under_two_labels_is_rejected_unless_kept():
    """A copy (or one file linked into two class folders: the same content) filed as a and as b: every copy is
    rejected with the reason by default, in no split; split.label_conflicts=keep trains each with its label."""
    twins = [("/d/0/dup.png", 0, "same", None), ("/d/1/dup.png", 1, "same", None), ("/d/1/dup2.png", 1, "same", None)]
    items = items_from(10) + twins
    rep = assign(items, ["a", "b"], 0.2, 0.2, seed=0)
    assert sorted(rep.rejected) == [(p, "conflicting labels: a, b") for p, *_ in twins]
    assert not {p for p, *_ in twins} & set(rep.assignment) and sum(rep.sizes.values()) == 20
    assert rep.label_conflicts == 1
    kept = assign(items, ["a", "b"], 0.2, 0.2, seed=0, label_conflicts="keep")
    assert not kept.rejected and len({kept.assignment[p] for p, *_ in twins}) == 1 and kept.label_conflicts == 1
    with pytest.raises(ValueError, match=r"split\.label_conflicts='merge' must be one of reject, keep"):
        assign(items, ["a", "b"], 0.2, 0.2, seed=0, label_conflicts="merge")
    test_copy = items_from(10) + [("/test/x.png", 0, "x", "test"), ("/d/1/x.png", 1, "x", None)]
    rep = assign(test_copy, ["a", "b"], 0.2, 0.2, seed=0, has_test_split=True)  # the dataset's test split too
    assert [r for _, r in rep.rejected] == ["conflicting labels: a, b"] * 2 and rep.moved_to_test == 0


def test_a_class_emptied_by_conflicts_names_them():
    items = items_from(10, classes=1) + [(f"/d/1/{i}.png", 1, f"0-{i}-u", None) for i in range(3)]
    with pytest.raises(ValueError, match=r"class 'b' has 0 distinct image\(s\).*\(3 of its files were rejected: "
                                         r"conflicting labels\)"):
        assign(items, ["a", "b"], 0.2, 0.2, seed=0)


def test_a_class_folder_that_is_another_is_refused_in_one_line(tmp_path):
    fill(tmp_path / "yes", ["1.png", "2.png"])
    fill(tmp_path / "no", ["3.png"])
    os.symlink(tmp_path / "yes", tmp_path / "maybe")  # every image of `yes` would be `maybe` too
    with pytest.raises(DatasetError, match=r"^class folder \S+/maybe resolves to \S+/yes, which is the same folder as "
                                           r"class folder \S+/yes: its images would carry both labels 'maybe' and "
                                           r"'yes'; remove the link or leave one class out of dataset\.classes$"):
        listing(root=str(tmp_path))
    (tmp_path / "maybe").unlink()
    fill(tmp_path / "yes" / "sub", ["4.png"])
    os.symlink(tmp_path / "yes" / "sub", tmp_path / "maybe")
    with pytest.raises(DatasetError, match=r"/maybe resolves to \S+/yes/sub, which is inside class folder \S+/yes:"):
        listing(root=str(tmp_path))
    assert listing(root=str(tmp_path), classes=["no", "yes"]).counts() == {"no": 1, "yes": 3}


def test_file_names_may_be_any_bytes_but_class_names_are_text(tmp_path):
    root = os.fsencode(tmp_path)
    for cls in (b"a", b"b"):
        os.makedirs(os.path.join(root, cls))
        for name in (b"scan_\xff\xfe_latin1.png", b"line\nbreak.png", b"x" * 250):
            open(os.path.join(root, cls, name), "wb").close()
    found = listing(root=str(tmp_path))
    assert found.counts() == {"a": 3, "b": 3}
    assert os.fsdecode(os.path.join(root, b"a", b"scan_\xff\xfe_latin1.png")) in {r.path for r in found.records}
    os.makedirs(os.path.join(root, b"caf\xe9"))
    open(os.path.join(root, b"caf\xe9", b"1.png"), "wb").close()
    with pytest.raises(DatasetError, match=r"class folder 'caf\\xe9' in \S+ has a name that is not UTF-8 text; "
                                           r"rename the folder"):
        listing(root=str(tmp_path))


def test_too_few_images_to_stratify():
    items = items_from(10) + [("/d/2/0.png", 2, "lonely", None), ("/d/2/1.png", 2, "lonely2", None)]
    with pytest.raises(ValueError, match="class 'c' has 2 distinct image"):
        assign(items, ["a", "b", "c"], 0.15, 0.15, 0)


@pytest.mark.real_data
def test_real_brain_mri_duplicates_never_straddle_splits():
    root = shared_dataset("brain-tumor-mri")
    found = listing("split_folders.SplitFolders", root=str(root), split_dirs={"train": "Training", "test": "Testing"},
                    classes=["glioma", "meningioma", "notumor", "pituitary"])
    assert len(found.records) == 5712 and not found.has_test_split  # Testing is held back from us
    items = [(r.path, r.label, hashlib.sha1(open(r.path, "rb").read()).hexdigest(), r.split) for r in found.records]
    rep = assign(items, found.classes, 0.15, 0.15, seed=42)
    assert rep.duplicate_groups == 148
    splits_of = defaultdict(set)
    for path, _, sha, _ in items:
        splits_of[sha].add(rep.assignment[path])
    assert all(len(s) == 1 for s in splits_of.values())
    assert sum(rep.sizes.values()) == 5712
    shares = Counter(rep.assignment.values())
    assert abs(shares["test"] / 5712 - 0.15) < 0.01 and abs(shares["val"] / 5712 - 0.15) < 0.01
