"""Labels from a CSV: NIH ChestX-ray14's published format read as published, every odd row accounted for with its
reason and row number, files no row names ignored with theirs, and no patient id or other CSV column in the listing."""
from __future__ import annotations

import time

import pytest
from omegaconf import OmegaConf
from PIL import Image

from medspark.data.phi import pseudonym
from medspark.data.sources import DatasetError, list_dataset
from medspark.data.targets import names
from conftest import make_cfg

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
ROWS = [  # row 1 is the header; the comment says what the source must make of each row
    '00000001_000.png,"Cardiomegaly|Effusion",0,PID-4711,58,M,PA,8,8,0.14,0.14',  # 2: quoted, two findings
    "00000001_001.png,No Finding ,1,PID-4711,58,M,PA,8,8,0.14,0.14,extra,cells",  # 3: negative, extra columns
    "00000002_000.png,Mass |Nodule  ,0,PID-0815,61,F,AP,8,8,0.14,0.14",  # 4: trailing spaces; images_002; test list
    "00000003_000.png,Fracture,0,PID-0815,61,F,AP,8,8,0.14,0.14",  # 5: unknown label
    "00000004_000.png,Effusion,0,PID-2222,30,F,PA,8,8,0.14,0.14",  # 6: no such image
    "00000005_000.png,Nodule,0,PID-3333,44,M,PA,8,8,0.14,0.14",  # 7: kept ...
    "00000005_000.png,Nodule,0,PID-3333,44,M,PA,8,8,0.14,0.14",  # 8: ... its copy with the same labels dropped
    "00000006_000.png,Mass,0,PID-4444,50,M,PA,8,8,0.14,0.14",  # 9: the same image with different labels:
    "00000006_000.png,Effusion,0,PID-4444,50,M,PA,8,8,0.14,0.14",  # 10: both rejected
    "00000007_000.png,,0,PID-5555,70,F,PA,8,8,0.14,0.14",  # 11: empty label
    "00000008_000.png,Atelectasis,0,PID-6666,25,M,PA,8,8,0.14,0.14",  # 12: in both image folders
    "00000009_000.png,No Finding|Mass,0,PID-7777,33,F,PA,8,8,0.14,0.14",  # 13: negative with a finding
    "00000010_000.png,Effusion,0,PID-8888,41,M,PA,8,8,0.14,0.14",  # 14: in neither split list
    "",  # a blank line: not a row (but numbered, as a spreadsheet shows it)
    "00000011_000.png",  # 16: truncated
    "00000012_000.png,Hernia|Effusion,3,PID-9999,80,F,AP,8,8,0.14,0.14",  # 17: test list; Hernia, NIH's rarest
]
RAW_IDS = ["PID-4711", "PID-0815", "PID-2222", "PID-3333", "PID-4444", "PID-5555", "PID-6666", "PID-7777",
           "PID-8888", "PID-9999"]
IN_001 = ["00000001_000.png", "00000001_001.png", "00000003_000.png", "00000005_000.png", "00000006_000.png",
          "00000007_000.png", "00000008_000.png", "00000009_000.png", "00000010_000.png", "00000011_000.png",
          "00000012_000.png"]
IN_002 = ["00000002_000.png", "00000008_000.png", "00000099_000.png"]  # 99: no row names it
TEST_LIST = ["00000002_000.png", "00000012_000.png", "00000077_000.png"]  # 77: not in the CSV (a partial download)
TRAIN_LIST = [n for n in IN_001 if n not in ("00000010_000.png", "00000012_000.png")]


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


@pytest.fixture
def nih(tmp_path):
    """A hand-written ChestX-ray14 sample in the published layout, every odd case in it; a BOM before the header."""
    root = tmp_path / "ChestX-ray14"
    for i, n in enumerate(IN_001):
        png(root / "images_001" / "images" / n, i)
    for i, n in enumerate(IN_002):
        png(root / "images_002" / "images" / n, 100 + i)
    (root / "Data_Entry_2017.csv").write_bytes(("\ufeff" + "\n".join([HEADER, *ROWS]) + "\n").encode("utf-8"))
    (root / "train_val_list.txt").write_text("\n".join(TRAIN_LIST) + "\n")
    (root / "test_list.txt").write_text("\n".join(TEST_LIST) + "\n")
    (root / "README_CHESTXRAY.pdf").write_bytes(b"%PDF")
    return root


def nih_listing(root, tmp_path, *overrides):
    """The listing of the sample through conf/dataset/chest_xray14.yaml, as training composes it."""
    return list_dataset(make_cfg(tmp_path, ["dataset=chest_xray14", f"dataset.root={root}", *overrides]).dataset)


