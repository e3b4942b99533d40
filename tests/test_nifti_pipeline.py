"""dataset=nifti through the pipeline: volumes listed from class folders or a CSV, one row per slice with its index,
all slices of a volume in one split, and test metrics aggregated per volume (mean or max) beside the slice level."""
import csv
import io

import numpy as np
import pytest

from medspark.data import materialize as mat
from medspark.data.loader import read_split
from medspark.data.preprocess import PreprocessConfig
from medspark.data.sources.nifti import Nifti
from medspark.evaluate_volumes import aggregate, predictions_csv
from medical_files import nifti_set

SPLIT = {"val": 0.25, "test": 0.25, "seed": 0}


def test_volumes_from_class_folders_and_from_a_csv_with_patients(tmp_path):
    root = nifti_set(tmp_path / "set", volumes=3, slices=2, size=32)
    (root / "glioma" / "readme.txt").write_text("not a volume")
    listing = Nifti(str(root)).list()
    assert listing.classes == ["glioma", "notumor"] and len(listing.records) == 6
    assert [why for p, why in listing.ignored if p.endswith("readme.txt")] == ["not a NIfTI volume (.nii, .nii.gz)"]
    (root / "labels.csv").write_text("volume,label,patient\n" + "".join(
        f"{c}/vol{v:03d}.nii.gz,{c},subject-{v}\n" for c in ("glioma", "notumor") for v in range(3)))
    by_csv = Nifti(str(root), csv="labels.csv", patient_column="patient").list()
    assert len(by_csv.records) == 6 and len({r.patient for r in by_csv.records}) == 3
    assert not any("subject" in r.patient for r in by_csv.records), "patients are pseudonyms"


def test_slice_probabilities_aggregate_per_volume():
    ids = ["b", "a", "b", "a", "c"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]])
    vid, y, p, rows = aggregate(ids, [0, 1, 0, 1, 1], probs, "mean")
    assert list(vid) == ["b", "a", "c"] and list(y) == [0, 1, 1] and list(rows) == [2, 2, 1]
    assert np.allclose(p, [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    _, _, p_max, _ = aggregate(ids, [0, 1, 0, 1, 1], probs, "max")
    assert np.allclose(p_max[0], [0.9 / 1.6, 0.7 / 1.6]) and np.allclose(p_max.sum(axis=1), 1)
    with pytest.raises(ValueError, match="evaluate.volume_aggregation='median'"):
        aggregate(ids, [0] * 5, probs, "median")
    table = list(csv.reader(io.StringIO(predictions_csv(vid, y, p, rows, ["neg", "pos"], False))))
    assert table[0] == ["volume", "rows", "label", "predicted", "prob_neg", "prob_pos"] and table[1][:4] == \
        ["b", "2", "neg", "neg"]


def test_every_slice_is_a_row_with_its_index_and_a_volume_stays_in_one_split(spark, tmp_path):
    root = nifti_set(tmp_path / "set", volumes=6, slices=4, size=32)
    listing = Nifti(str(root)).list()
    m = mat.materialize(spark, listing, PreprocessConfig(image_size=32), SPLIT, str(tmp_path / "data"), "nifti")
    assert m.listed == m.accepted == 12 and m.volumes == 12 and sum(m.sizes.values()) == 48
    seen = {}
    for s in ("train", "val", "test"):
        c = read_split(m.split_url(s), ["path", "frame", "sha1", "image"])
        assert c["image"].shape[1:] == (32, 32, 1) and c["image"].std() > 5
        for path, frame in zip(c["path"], c["frame"]):
            seen.setdefault(path, []).append((s, int(frame)))
    assert len(seen) == 12
    for path, rows in seen.items():
        assert sorted(f for _, f in rows) == [0, 1, 2, 3] and len({s for s, _ in rows}) == 1, path


@pytest.mark.slow
def test_a_nifti_set_trains_and_reports_slice_and_volume_metrics(spark, tmp_path):
    import mlflow

    from conftest import make_cfg
    from medspark.train import train

    root = nifti_set(tmp_path / "set", volumes=10, slices=6, size=48)
    cfg = make_cfg(tmp_path, ["dataset=nifti", f"dataset.root={root}", "preprocess.image_size=48", "train.epochs=12",
                              "train.batch_size=16", "train.early_stopping.patience=20", "+model.bn_momentum=0.5",
                              "split.val=0.2", "split.test=0.3", "evaluate.volume_aggregation=max",
                              "tracking.registered_model=null"])  # 72 steps: BN statistics must settle fast
    # patience 20 > epochs: no early stop, but the best val_loss epoch is restored (the last can be a BN swing)
    accuracy = train(cfg, spark=spark)
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    m = run.data.metrics
    assert m["data_volumes"] == 20 and m["test_volume_n"] == 6 and m["test_n"] == 36
    assert m["test_volume_rows_per_volume"] == 6
    assert accuracy >= 0.75 and m["test_volume_accuracy"] >= 0.66, m
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/volume_predictions.csv")
    table = list(csv.reader(io.StringIO(text)))
    assert len(table) == 7 and all(len(r[0]) == 40 for r in table[1:]), "volumes are named by their sha1"
