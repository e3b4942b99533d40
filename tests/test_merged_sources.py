"""Datasets merged from several sources (data/sources/merged.py): class maps, dropped classes counted with their
reason, records tagged with their source, per-source counts, copies across sources grouped, config mistakes in
one line naming the key; and the real merged brain MRI set (skipped when ../shared/datasets is absent)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medspark.data.sources import DatasetError, Listing, Record, list_dataset, source
from medspark.data.sources.merged import counts_per_source, dropped_per_source, merge

from conftest import shared_dataset

CF = "medspark.data.sources.class_folders.ClassFolders"


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Set A (glioma_tumor 4, pituitary_tumor 3, no_tumor 4, other 2) and set B (yes 4, no 3); B's yes/y0.png
    holds the same bytes as A's glioma_tumor/g0.png (public sets copy each other)."""
    base = tmp_path_factory.mktemp("merged")
    seed = iter(range(1000))
    for cls, n in (("glioma_tumor", 4), ("pituitary_tumor", 3), ("no_tumor", 4), ("other", 2)):
        for i in range(n):
            _png(base / "a" / cls / f"{cls[0]}{i}.png", next(seed))
    for cls, n in (("yes", 4), ("no", 3)):
        for i in range(n):
            _png(base / "b" / cls / f"{cls[0]}{i}.png", next(seed))
    (base / "b" / "yes" / "y0.png").write_bytes((base / "a" / "glioma_tumor" / "g0.png").read_bytes())
    return base


def _cfg(base, classes=None, **changes):
    sources = {"set_a": {"_target_": CF, "root": str(base / "a"),
                         "class_map": {"glioma_tumor": "tumor", "pituitary_tumor": "tumor", "no_tumor": "no_tumor"}},
               "set_b": {"_target_": CF, "root": str(base / "b"), "class_map": {"yes": "tumor", "no": "no_tumor"}}}
    for name, options in changes.items():
        sources[name] = options
    return {"name": "merged", "_target_": "medspark.data.sources.merged.Merged", "sources": sources,
            "classes": classes}


def test_classes_are_mapped_and_unmapped_ones_dropped_and_counted(two_sets):
    listing = list_dataset(_cfg(two_sets))
    assert listing.classes == ["no_tumor", "tumor"] and listing.task == "binary"
    assert counts_per_source(listing) == {"set_a": {"no_tumor": 4, "tumor": 7}, "set_b": {"no_tumor": 3, "tumor": 4}}
    assert listing.counts() == {"no_tumor": 7, "tumor": 11}
    by_path = {r.path: r for r in listing.records}
    assert by_path[str(two_sets / "a" / "pituitary_tumor" / "p0.png")].label == 1  # several classes to one
    assert by_path[str(two_sets / "b" / "no" / "n0.png")] == Record(str(two_sets / "b" / "no" / "n0.png"), 0, None,
                                                                  None, "set_b")
    assert {r.source for r in listing.records if "/a/" in r.path} == {"set_a"}
    assert sorted(listing.ignored) == [
        (str(two_sets / "a" / "other" / f"o{i}.png"),
         "class 'other' of source 'set_a' is not mapped (dataset.sources.set_a.class_map)") for i in range(2)]
    assert dropped_per_source(listing) == {"set_a": 2}
    assert not listing.has_test_split


def test_explicit_classes_order_and_identity_map(two_sets):
    """`classes` orders the dataset's classes; a source without class_map keeps its class names."""
    cfg = _cfg(two_sets, classes=["tumor", "no_tumor", "no"])
    cfg["sources"]["set_b"].pop("class_map")  # yes -> dropped (not in classes), no -> no
    listing = list_dataset(cfg)
    assert listing.classes == ["tumor", "no_tumor", "no"] and listing.task == "multiclass"
    assert counts_per_source(listing) == {"set_a": {"tumor": 7, "no_tumor": 4, "no": 0},
                                          "set_b": {"tumor": 0, "no_tumor": 0, "no": 3}}
    assert dropped_per_source(listing) == {"set_a": 2, "set_b": 4}


def test_copies_across_sources_share_a_content_hash(two_sets):
    """The split groups records by content (data/splits.py): a copy in two sources is one content there."""
    from medspark.data.preprocess import content_hash

    listing = list_dataset(_cfg(two_sets))
    by_hash: dict[str, set] = {}
    for r in listing.records:
        by_hash.setdefault(content_hash(open(r.path, "rb").read()), set()).add(r.source)
    assert [s for s in by_hash.values() if len(s) > 1] == [{"set_a", "set_b"}]