def test_nih_sample_is_listed_exactly(nih, tmp_path):
    listing = nih_listing(nih, tmp_path)
    assert listing.task == "multilabel" and listing.has_test_split
    assert listing.classes[:3] == ["Atelectasis", "Cardiomegaly", "Effusion"] and len(listing.classes) == 14
    got = {r.path: (names(r.label, listing.task, listing.classes), r.split, r.patient) for r in listing.records}
    i1, i2 = nih / "images_001" / "images", nih / "images_002" / "images"
    assert got == {
        str(i1 / "00000001_000.png"): ("Cardiomegaly|Effusion", None, pseudonym("PID-4711")),
        str(i1 / "00000001_001.png"): ("No Finding", None, pseudonym("PID-4711")),
        str(i2 / "00000002_000.png"): ("Mass|Nodule", "test", pseudonym("PID-0815")),
        str(i1 / "00000005_000.png"): ("Nodule", None, pseudonym("PID-3333")),
        str(i1 / "00000012_000.png"): ("Effusion|Hernia", "test", pseudonym("PID-9999")),
    }
    assert [r.label for r in listing.records][:2] == [0b110, 0]  # bitmask: bit i = classes[i]
    assert listing.counts()["Effusion"] == 2 and listing.counts()["Pneumonia"] == 0
    csv = "Data_Entry_2017.csv"
    assert sorted(listing.rejected, key=lambda r: int(r[0].rsplit(" ", 1)[1])) == [
        (f"{csv}:row 5", "00000003_000.png: unknown label 'Fracture' (not in dataset.findings)"),
        (f"{csv}:row 6", "00000004_000.png: image not found in dataset.image_dirs"),
        (f"{csv}:row 8", "00000005_000.png: duplicate of row 7 (same labels)"),
        (f"{csv}:row 9", "00000006_000.png: listed with different labels in rows 9, 10"),
        (f"{csv}:row 10", "00000006_000.png: listed with different labels in rows 9, 10"),
        (f"{csv}:row 11", "00000007_000.png: no label (column 'Finding Labels' is empty)"),
        (f"{csv}:row 12", f"00000008_000.png: found in two image folders ({i1}, {i2})"),
        (f"{csv}:row 13", "00000009_000.png: 'No Finding' together with findings in 'No Finding|Mass'"),
        (f"{csv}:row 14", "00000010_000.png: in neither split list (dataset.split_lists)"),
        (f"{csv}:row 16", "00000011_000.png: 1 field(s), the header has 11 (truncated row)"),
    ]
    assert sorted(listing.ignored) == [(str(nih / "README_CHESTXRAY.pdf"), "outside dataset.image_dirs"),
                                       (str(i2 / "00000099_000.png"), f"not in {csv} (dataset.csv)")]
    text = repr(listing)
    assert not [raw for raw in RAW_IDS if raw in text]  # the pseudonyms only
    assert not [v for v in ("PA", "AP", "0.14") if f"'{v}'" in text]  # no other column of the CSV either


