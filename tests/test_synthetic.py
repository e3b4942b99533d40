"""The built-in phantom dataset: reproducible, reusable, safe to regenerate, and with class signal where expected."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from medspark.data import synthetic
from medspark.data.synthetic import CLASSES, MARKER, generate, phantom

SIZE = 64  # small images keep the whole file well under a few seconds


def _files(root):
    return sorted(p for p in root.rglob("*.png"))


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in _files(root)}


def test_layout_count_and_image_format(tmp_path):
    root = generate(tmp_path / "syn", per_class=3, size=SIZE, seed=1)
    assert root == tmp_path / "syn"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASSES)
    for cls in CLASSES:
        names = sorted(p.name for p in (root / cls).iterdir())
        assert names == [f"{cls}_{i:05d}.png" for i in range(3)]
        for name in names:
            with Image.open(root / cls / name) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "L", (SIZE, SIZE))
    marker = json.loads((root / MARKER).read_text())
    assert marker["per_class"] == 3 and marker["size"] == SIZE and marker["seed"] == 1 and marker["files"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temp folders left beside root


def test_deterministic_and_independent_of_per_class(tmp_path):
    a = _bytes(generate(tmp_path / "a", per_class=3, size=SIZE, seed=7))
    b = _bytes(generate(tmp_path / "b", per_class=3, size=SIZE, seed=7))
    assert a == b
    more = _bytes(generate(tmp_path / "more", per_class=5, size=SIZE, seed=7))
    assert {k: more[k] for k in a} == a  # the first 3 per class are the same files
    other = _bytes(generate(tmp_path / "other", per_class=3, size=SIZE, seed=8))
    assert all(other[k] != a[k] for k in a)
    assert len(set(a.values())) == len(a)  # no two images alike


def test_complete_set_is_reused_without_rewriting(tmp_path):
    root = generate(tmp_path / "syn", per_class=2, size=SIZE)
    before = {p: p.stat().st_mtime_ns for p in [*_files(root), root / MARKER]}
    assert generate(root, per_class=2, size=SIZE) == root
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("damage", ["marker_deleted", "file_deleted", "other_params"])
def test_incomplete_or_different_set_is_regenerated(tmp_path, damage):
    root = generate(tmp_path / "syn", per_class=2, size=SIZE)
    want = _bytes(root)
    victim = root / "glioma" / "glioma_00001.png"
    victim.write_bytes(b"half-written")
    if damage == "marker_deleted":
        (root / MARKER).unlink()
    elif damage == "file_deleted":
        (root / "pituitary" / "pituitary_00000.png").unlink()
    else:
        generate(root, per_class=3, size=SIZE)  # a different set replaces it ...
        assert len(_files(root)) == 12
        victim.write_bytes(b"half-written")
    generate(root, per_class=2, size=SIZE)  # ... and the original parameters bring the original set back
    assert _bytes(root) == want
    assert json.loads((root / MARKER).read_text())["per_class"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    real_phantom = synthetic.phantom
    calls = []

    def dying(cls, rng, size):
        calls.append(cls)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user hits Ctrl-C mid-way
        return real_phantom(cls, rng, size)

    monkeypatch.setattr(synthetic, "phantom", dying)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "syn", per_class=3, size=SIZE)
    assert list(tmp_path.iterdir()) == []  # neither a partial root nor temp folders
    monkeypatch.setattr(synthetic, "phantom", real_phantom)
    assert len(_files(generate(tmp_path / "syn", per_class=3, size=SIZE))) == 12


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "glioma").mkdir()
    (tmp_path / "glioma" / "scan_001.jpg").write_bytes(b"real patient data")
    with pytest.raises(ValueError, match="scan_001.jpg.*refusing"):
        generate(tmp_path, per_class=1, size=SIZE)
    (tmp_path / "glioma" / "scan_001.jpg").unlink()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt.*refusing"):
        generate(tmp_path, per_class=1, size=SIZE)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_empty_existing_folder_is_used(tmp_path):
    assert len(_files(generate(tmp_path, per_class=1, size=SIZE))) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_class=0), r"per_class=0 must be an integer >= 1"),
    (dict(per_class=2.5), r"per_class=2.5 must be an integer >= 1"),
    (dict(per_class=1, size=16), r"size=16 must be an integer >= 32"),
    (dict(per_class=1, seed=-1), r"seed=-1 must be an integer >= 0"),
])
def test_bad_arguments_say_what_is_valid(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "syn", **kwargs)
    assert not (tmp_path / "syn").exists()


def test_phantom_rejects_unknown_class_and_is_reproducible():
    with pytest.raises(ValueError, match="'tumour'.*glioma, meningioma, notumor, pituitary"):
        phantom("tumour", np.random.default_rng(0), SIZE)
    a = phantom("glioma", np.random.default_rng(3), 48)
    assert a.dtype == np.uint8 and a.shape == (48, 48)
    assert np.array_equal(a, phantom("glioma", np.random.default_rng(3), 48))


def _lesion_maps(cls, n=24, size=SIZE):
    """|cls - notumor| for the same scans (same rng state: the lesion is the only difference)."""
    return np.array([np.abs(phantom(cls, np.random.default_rng([99, i]), size).astype(int)
                            - phantom("notumor", np.random.default_rng([99, i]), size)) for i in range(n)])


def test_lesions_are_where_the_class_puts_them():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE  # 0..1, y down (inferior)
    r = np.hypot(xx - 0.5, yy - 0.5)
    centre, rim = r < 0.2, r > 0.3  # inner brain vs. just inside the skull
    maps = {c: _lesion_maps(c) for c in ("glioma", "meningioma", "pituitary")}
    assert all((m.reshape(len(m), -1).max(1) > 25).all() for m in maps.values())  # every image has a visible lesion
    pit = maps["pituitary"].sum(0)
    skull_base = (yy > 0.6) & (yy < 0.9) & (np.abs(xx - 0.5) < 0.12)
    assert pit[skull_base].sum() > 0.95 * pit.sum()  # midline, inferior, the same place every time
    men, gli = maps["meningioma"].sum(0), maps["glioma"].sum(0)
    assert men[rim].sum() > 5 * men[centre].sum()  # dural-based: against the skull
    assert gli[centre].sum() > 2 * gli[rim].sum()  # intra-axial: away from the edge
    area = {c: (m > 40).sum((1, 2)).mean() for c, m in maps.items()}
    assert area["pituitary"] < area["meningioma"] and area["pituitary"] < area["glioma"]


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    """Benchmarks generate 50,000 images in several processes: the files must not depend on how many."""
    assert _bytes(generate(tmp_path / "one", per_class=3, size=SIZE, seed=3)) == \
        _bytes(generate(tmp_path / "two", per_class=3, size=SIZE, seed=3, workers=2))
    assert oct(os.stat(tmp_path / "two").st_mode & 0o777) != oct(0o700), "readable by executors of other users"
