"""dataset=dicom through the pipeline: listing (class folders, a CSV keyed by a tag), patients as pseudonyms only,
one Petastorm row per frame with every frame and every file of a patient in one split, and a learnable set of
16-bit, MONOCHROME1 and RLE files trained end to end."""
import os

import numpy as np
import pytest

from medspark.data import materialize as mat
from medspark.data.loader import read_split
from medspark.data.phi import pseudonym
from medspark.data.preprocess import PreprocessConfig
from medspark.data.sources import DatasetError
from medspark.data.sources.dicom import Dicom
from medical_files import dicom_set, phantoms, write_dicom

SPLIT = {"val": 0.25, "test": 0.25, "seed": 0}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """12 DICOM files of 4 patients in 2 class folders, plus a JPEG and a text file in a class folder."""
    root = dicom_set(tmp_path_factory.mktemp("dicom") / "set", per_class=6, size=32, labels_csv="labels.csv")
    (root / "glioma" / "notes.txt").write_text("not a DICOM file")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "notumor" / "export.jpg")
    return root


def test_class_folders_list_every_dicom_file_with_pseudonymous_patients(small_set, monkeypatch):
    monkeypatch.delenv("MEDSPARK_PHI_KEY", raising=False)
    listing = Dicom(str(small_set), labels_csv=None).list()
    assert listing.classes == ["glioma", "notumor"] and len(listing.records) == 12
    assert sorted(os.path.basename(p) for p, _ in listing.rejected) == ["export.jpg", "notes.txt"]
    assert all(why.startswith("not a DICOM file") for _, why in listing.rejected)
    patients = {r.patient for r in listing.records}
    assert len(patients) == 4 and pseudonym("P-glioma000") in patients
    assert not any("glioma0" in p for p in patients), "only pseudonyms, never the PatientID"
    monkeypatch.setenv("MEDSPARK_PHI_KEY", "another-salt")  # privacy.phi_key -> phi.configure sets this variable
    assert {r.patient for r in Dicom(str(small_set)).list().records}.isdisjoint(patients), "the salt is used"


def test_labels_from_a_csv_keyed_by_accession_number_never_repeat_the_number(small_set):
    listing = Dicom(str(small_set), labels_csv="labels.csv", key="AccessionNumber").list()
    assert listing.classes == ["glioma", "notumor"] and len(listing.records) == 12
    assert all(r.label == (0 if "/glioma/" in r.path else 1) for r in listing.records)
    rows = [(p, why) for p, why in listing.rejected if p.startswith("labels.csv")]
    assert rows == [("labels.csv:row 6", "no DICOM file under dataset.root has this AccessionNumber")]
    assert "A-nofile" not in repr(listing), "a key value is compared, never kept"


def test_labels_from_a_csv_keyed_by_file_name(small_set, tmp_path):
    files = sorted(str(p.relative_to(small_set)) for p in small_set.rglob("*.dcm"))
    (small_set / "by_file.csv").write_text("file,label\n" + "".join(f"{f},{f.split('/')[0]}\n" for f in files[:8]))
    listing = Dicom(str(small_set), labels_csv="by_file.csv").list()
    assert len(listing.records) == 8 and {r.label for r in listing.records} == {0, 1}
    with pytest.raises(DatasetError, match="dataset.key="):
        Dicom(str(small_set), labels_csv="labels.csv", key="not a keyword")


def test_multi_frame_files_give_one_row_per_frame_and_patients_stay_in_one_split(spark, tmp_path):
    root = dicom_set(tmp_path / "set", per_class=12, size=32, per_patient=2)
    frames = np.stack(phantoms(("glioma",), 3, 32, seed=5)["glioma"])
    write_dicom(root / "glioma" / "cine" / "multi.dcm", frames, patient_id="P-cine")
    listing = Dicom(str(root)).list()
    pre = PreprocessConfig(image_size=32, multi_frame="all")
    m = mat.materialize(spark, listing, pre, SPLIT, str(tmp_path / "data"), "dicom")
    assert m.listed == 25 == m.accepted and not m.rejected and m.volumes == 1
    assert sum(m.sizes.values()) == 27 and m.summary()["data_volumes"] == 1
    rows = {s: read_split(m.split_url(s), ["path", "frame", "patient", "sha1"]) for s in ("train", "val", "test")}
    multi = [(s, f) for s, c in rows.items() for p, f in zip(c["path"], c["frame"]) if p.endswith("multi.dcm")]
    assert sorted(f for _, f in multi) == [0, 1, 2] and len({s for s, _ in multi}) == 1, "a file's frames: one split"
    where = {}
    for s, c in rows.items():
        assert set(c["frame"][[not p.endswith("multi.dcm") for p in c["path"]]]) <= {0}
        for patient in c["patient"]:
            where.setdefault(patient, set()).add(s)
    assert len(where) == 13 and all(len(s) == 1 for s in where.values()), "every patient's files in one split"
    assert mat.fingerprint(listing, pre, SPLIT) != mat.fingerprint(listing, PreprocessConfig(image_size=32), SPLIT)


@pytest.mark.slow
def test_a_dicom_set_of_hospital_encodings_trains_above_chance(spark, tmp_path):
    import mlflow

    from conftest import make_cfg
    from medspark.train import train

    root = dicom_set(tmp_path / "set", classes=("glioma", "notumor"), per_class=60, size=48, per_patient=2)
    cine = write_dicom(root / "glioma" / "cine" / "multi.dcm", np.stack(phantoms(("glioma",), 3, 48, seed=9)["glioma"]))
    cfg = make_cfg(tmp_path, ["dataset=dicom", f"dataset.root={root}", "preprocess.image_size=48", "train.epochs=10",
                              "preprocess.multi_frame=middle",
                              "train.batch_size=16", "train.early_stopping.patience=20", "+model.bn_momentum=0.5",
                              "tracking.registered_model=null"])  # 60 steps: BN statistics must settle fast
    # patience 20 > epochs: no early stop, but the best val_loss epoch is restored (the last can be a BN swing)
    accuracy = train(cfg, spark=spark)
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    assert run.data.metrics["data_accepted"] == 121 and run.data.metrics["data_rejected"] == 0
    assert accuracy >= 0.75, f"2 classes (chance 0.5), test accuracy {accuracy}"
    # the packaged classifier takes DICOM bytes (serving.check_dicom, then decode: the same pixels as training)
    import json

    import pandas as pd

    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    clf = mlflow.pyfunc.load_model(summary["classifier_uri"])
    files = sorted(root.rglob("*.dcm"))[::20] + [root / "glioma" / "notes.txt"]
    (root / "glioma" / "notes.txt").write_text("not an image")
    out = clf.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert out["error"].iloc[:-1].isna().all() and out["predicted_class"].iloc[:-1].notna().all(), out
    assert "not an image" in out["error"].iloc[-1]
    expected = ["glioma" if "/glioma/" in str(f) else "notumor" for f in files[:-1]]
    assert (out["predicted_class"].iloc[:-1] == expected).mean() >= 0.6
    from medspark.predict import predict_local  # `medspark predict` on files: which frame each prediction is for

    single = next(f for f in files if f != cine)
    table = predict_local(clf, [str(cine), str(single), str(files[-1])])
    assert list(table.columns[:2]) == ["path", "frame"] and table["frame"].tolist()[:2] == [1, 0], table
    assert table["frame"].isna().tolist()[2] and table["predicted_class"].tolist()[0] is not None