def test_one_file_listed_by_two_sources_is_one_input(two_sets):
    cfg = _cfg(two_sets, set_c={"_target_": CF, "root": str(two_sets / "b"), "class_map": {"yes": "tumor"}})
    listing = list_dataset(cfg)
    assert len({r.path for r in listing.records}) == len(listing.records) == 18
    again = [why for _, why in listing.ignored if "also listed" in why]
    assert again == ["also listed by source 'set_b': one file is one input"] * 7  # unmapped in set_c or not


@pytest.mark.parametrize("change, message", [
    ({"set_b": {"_target_": CF, "root": "x", "class_map": {"yes": "tumour"}}},
     "dataset.sources.set_b.class_map.yes='tumour' is not one of dataset.classes ['no_tumor', 'tumor']"),
    ({"set_b": {"root": "x", "class_map": {"yes": "tumor"}}}, "dataset.sources.set_b._target_ is not set"),
    ({"set_b": {"_target_": CF, "root": "x", "colour": 1}}, "dataset.sources.set_b.colour is not a setting of the "
                                                           "ClassFolders source"),
    ({"set_b": {"_target_": CF, "root": "x", "class_map": ["yes"]}}, "dataset.sources.set_b.class_map must map"),
    ({"set_b": {"_target_": "medspark.nowhere.Source", "root": "x"}}, "dataset.sources.set_b._target_=medspark."
                                                                      "nowhere.Source cannot be imported"),
    ({"bad name": {"_target_": CF, "root": "x"}}, "source name 'bad name' must be letters, digits, _ or -"),
])
def test_config_mistakes_are_one_line_naming_the_key(two_sets, change, message):
    with pytest.raises(DatasetError) as e:
        source(_cfg(two_sets, classes=["no_tumor", "tumor"], **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_listing_mistakes_name_the_source_key(two_sets):
    with pytest.raises(DatasetError, match=r"dataset\.sources\.set_b\.root=/nowhere does not exist"):
        list_dataset(_cfg(two_sets, set_b={"_target_": CF, "root": "/nowhere"}))
    with pytest.raises(DatasetError, match=r"dataset\.sources\.set_b\.class_map\.maybe: 'maybe' is not a class of "
                                           r"source 'set_b' \(its classes: \['no', 'yes'\]\)"):
        list_dataset(_cfg(two_sets, set_b={"_target_": CF, "root": str(two_sets / "b"), "class_map": {"maybe": "x"}}))
    with pytest.raises(DatasetError, match=r"dataset.classes has \['glioma'\], which no"):
        list_dataset(_cfg(two_sets, classes=["glioma", "no_tumor", "tumor"]))


def test_duplicate_source_names_and_empty_sources(two_sets):
    entry = {"name": "a", "_target_": CF, "root": str(two_sets / "a")}
    with pytest.raises(DatasetError, match="source name 'a' is used twice"):
        source({"_target_": "medspark.data.sources.merged.Merged", "sources": [entry, entry]})
    with pytest.raises(DatasetError, match=r"dataset.sources\[0\] has no name"):
        source({"_target_": "medspark.data.sources.merged.Merged", "sources": [{"_target_": CF}]})
    with pytest.raises(DatasetError, match="dataset.sources is empty"):
        source({"_target_": "medspark.data.sources.merged.Merged", "sources": {}})
    listing = source({"_target_": "medspark.data.sources.merged.Merged", "sources": [entry]}).list()  # list form
    assert listing.classes == ["glioma_tumor", "no_tumor", "other", "pituitary_tumor"]


def test_multilabel_findings_are_remapped_and_mixes_refused():
    ml = Listing([Record("x1", 0b011, None, "p1"), Record("x2", 0, None, "p2"), Record("x3", 0b100, None, "p3")],
                 ["Effusion", "Mass", "Hernia"], False, task="multilabel")
    other = Listing([Record("y1", 0b01, None), Record("y2", 0b10, None)], ["Nodule", "Effusion"], False,
                    task="multilabel")
    merged = merge([("nih", {"Effusion": "effusion", "Mass": "mass"}, ml),
                    ("other", {"Nodule": "mass", "Effusion": "effusion"}, other)])
    assert merged.task == "multilabel" and merged.classes == ["effusion", "mass"]
    assert [(r.path, r.label, r.patient, r.source) for r in merged.records] == [
        ("x1", 0b11, "p1", "nih"), ("x2", 0, "p2", "nih"), ("y1", 0b10, None, "other"), ("y2", 0b01, None, "other")]
    assert merged.ignored == [("x3", "finding 'Hernia' of source 'nih' is not mapped (dataset.sources.nih.class_map)")]
    single = Listing([Record("z", 1, None)], ["a", "b"], False)
    with pytest.raises(DatasetError, match="source 'nih' is multilabel and source 'single' is binary"):
        merge([("nih", None, ml), ("single", None, single)])


def test_test_split_when_any_source_brings_one(two_sets, tmp_path):
    for split in ("train", "test"):
        for cls in ("yes", "no"):
            for i in range(3):
                _png(tmp_path / split / cls / f"{split}{i}.png", hash((split, cls, i)) % 1000)
    cfg = _cfg(two_sets, set_b={"_target_": "medspark.data.sources.split_folders.SplitFolders", "root": str(tmp_path),
                                "split_dirs": {"train": "train", "test": "test"},
                                "class_map": {"yes": "tumor", "no": "no_tumor"}})
    merged = source(cfg)
    assert merged.has_test_split
    listing = merged.list()
    assert listing.has_test_split
    assert {(r.source, r.split) for r in listing.records} == {("set_a", None), ("set_b", None), ("set_b", "test")}


def test_missing_roots_fail_the_config_check_naming_them(cfg_factory):
    from medspark.config import ConfigError, check

    cfg = cfg_factory("dataset=brain_tumor_binary_merged")
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert str(e.value).startswith("required setting(s) not given:")
    assert "dataset.sources.brain_mri_yes_no.root=..." in str(e.value)
    assert "dataset.sources.brain_tumor_mri.root=..." in str(e.value)


def test_real_merged_brain_mri_listing(cfg_factory):
    tumor, yes_no = shared_dataset("brain-tumor-mri") / "Training", shared_dataset("brain-mri-yes-no")
    cfg = cfg_factory("dataset=brain_tumor_binary_merged", f"dataset.sources.brain_tumor_mri.root={tumor}",
                      f"dataset.sources.brain_mri_yes_no.root={yes_no}")
    listing = list_dataset(cfg.dataset)
    assert listing.classes == ["no_tumor", "tumor"] and listing.task == "binary" and not listing.has_test_split
    assert counts_per_source(listing) == {"brain_mri_yes_no": {"no_tumor": 98, "tumor": 155},
                                          "brain_tumor_mri": {"no_tumor": 1595, "tumor": 4117}}
    assert listing.ignored == [] and dropped_per_source(listing) == {}


@pytest.fixture(scope="module")
def like_real(tmp_path_factory):
    """Tiny stand-ins laid out like the two real sets conf/dataset/brain_tumor_binary_merged.yaml merges; two
    of the yes/no set's `no` images are copies of the 4-class set's `notumor` ones (as on the real sets)."""
    base = tmp_path_factory.mktemp("like_real")
    seed = iter(range(2000, 3000))
    for cls in ("glioma", "meningioma", "notumor", "pituitary"):
        for i in range(6):
            _png(base / "tumor" / cls / f"{cls}{i}.png", next(seed))
    for cls in ("yes", "no"):
        for i in range(8):
            _png(base / "yes_no" / cls / f"{cls}{i}.png", next(seed))
    for i in range(2):
        copy = (base / "tumor" / "notumor" / f"notumor{i}.png").read_bytes()
        (base / "yes_no" / "no" / f"no{i}.png").write_bytes(copy)
    return base


def test_a_merged_run_records_sources_in_rows_mlflow_and_per_source_metrics(like_real, spark, cfg_factory):
    """The data stage of a merged run (what training runs first): Petastorm rows carry their source, copies across
    sources share a split, MLflow holds per-source counts (listing and splits); per-source test metrics of the
    evaluation hook score each source's own rows."""
    import json

    import mlflow

    from medspark.data import loader
    from medspark.data.materialize import HadoopFS, _load
    from medspark.evaluate_sources import log_source_metrics
    from medspark.preprocess_only import preprocess

    cfg = cfg_factory("dataset=brain_tumor_binary_merged", f"dataset.sources.brain_tumor_mri.root={like_real}/tumor",
                      f"dataset.sources.brain_mri_yes_no.root={like_real}/yes_no", "preprocess.image_size=16",
                      "split.val=0.2", "split.test=0.3")
    summary = preprocess(cfg, spark=spark)
    rows = {s: loader.read_split(f"{summary['data_url']}/{s}", ["sha1", "source", "label"])
            for s in ("train", "val", "test")}
    split_of: dict[str, set] = {}
    for s, cols in rows.items():
        for sha, src in zip(cols["sha1"], cols["source"]):
            split_of.setdefault(sha, set()).add((s, src))
    shared = [v for v in split_of.values() if len({src for _, src in v}) == 2]
    assert len(shared) == 2 and all(len({s for s, _ in v}) == 1 for v in shared)  # one content, one split
    assert summary["counts"]["data_accepted"] == 40 and summary["counts"]["data_duplicate_groups"] == 2

    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    sources = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/sources.json"))
    assert sources == {"per_source": {"brain_mri_yes_no": {"no_tumor": 8, "tumor": 8},
                                      "brain_tumor_mri": {"no_tumor": 6, "tumor": 18}}, "dropped_unmapped": {}}
    assert run.data.metrics["data_split_cross_source_duplicates"] == 2  # the split report's count (data/splits.py)
    splits = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/splits.json"))
    for s, cols in rows.items():
        expected = {src: int((cols["source"] == src).sum()) for src in set(cols["source"])}
        assert splits["per_source"][s] == expected
        assert all(run.data.metrics[f"data_n_{s}_source_{src}"] == n for src, n in expected.items())

    data = _load(HadoopFS(spark), summary["data_url"])
    test = rows["test"]
    right = np.eye(2)[test["label"]]
    probs = np.where((test["source"] == "brain_tumor_mri")[:, None], right, 1 - right)  # right on one, wrong on other
    with mlflow.start_run(run_id=summary["run_id"]):
        metrics = log_source_metrics(data, test["label"], probs)
        with pytest.raises(RuntimeError, match="do not line up"):
            log_source_metrics(data, test["label"][1:], probs[1:])  # rows that are not the split's, in order
    n = {src: float((test["source"] == src).sum()) for src in ("brain_tumor_mri", "brain_mri_yes_no")}
    assert metrics["test_source_brain_tumor_mri_accuracy"] == 1.0
    assert metrics["test_source_brain_mri_yes_no_accuracy"] == 0.0
    assert metrics["test_source_brain_tumor_mri_n"] == n["brain_tumor_mri"]
    assert metrics["test_source_brain_mri_yes_no_n"] == n["brain_mri_yes_no"]
    for src, auc in (("brain_tumor_mri", 1.0), ("brain_mri_yes_no", 0.0)):  # AUC: where a source's test rows hold
        both = len(set(test["label"][test["source"] == src])) == 2     # both classes (stratified by class, not source)
        assert metrics.get(f"test_source_{src}_roc_auc") == (auc if both else None)
    assert "test_source_brain_tumor_mri_roc_auc" in metrics
    assert client.get_run(summary["run_id"]).data.metrics["test_source_brain_tumor_mri_accuracy"] == 1.0

    import keras

    from medspark.evaluate import predict_split

    model = keras.Sequential([keras.Input(data.shape), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    y, p = predict_split(model, data, "test")  # what evaluate_split scores: its row order is the hook's
    with mlflow.start_run(run_id=summary["run_id"]):
        metrics = log_source_metrics(data, y, p)
    for src, n in n.items():
        rows = test["source"] == src
        assert metrics[f"test_source_{src}_n"] == n
        assert metrics[f"test_source_{src}_accuracy"] == pytest.approx(np.mean(p[rows].argmax(1) == y[rows]))


def test_per_source_metrics_without_sources_and_for_multiclass_and_multilabel():
    from medspark.evaluate_sources import flat, per_source

    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 2]]
    table = per_source(y, probs, ["a", "a", "a", "b", "b", "b"], ["x", "y", "z"])
    assert table == {"a": {"n": 3.0, "accuracy": 1.0, "balanced_accuracy": 1.0},
                     "b": {"n": 3.0, "accuracy": 2 / 3, "balanced_accuracy": 2 / 3}}
    assert flat(table)["test_source_b_accuracy"] == 2 / 3
    assert per_source(y, probs, [""] * 6, ["x", "y", "z"]) == {}
    y_ml = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1], [0, 0]])
    p_ml = np.where(np.arange(8)[:, None] < 4, y_ml * 0.8 + 0.1, 0.9 - y_ml * 0.8)  # a: right, b: inverted
    table = per_source(y_ml, p_ml, ["a"] * 4 + ["b"] * 4, ["Effusion", "Mass"], "multilabel")
    assert table == {"a": {"n": 4.0, "mean_auc": 1.0, "mean_ap": 1.0},
                     "b": {"n": 4.0, "mean_auc": 0.0, "mean_ap": 0.5}}


def test_merged_sources_benchmark_reproduces_its_documented_counts(tmp_path):
    """benchmarks/merged_sources.py (without --train) on the real sets: the numbers in its results file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    shared_dataset("brain-tumor-mri"), shared_dataset("brain-mri-yes-no")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "merged_sources.py"), "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "merged_sources.json").read_text())["listing"]
    assert m["merged_total"] == 5965 and m["distinct_contents"] == 5688
    assert m["within_source"]["brain_tumor_mri"]["distinct_contents"] == 5521  # as ../shared/datasets/README says
    assert m["across_sources"]["contents_in_both"] == 61
    assert "| within brain_mri_yes_no | 22 | 25 | 228 |" in (tmp_path / "merged_sources.md").read_text()