def test_every_file_and_row_is_accounted_for(nih, tmp_path):
    listing = nih_listing(nih, tmp_path)
    files = {str(p) for p in nih.rglob("*") if p.is_file()}
    listed = {r.path for r in listing.records} | {p for p, _ in listing.ignored}
    named_by_rejected_rows = {p for p in files if any(p.endswith("/" + why.split(":")[0]) for _, why in
                                                      listing.rejected)}
    metadata = {str(nih / n) for n in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt")}
    assert files == listed | named_by_rejected_rows | metadata
    rows = sum(1 for line in ROWS if line)
    assert len(listing.records) + len(listing.rejected) == rows


def test_findings_null_takes_every_label_seen(nih, tmp_path):
    listing = nih_listing(nih, tmp_path, "dataset.findings=null")
    # the classes of the rows that list an image: Fracture is one now, Atelectasis (only on a rejected row) is not
    assert listing.classes == ["Cardiomegaly", "Effusion", "Fracture", "Hernia", "Mass", "Nodule"]
    assert not any("unknown label" in why for _, why in listing.rejected)


def test_the_published_v2020_file_is_preferred_and_one_image_folder_works(nih, tmp_path):
    (nih / "Data_Entry_2017_v2020.csv").write_text(HEADER + "\n00000001_000.png,Pneumonia,0,PID-1,1,M,PA,8,8,1,1\n")
    listing = nih_listing(nih, tmp_path, "dataset.split_lists=null")
    assert [names(r.label, listing.task, listing.classes) for r in listing.records] == ["Pneumonia"]
    assert not listing.has_test_split and listing.records[0].split is None


def test_single_label_csv(tmp_path):
    root = tmp_path / "ds"
    for n in ("a.png", "b.png", "c.png", "sub/d.png"):
        png(root / "img" / n)
    (root / "labels.csv").write_text("file,diagnosis,age\na.png,normal,3\nb.png, pneumonia ,4\n./sub/d.png,normal,5\n"
                                     "c.png,normal|pneumonia,6\n")
    found = list_dataset(OmegaConf.create({"name": "t", "_target_": "medspark.data.sources.label_csv.LabelCsv",
                                           "root": str(root), "csv": "labels.csv", "image_dirs": "img",
                                           "image_column": "file", "label_column": "diagnosis"}))
    assert found.classes == ["normal", "normal|pneumonia", "pneumonia"]  # no separator: a label is the whole cell
    assert [(r.path.rsplit("/", 1)[1], r.label, r.patient) for r in found.records] == [
        ("a.png", 0, None), ("b.png", 2, None), ("d.png", 0, None), ("c.png", 1, None)]
    assert found.task == "multiclass" and not found.has_test_split


def test_image_paths_relative_to_the_root_by_default(tmp_path):
    png(tmp_path / "scans" / "1.png")
    png(tmp_path / "scans" / "2.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("path,label\nscans/1.png,a\nscans/2.png,b\n")
    found = list_dataset(OmegaConf.create({"name": "t", "_target_": "medspark.data.sources.label_csv.LabelCsv",
                                           "root": str(tmp_path), "csv": "labels.csv", "image_column": "path",
                                           "label_column": "label", "image_dirs": None}))
    assert [(r.path, r.label) for r in found.records] == [(str(tmp_path / "scans" / "1.png"), 0),
                                                          (str(tmp_path / "scans" / "2.png"), 1)]
    assert found.task == "binary" and found.ignored == [(str(tmp_path / "notes.txt"), "not in labels.csv (dataset.csv)")]


@pytest.mark.parametrize("override, message", [
    ("dataset.image_column=Image Idx",
     "dataset.image_column='Image Idx' is not a column of {root}/Data_Entry_2017.csv; its columns: 'Image Index', "
     "'Finding Labels', 'Follow-up #', 'Patient ID', 'Patient Age', 'Patient Gender', 'View Position', "
     "'OriginalImage[Width', 'Height]', 'OriginalImagePixelSpacing[x', 'y]'"),
    ("dataset.patient_column=Patient", "dataset.patient_column='Patient' is not a column of"),
    ("dataset.csv=labels.csv", "dataset.csv=labels.csv not found in {root} (files there: ['Data_Entry_2017.csv', "),
    ("dataset.image_dirs=[scans/*]", "dataset.image_dirs=['scans/*'] matches no folder under {root}; folders there: "
                                     "['images_001', 'images_002']"),
    ("dataset.split_lists.test=official_test.txt", "dataset.split_lists.test=official_test.txt not found in {root}"),
    ("dataset.findings=[Mass,Mass]", "dataset.findings=['Mass', 'Mass'] must name each class once"),
    ("dataset.task=multiclass", "dataset.separator='|' means several findings per row, so dataset.task must be"),
])
def test_config_mistakes_are_one_line_naming_the_key(nih, tmp_path, override, message):
    with pytest.raises(DatasetError) as err:
        nih_listing(nih, tmp_path, override)
    text = str(err.value)
    assert text.startswith(message.format(root=nih)) and "\n" not in text


def test_a_negative_value_needs_a_multilabel_task(tmp_path):
    with pytest.raises(DatasetError, match=r"^dataset\.negative='normal' is the multi-label 'no finding' value"):
        list_dataset(OmegaConf.create({"name": "t", "_target_": "medspark.data.sources.label_csv.LabelCsv",
                                       "root": str(tmp_path), "csv": "x.csv", "image_column": "f",
                                       "label_column": "l", "negative": "normal"}))


@pytest.mark.slow
def test_nih_sized_csv_lists_in_seconds(tmp_path):
    """112,120 rows and files, as many as the real set: listed in seconds (streamed; no pandas)."""
    root = tmp_path / "big"
    rows, n = [HEADER], 112_120
    for d in range(12):
        (root / f"images_{d + 1:03d}" / "images").mkdir(parents=True)
    for i in range(n):
        name = f"{i // 4 + 1:08d}_{i % 4:03d}.png"
        (root / f"images_{i // 10_000 + 1:03d}" / "images" / name).touch()
        rows.append(f"{name},{'Mass|Effusion' if i % 3 else 'No Finding'},{i % 4},{i // 4 + 1},40,M,PA,8,8,1,1")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "test_list.txt").write_text("".join(r.split(",")[0] + "\n" for r in rows[1::5]))
    (root / "train_val_list.txt").write_text("".join(r.split(",")[0] + "\n" for i, r in enumerate(rows[1:]) if i % 5))
    start = time.perf_counter()
    listing = nih_listing(root, tmp_path)
    took = time.perf_counter() - start
    assert len(listing.records) == n and not listing.rejected and not listing.ignored
    assert len({r.patient for r in listing.records}) == n // 4
    assert took < 30, f"listing 112k rows took {took:.1f} s"
