"""Patient-level splits: over many random listings, no patient and no content is ever in two splits, the split
sizes and every class's (or finding's) share follow the fractions, the result depends on the seed alone, and the
dataset's own test split wins; multilabel stratification keeps rare findings' prevalences close; file-name patient
patterns find the patients of the real chest X-ray set."""
import hashlib
import logging
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from omegaconf import OmegaConf

from medspark.data.sources import DatasetError, Listing, Record, list_dataset
from medspark.data.splits import Item, assign, check_listing
from medspark.data.targets import bits, indices
from conftest import shared_dataset

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
            "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NIH_PREVALENCE = [0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022, 0.015, 0.030, 0.002]
SEEDS = range(25)


def random_items(seed: int, task: str, k: int, predefined_test: bool = False) -> list[Item]:
    """A random listing: patients with 1 to 12 images (a fifth of them unknown), labels mostly constant per
    patient, contents copied under other patients and sources (which joins their groups), imbalanced classes."""
    rng = random.Random(seed)
    items = []
    for p in range(rng.randint(150, 400)):
        known = rng.random() < 0.8
        if task == "multilabel":
            base = bits(i for i in range(k) if rng.random() < 0.3 / (i + 1))
        else:
            base = rng.choices(range(k), weights=[2 ** i for i in range(k)])[0]
        for j in range(rng.choice([1, 1, 1, 2, 3, 4, 6, 12])):
            label = base if rng.random() < 0.85 else (rng.randrange(1 << k) if task == "multilabel" else
                                                     rng.randrange(k))
            split = "test" if predefined_test and rng.random() < 0.04 else None
            items.append(Item(f"/d/{p}/{j}.png", label, f"c{p}-{j}", split, f"pt{p}" if known else None,
                              rng.choice(["nih", "other"])))
    for it in rng.sample(items, len(items) // 25):  # copies: same content and label, another patient and source
        items.append(it._replace(path=it.path + ".copy.png", patient=f"pt{rng.randrange(10_000)}", split=None,
                                 source="copies"))
    return items


def prevalence(report, items, split, k, task):
    n = report.sizes[split]
    counts = Counter(i for it in items if report.assignment.get(it.path) == split for i in indices(it.label, task))
    return np.array([counts[i] / n for i in range(k)])


def check_invariants(items, rep, predefined_test=False):
    where_patient, where_content = defaultdict(set), defaultdict(set)
    for it in items:
        s = rep.assignment[it.path]
        where_content[it.sha1].add(s)
        if it.patient is not None:
            where_patient[it.patient].add(s)
        if predefined_test and it.split == "test":
            assert s == "test"
    assert all(len(s) == 1 for s in where_patient.values()), "a patient in two splits"
    assert all(len(s) == 1 for s in where_content.values()), "a content in two splits"
    assert rep.patient_overlap == 0 and len(rep.assignment) == len(items) and not rep.rejected
    assert sum(rep.patients.values()) == len(where_patient)


@pytest.mark.parametrize("task, k", [("binary", 2), ("multiclass", 4), ("multilabel", 5)])
def test_random_listings_never_leak_and_follow_the_fractions(task, k):
    classes = FINDINGS[:k]
    worst = 0.0
    for seed in SEEDS:
        items = random_items(seed, task, k)
        rep = assign(items, classes, val=0.15, test=0.2, seed=seed, task=task)
        check_invariants(items, rep)
        n = len(items)
        for split, frac in (("val", 0.15), ("test", 0.2)):
            assert abs(rep.sizes[split] / n - frac) < 0.04, (seed, rep.sizes)
        diff = max(np.abs(prevalence(rep, items, "train", k, task) - prevalence(rep, items, s, k, task)).max()
                   for s in ("val", "test"))
        assert rep.max_prevalence_diff == pytest.approx(diff, abs=1e-6)
        worst = max(worst, diff)
        assert set(rep.per_source["train"]) <= {"nih", "other", "copies"} and rep.cross_source_duplicates > 0
    assert worst < 0.1


@pytest.mark.parametrize("task, k", [("multiclass", 3), ("multilabel", 4)])
def test_the_same_seed_gives_the_same_split_in_any_input_order(task, k):
    items = random_items(7, task, k)
    rep = assign(items, FINDINGS[:k], 0.15, 0.15, seed=1, task=task)
    shuffled = items[:]
    for s in range(3):
        random.Random(s).shuffle(shuffled)
        assert assign(shuffled, FINDINGS[:k], 0.15, 0.15, seed=1, task=task).assignment == rep.assignment
    assert assign(items, FINDINGS[:k], 0.15, 0.15, seed=2, task=task).assignment != rep.assignment


@pytest.mark.parametrize("task, k", [("binary", 2), ("multilabel", 4)])
def test_the_predefined_test_split_wins_for_the_whole_group(task, k):
    for seed in range(10):
        items = random_items(seed, task, k, predefined_test=True)
        rep = assign(items, FINDINGS[:k], val=0.15, test=0.3, seed=seed, has_test_split=True, task=task)
        check_invariants(items, rep, predefined_test=True)
        in_test = {it.path for it in items if it.split == "test"}
        pulled = [it for it in items if rep.assignment[it.path] == "test" and it.path not in in_test]
        assert rep.moved_to_test == len(pulled) > 0  # patients and copies of the test files, nothing carved
        assert abs(rep.sizes["val"] / (len(items) - rep.sizes["test"]) - 0.15) < 0.04


def nih_like(n_patients: int, seed: int = 0) -> list[Item]:
    """A listing shaped like NIH ChestX-ray14: 14 findings at their published prevalences (Hernia 0.2%),
    "No Finding" about half, 1 to 100+ images per patient (mean ~3.6), findings that run in patients."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(1 + rng.negative_binomial(1, 1 / 3.6, n_patients), 184)
    pid = np.repeat(np.arange(n_patients), sizes)
    risk = rng.gamma(0.5, 2.0, n_patients)[pid]  # sick patients have more findings, on every image
    pos = rng.random((len(pid), 14)) < np.minimum(np.array(NIH_PREVALENCE) * risk[:, None], 0.95)
    labels = (pos * (1 << np.arange(14))).sum(1)
    return [Item(f"/nih/{i:08d}.png", int(labels[i]), f"h{i}", None, f"p{pid[i]}") for i in range(len(pid))]


@pytest.mark.parametrize("seed", [0, 1])
def test_iterative_stratification_balances_rare_findings(seed):
    """On a realistic imbalanced listing (5,000 patients, ~17,800 images, Hernia 0.2%), every finding's prevalence
    is within half a point across splits, and the share of images without any finding within 1.5 points, with
    every finding in every split; a patient-level split stratified on "any finding" alone is several times worse."""
    items = nih_like(5000, seed)
    rep = assign(items, FINDINGS, val=0.1, test=0.2, seed=seed, task="multilabel")
    check_invariants(items, rep)
    assert rep.max_prevalence_diff < 0.005, rep.per_class
    none = {s: sum(1 for it in items if rep.assignment[it.path] == s and it.label == 0) / rep.sizes[s]
            for s in ("train", "val", "test")}
    assert max(none.values()) - min(none.values()) < 0.015, none
    assert all(rep.per_class[s]["Hernia"] > 0 for s in ("train", "val", "test"))
    assert all(abs(rep.sizes[s] / len(items) - f) < 0.002 for s, f in (("val", 0.1), ("test", 0.2)))
    naive = assign([it._replace(label=int(it.label > 0)) for it in items], ["none", "any"], 0.1, 0.2, seed=seed)
    diffs = [np.abs(prevalence(naive, items, "train", 14, "multilabel") - prevalence(naive, items, s, 14,
                                                                                       "multilabel")).max()
             for s in ("val", "test")]
    assert max(diffs) > 3 * rep.max_prevalence_diff
    assert rep.patients["train"] + rep.patients["val"] + rep.patients["test"] == 5000
    assert rep.images_per_patient["min"] == 1 and rep.images_per_patient["max"] > 20


def test_multilabel_label_conflicts_and_report():
    findings = ["Effusion", "Mass"]
    items = [Item(f"/x/{i}.png", bits([i % 2]) if i % 3 else 0, f"h{i}", None, f"p{i // 2}") for i in range(60)]
    items += [Item("/y/1.png", bits([0]), "same", None, "p1000", "s1"),  # one content, two sets of findings
              Item("/y/2.png", bits([0, 1]), "same", None, None, "s2")]
    rep = assign(items, findings, 0.2, 0.2, seed=0, task="multilabel")
    why = "conflicting labels: Effusion, Effusion|Mass"
    assert sorted(rep.rejected) == [("/y/1.png", why), ("/y/2.png", why)]
    assert rep.label_conflicts == 1 and rep.cross_source_duplicates == 1 and "/y/1.png" not in rep.assignment
    assert rep.patients == {s: len({it.patient for it in items[:60] if rep.assignment[it.path] == s})
                            for s in ("train", "val", "test")}
    assert rep.images_per_patient == {"min": 2, "median": 2, "max": 2}
    kept = assign(items, findings, 0.2, 0.2, seed=0, task="multilabel", label_conflicts="keep")
    assert kept.assignment["/y/1.png"] == kept.assignment["/y/2.png"] and not kept.rejected
    assert sum(kept.per_class[s]["Mass"] for s in kept.per_class) == 20 + 1  # positives per finding


def test_a_class_of_one_patient_cannot_be_stratified():
    items = [Item(f"/a/{i}.png", 0, f"a{i}", None, f"p{i}") for i in range(20)]
    items += [Item(f"/b/{i}.png", 1, f"b{i}", None, "lonely") for i in range(10)]  # 10 images, one patient
    with pytest.raises(ValueError, match=r"class 'b' has 1 independent group\(s\) of images \(a patient's images, "
                                         r"or copies of one content, count once\); at least 3 are needed"):
        assign(items, ["a", "b"], 0.2, 0.2, seed=0)
    two = [Item(f"/m/{i}.png", bits([i % 2]), f"m{i}", None, f"p{i % 2}") for i in range(10)]  # 2 patients
    with pytest.raises(ValueError, match=r"the (train|val|test) split is empty: 2 independent group\(s\) of images .* are "
                                         r"too few for split\.val=0\.2 and split\.test=0\.2; add images"):
        assign(two, ["Effusion", "Mass"], 0.2, 0.2, seed=0, task="multilabel")


def test_check_listing_warns_on_rare_findings_instead_of_failing(caplog):
    records = [Record(f"/x/{i}.png", bits([0]) if i % 2 else 0, None) for i in range(40)]
    records.append(Record("/x/rare.png", bits([1]), None))
    with caplog.at_level(logging.WARNING, logger="medspark.data.splits"):
        check_listing(Listing(records, ["Effusion", "Hernia"], False, task="multilabel"), 0.15, 0.15)
    assert "finding(s) with fewer than 3 positive images to split into train/val/test: {'Hernia': 1}" in caplog.text


# ---------------------------------------------------------------- patient_pattern

CHEST = {"name": "chest_xray", "_target_": "medspark.data.sources.split_folders.SplitFolders",
         "split_dirs": {"train": "train", "test": "test"}, "classes": ["NORMAL", "PNEUMONIA"]}


def chest_pattern() -> str:
    from medspark.config import config_dir

    return OmegaConf.load(f"{config_dir()}/dataset/chest_xray.yaml").patient_pattern


def test_patient_pattern_errors_and_unmatched_names(tmp_path, caplog):
    for cls, names in {"a": ["p1_x.png", "p1_y.png", "odd.png"], "b": ["p2_x.png", "p3_x.png"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(n.encode())
    ds = {"name": "t", "_target_": "medspark.data.sources.class_folders.ClassFolders", "root": str(tmp_path)}
    with pytest.raises(DatasetError, match=r"^dataset\.patient_pattern='\(p\\\\d' is not a valid regular expression "
                                           r"\(missing \), unterminated subpattern at position 0\); fix it"):
        list_dataset(OmegaConf.create({**ds, "patient_pattern": r"(p\d"}))
    with caplog.at_level(logging.WARNING):
        found = list_dataset(OmegaConf.create({**ds, "patient_pattern": r"^(p\d+)_"}))
    patient = {r.path.rsplit("/", 1)[1]: r.patient for r in found.records}
    assert patient["p1_x.png"] == patient["p1_y.png"] != patient["p2_x.png"] and patient["odd.png"] is None
    assert len(patient["p1_x.png"]) == 16 and "p1" not in patient["p1_x.png"]  # a pseudonym, not the id
    assert caplog.text.count("do not match") == 1 and "1 of 5 file name(s) do not match dataset.patient_pattern" \
        in caplog.text and "odd" not in caplog.text
    whole = list_dataset(OmegaConf.create({**ds, "patient_pattern": r"p\d"}))  # no group: the whole match
    assert {r.patient for r in whole.records if "p1_" in r.path} == {patient["p1_x.png"]}


@pytest.mark.real_data
def test_chest_xray_patients_from_file_names_and_the_naive_split_leak():
    """The chest X-ray set's names carry patient ids (person23 has 30 images in train/): the shipped pattern
    matches every file, and a split by image puts hundreds of patients in train and test at once."""
    root = shared_dataset("chest-xray-pneumonia")
    cfg = {**CHEST, "root": str(root), "split_dirs": {"train": "train", "test": None}}
    by_patient = list_dataset(OmegaConf.create({**cfg, "patient_pattern": chest_pattern()}))
    assert len(by_patient.records) == 5216 and all(r.patient for r in by_patient.records)
    per_patient = Counter(r.patient for r in by_patient.records)
    assert len(per_patient) == 2846 and max(per_patient.values()) == 30
    items = [Item(r.path, r.label, hashlib.sha1(open(r.path, "rb").read()).hexdigest(), r.split, r.patient)
             for r in by_patient.records]
    naive = assign([it._replace(patient=None) for it in items], by_patient.classes, 0.15, 0.15, seed=42)
    where = defaultdict(set)
    for it in items:
        where[it.patient].add(naive.assignment[it.path])
    assert sum({"train", "test"} <= s for s in where.values()) > 300
    rep = assign(items, by_patient.classes, 0.15, 0.15, seed=42)
    check_invariants(items, rep)
    assert rep.patients["test"] > 400 and abs(rep.sizes["test"] / 5216 - 0.15) < 0.01
    assert rep.max_prevalence_diff < 0.02
