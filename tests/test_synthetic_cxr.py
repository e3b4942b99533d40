"""The synthetic chest X-ray set: NIH's published layout and columns, reproducible to the byte, split by patient,
imbalanced like the real set, each finding a visible local sign, and read by the same source as the real set."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from medspark.data import synthetic_cxr
from medspark.data.phi import pseudonym
from medspark.data.sources import list_dataset
from medspark.data.synthetic_cxr import FINDINGS, MARKER, NEGATIVE, anatomy, generate, plan, radiograph
from medspark.data.targets import names
from conftest import make_cfg

NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]  # as published


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """30 patients (~70 images), 48 px, 25 images per images_NNN folder: three image folders."""
    return generate(tmp_path_factory.mktemp("cxr") / "set", patients=30, size=48, seed=5, per_folder=25)


def test_nih_layout_columns_and_split_lists(small):
    folders = sorted(p.name for p in small.iterdir() if p.is_dir())
    assert folders == ["images_001", "images_002", "images_003"]
    with open(small / "Data_Entry_2017.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == NIH_COLUMNS and all(len(r) == len(NIH_COLUMNS) for r in rows)
    images = {p.name: p.parent.parent.name for p in small.glob("images_*/images/*.png")}
    assert sorted(images) == sorted(r[0] for r in rows[1:])  # one row per image, no image without a row
    by_patient = defaultdict(list)
    for r in rows[1:]:
        assert r[0] == f"{int(r[3]):08d}_{int(r[2]):03d}.png"
        labels = r[1].split("|")
        assert labels == [NEGATIVE] or (set(labels) <= set(FINDINGS) and labels == sorted(labels, key=FINDINGS.index))
        by_patient[r[3]].append(int(r[2]))
    assert all(f == list(range(len(f))) for f in by_patient.values())  # follow-ups 0, 1, ... per patient
    assert max(len(f) for f in by_patient.values()) > 1
    lists = {s: (small / n).read_text().split() for s, n in synthetic_cxr.LISTS.items()}
    assert sorted(lists["train"] + lists["test"]) == sorted(images)  # every image in exactly one list
    patients = {s: {n[:8] for n in names_} for s, names_ in lists.items()}
    assert patients["test"] and not patients["train"] & patients["test"]  # split by patient, like NIH's


def test_deterministic_and_patients_only_append(small, tmp_path):
    again = generate(tmp_path / "again", patients=30, size=48, seed=5, per_folder=25, workers=2)
    assert _bytes(again) == _bytes(small)  # same arguments, same bytes, whatever the worker count
    more = _bytes(generate(tmp_path / "more", patients=32, size=48, seed=5, per_folder=25))
    pngs = {k: v for k, v in _bytes(small).items() if k.endswith(".png")}
    assert {k: more[k] for k in pngs} == pngs
    other = _bytes(generate(tmp_path / "other", patients=30, size=48, seed=6, per_folder=25))
    assert other["Data_Entry_2017.csv"] != _bytes(small)["Data_Entry_2017.csv"]


def test_the_plan_does_not_depend_on_the_process():
    """Workers draw pixels from the plan they compute themselves: it must not follow Python's hash seed."""
    code = "from medspark.data.synthetic_cxr import plan; print(plan(400, 0))"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(out) == 1 and str(plan(400, 0)) + "\n" in out


def test_complete_set_is_reused_and_foreign_folders_are_not_overwritten(small, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*")}
    generate(small, patients=30, size=48, seed=5, per_folder=25)
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == before
    assert json.loads((small / MARKER).read_text())["files"] == len(plan(30, 5))
    mine = tmp_path / "mine"
    (mine / "images_001" / "images").mkdir(parents=True)
    (mine / "images_001" / "images" / "scan.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not part of a synthetic chest X-ray set; refusing to overwrite"):
        generate(mine, patients=2, size=48)
    assert (mine / "images_001" / "images" / "scan.png").read_bytes() == b"x"


def test_prevalence_is_shaped_like_the_real_set():
    exams = plan(700, 0)  # the default size; no pixels drawn
    n = len(exams)
    share = {f: c / n for f, c in Counter(f for e in exams for f in e.findings).items()}
    assert 1400 <= n <= 2000 and set(share) == set(FINDINGS)
    assert 0.52 <= sum(not e.findings for e in exams) / n <= 0.62  # a "No Finding" majority
    assert 0.025 <= min(share.values()) <= 0.055 and min(share, key=share.get) == "Mass"  # a rare finding
    assert sum(len(e.findings) > 1 for e in exams) / n > 0.08  # findings co-occur
    follow_ups = Counter(e.patient for e in exams)
    assert max(follow_ups.values()) >= 5 and sum(v > 1 for v in follow_ups.values()) > 250
    cardio = defaultdict(set)  # chronic findings follow the patient across follow-ups
    for e in exams:
        cardio[e.patient].add("Cardiomegaly" in e.findings)
    multi = [s for p, s in cardio.items() if follow_ups[p] > 1 and True in s]
    assert sum(s == {True} for s in multi) > len(multi) / 2


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_is_a_visible_local_sign(finding):
    """The same patient and exposure with and without the finding: the images differ, and only where it is."""
    changed, area = [], []
    for p in range(6):
        body = anatomy(np.random.default_rng([1, p]))
        without = radiograph(body, (), np.random.default_rng([1, p, 9]), 64).astype(int)
        with_it = radiograph(body, (finding,), np.random.default_rng([1, p, 9]), 64).astype(int)
        diff = np.abs(with_it - without)
        changed.append(diff[diff > 12].sum() / 255)
        area.append((diff > 12).mean())
    assert min(changed) > 3  # intensity x pixels: a sign a 64-px CNN can see
    assert max(area) < 0.3  # local, not a global brightness change


def test_listed_through_its_dataset_option_like_the_real_set(tmp_path):
    cfg = make_cfg(tmp_path, ["dataset=synthetic_cxr14", "dataset.generate.patients=25", "dataset.generate.size=48"])
    listing = list_dataset(cfg.dataset)
    exams = plan(25, cfg.seed)
    assert listing.task == "multilabel" and listing.classes == list(FINDINGS) and listing.has_test_split
    assert not listing.rejected and [p.rsplit("/", 1)[1] for p, _ in listing.ignored] == [MARKER]
    got = [(r.path.rsplit("/", 1)[1], names(r.label, listing.task, listing.classes), r.split, r.patient)
           for r in listing.records]
    assert got == [(e.name, "|".join(e.findings) or NEGATIVE, "test" if e.test else None, pseudonym(e.patient))
                   for e in exams]
