"""Train/val/test assignment: seeded, stratified, and leak-free by content and by patient.

`assign` takes the listed files as `Item`s (path, label, content hash, predefined split, pseudonymous patient,
source) and returns a `SplitReport`. Files are grouped by union-find over "same content" (the SHA-1 of the
bytes) and "same patient": every file of a connected group lands in one split, so neither a patient's images
nor the copies of one content (public sets copy each other, within and across sources) can straddle train and
test. A group holding a file of the dataset's own test split goes to test whole (`moved_to_test` counts the
files it pulls in). One content under two labels (two classes, or for multilabel two different sets of
findings) is ambiguous: `split.label_conflicts=reject` (default) rejects every copy, `keep` trains each copy
with its own label, all in one split.

Stratification: single-label (binary, multiclass) groups go by their majority class, and each class's groups
are shuffled with the seed and dealt to test and val until each holds its fraction of the class's files.
Multilabel groups are dealt by iterative stratification (Sechidis, Tsoumakas, Vlahavas 2011, "On the
stratification of multi-label data") over the groups' per-finding positive counts, "no finding" being one more
label so that the negative share is balanced too, each group going where its labels and its files are most
needed (`_deal_multilabel`); the report gives the largest prevalence difference between train and val/test.
The result depends on the seed only, never on the order of the items. `assign` ends with an internal check that
no patient and no content is in two splits (an AssertionError: a bug, never a data problem).
"""
from __future__ import annotations

import logging
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .targets import indices, multi_hot, names, one_hot, task_of

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
LABEL_CONFLICTS = ("reject", "keep")  # split.label_conflicts: what to do with one content under two classes
GROUPS = "independent group(s) of images (a patient's images, or copies of one content, count once)"


class Item(NamedTuple):
    """One listed file as the splitter sees it: paths, labels and keys only, never pixels."""
    path: str
    label: int  # class index, or the findings' bitmask for multilabel (data/targets.py)
    sha1: str  # content hash: equal contents are one content
    split: str | None  # "test" when the dataset's own test split holds it, else None
    patient: str | None = None  # pseudonymous patient key; None: unknown (the file is its own patient)
    source: str | None = None  # which source of a merged dataset listed it


@dataclass
class SplitReport:
    assignment: dict[str, str]  # path -> split
    sizes: dict[str, int]
    per_class: dict[str, dict[str, int]]  # split -> class -> files (multilabel: finding -> positive files)
    duplicate_groups: int  # contents that occur more than once
    duplicate_files: int  # files beyond the first copy of each content
    label_conflicts: int  # contents filed under more than one label
    moved_to_test: int = 0  # files pulled into the predefined test split by a copy or a patient there
    notes: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): label conflicts, when rejected
    patients: dict[str, int] = field(default_factory=dict)  # split -> distinct patients (0 when none known)
    images_per_patient: dict[str, float] = field(default_factory=dict)  # min, median, max over known patients
    patient_overlap: int = 0  # patients in two or more splits: always 0 (assign checks it)
    max_prevalence_diff: float = 0.0  # max over classes/findings of |prevalence(train) - prevalence(val or test)|
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> source -> files (when set)
    cross_source_duplicates: int = 0  # contents listed by two or more sources

    def summary(self) -> dict[str, float]:
        """Flat numbers for MLflow and the log."""
        out: dict[str, float] = {f"split_patients_{s}": n for s, n in self.patients.items()}
        out.update({f"split_images_per_patient_{k}": v for k, v in self.images_per_patient.items()})
        out.update(split_patient_overlap=self.patient_overlap, split_max_prevalence_diff=self.max_prevalence_diff,
                   split_cross_source_duplicates=self.cross_source_duplicates)
        return out


def check_fractions(val: float, test: float, has_test_split: bool) -> None:
    """Fractions fail early, before any Spark job, with the key to fix."""
    if not 0 < val < 1:
        raise ValueError(f"split.val={val} must be strictly between 0 and 1 (a validation split drives early stopping)")
    if not has_test_split and not 0 < test < 1:
        raise ValueError(f"split.test={test} must be strictly between 0 and 1 when the dataset has no test folder")
    if not has_test_split and val + test >= 1:
        raise ValueError(f"split.val + split.test = {val + test} leaves nothing to train on; keep the sum below 1")


def check_label_conflicts(policy: str) -> None:
    from .sources import DatasetError  # a ValueError: config checks turn it into their one line too

    if policy not in LABEL_CONFLICTS:
        raise DatasetError(f"split.label_conflicts={policy!r} must be one of {', '.join(LABEL_CONFLICTS)}")


def check_listing(listing, val: float, test: float) -> None:
    """Before any Spark job: the fractions against the layout found on disk (a dataset without its test folder
    needs split.test), and enough files in every class to stratify. Duplicates found later by content hashing
    and patients can only lower a class's count, so a class that is short here is short for sure; `assign`
    checks again. Multilabel: a finding with too few positives to reach every split is a warning, not an error
    (rare findings are real; their metrics in a split without positives are undefined and reported so)."""
    from .preprocess import is_system_file
    from .sources import DatasetError

    try:
        check_fractions(val, test, listing.has_test_split)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    targets = ["val"] if listing.has_test_split else ["test", "val"]
    candidates = [r for r in listing.records if r.split is None and not is_system_file(r.path)]
    if listing.task == "multilabel":
        positives = Counter(i for r in candidates for i in indices(r.label, "multilabel"))
        short = {c: positives[i] for i, c in enumerate(listing.classes) if positives[i] < 1 + len(targets)}
        if short:
            log.warning("finding(s) with fewer than %d positive images to split into train/%s: %s; their metrics "
                        "will be undefined where a split has no positive", 1 + len(targets),
                        "/".join(reversed(targets)), short)
        return
    files = Counter(r.label for r in candidates)
    for label, cls in enumerate(listing.classes):
        if files[label] < 1 + len(targets):
            raise DatasetError(
                f"class {cls!r} has {files[label]} distinct image(s) at most ({files[label]} file(s) listed); at "
                f"least {1 + len(targets)} are needed to stratify into train/{'/'.join(reversed(targets))}: add "
                f"images, or drop the class from dataset.classes (classes with enough: "
                f"{[c for i, c in enumerate(listing.classes) if files[i] >= 1 + len(targets)]})")


def assign(items, classes: list[str], val: float, test: float, seed: int, has_test_split: bool = False,
           label_conflicts: str = "reject", task: str = "") -> SplitReport:
    """items: `Item`s (or tuples in its field order; patient and source may be left out). task: binary |
    multiclass | multilabel ("" = from the class count). See the module docstring for the policy."""
    check_fractions(val, test, has_test_split)
    check_label_conflicts(label_conflicts)
    task = task_of(task, classes)
    items = sorted((Item(*it) for it in items), key=_order)  # canonical order: the result ignores input order
    rejected, lost, conflicts, kept = _conflicts(items, classes, task, label_conflicts)
    groups = _groups(kept)
    carve_test = 0.0 if has_test_split else test
    fractions = {"test": carve_test, "val": val}
    assignment: dict[str, str] = {}
    moved = 0
    free = []  # groups to deal: those without a file of the predefined test split
    for members in groups:
        if any(m.split == "test" for m in members):  # the dataset's own test split wins for the whole group
            moved += sum(m.split != "test" for m in members)
            assignment.update((m.path, "test") for m in members)
        else:
            free.append(members)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if task == "multilabel":
        _deal_multilabel(free, len(classes), fractions, rng, assignment)
    else:
        _deal_by_class(free, classes, fractions, rng, assignment, lost)
    return _report(items, kept, assignment, classes, task, conflicts, moved, rejected, notes)


# ---------------------------------------------------------------- grouping

def _order(it: Item):
    return it.path, it.label, it.sha1, it.split or "", it.patient or "", it.source or ""


def _conflicts(items: list[Item], classes, task: str, policy: str):
    """Contents under two or more labels: (rejected (path, why), rejected files per label, how many contents,
    the items kept)."""
    first: dict[str, int] = {}
    conflicted: dict[str, set] = {}
    for it in items:
        label = first.setdefault(it.sha1, it.label)
        if label != it.label:
            conflicted.setdefault(it.sha1, {label}).add(it.label)
    if not conflicted or policy == "keep":
        return [], Counter(), len(conflicted), items
    why = {sha: "conflicting labels: " + ", ".join(names(label, task, classes) for label in sorted(labels))
           for sha, labels in conflicted.items()}
    rejected = [(it.path, why[it.sha1]) for it in items if it.sha1 in why]
    lost = Counter(it.label for it in items if it.sha1 in why)
    return rejected, lost, len(conflicted), [it for it in items if it.sha1 not in why]


def _groups(items: list[Item]) -> list[list[Item]]:
    """Connected groups of items sharing a content or a patient (union-find), each in item order, the groups
    ordered by their first item: with sorted items, an order that does not depend on the input's."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is the group's first item

    by_sha: dict[str, int] = {}
    by_patient: dict[str, int] = {}
    for i, it in enumerate(items):
        j = by_sha.setdefault(it.sha1, i)
        if j != i:
            union(i, j)
        if it.patient is not None:
            j = by_patient.setdefault(it.patient, i)
            if j != i:
                union(i, j)
    out: dict[int, list[Item]] = {}
    for i, it in enumerate(items):
        out.setdefault(find(i), []).append(it)
    return list(out.values())


# ---------------------------------------------------------------- dealing groups to splits

def _deal_by_class(groups, classes, fractions, rng, assignment, lost) -> None:
    """Single-label: each class's groups (by majority class) shuffled and dealt to test, then val, until each
    holds its fraction of the class's files; the rest train. A class too small to reach every split fails."""
    by_class: dict[int, list[list[Item]]] = defaultdict(list)
    for members in groups:
        if len(members) == 1:
            by_class[members[0].label].append(members)
            continue
        counts = Counter(m.label for m in members)
        by_class[max(counts, key=lambda label: (counts[label], -label))].append(members)
    targets = [s for s in ("test", "val") if fractions[s] > 0]
    for label in range(len(classes)):  # every class: conflicts may have emptied one
        grp = by_class[label]
        order = rng.permutation(len(grp))
        total = sum(len(m) for m in grp)
        quotas = {s: max(1, round(fractions[s] * total)) for s in targets}
        if len(grp) < 1 + len(targets):
            unit = "distinct image(s)" if all(m.patient is None for g in grp for m in g) else GROUPS
            raise ValueError(f"class {classes[label]!r} has {len(grp)} {unit}; at least {1 + len(targets)} are needed "
                             f"to stratify into train/{'/'.join(reversed(targets))}: add images or drop the class "
                             f"from dataset.classes" + (f" ({lost[label]} of its files were rejected: conflicting "
                                                        "labels)" if lost[label] else ""))
        filled = dict.fromkeys(targets, 0)
        trained = False
        for idx in order:
            members = grp[idx]
            split = next((s for s in targets if filled[s] < quotas[s]), "train")
            if split != "train":
                filled[split] += len(members)
            trained |= split == "train"
            assignment.update((m.path, split) for m in members)
        if not trained:
            raise ValueError(f"class {classes[label]!r} has no training image left after the val/test split; "
                             f"lower split.val/split.test or add images")


def _deal_multilabel(groups, k: int, fractions, rng, assignment) -> None:
    """Iterative stratification over groups. As in Sechidis et al.: take the label (a finding, or "no finding",
    column k) with the fewest positives still to deal, deal each of its groups (in the seed's order), repeat.
    Adapted to groups of images: a group goes to the split that needs it most over all its labels (each split's
    remaining need for a label relative to its target, averaged over the group's positives) plus its need for
    files (ties: the most files wanted, then the seed). The paper's rule, the need for the current label alone, balances label counts but
    lets split sizes drift with the groups' varying number of findings per image, which skews every prevalence."""
    if not groups:
        return
    splits = ["train"] + [s for s in ("val", "test") if fractions[s] > 0]
    frac = np.array([1 - sum(fractions.values())] + [fractions[s] for s in splits[1:]])
    sizes = np.array([len(m) for m in groups], np.int64)
    labels = np.array([m.label for members in groups for m in members], np.int64)
    rows = np.hstack([multi_hot(labels, k), (labels == 0)[:, None]]).astype(np.int64)
    counts = np.add.reduceat(rows, np.concatenate([[0], np.cumsum(sizes)[:-1]]))  # per group: positives per
    #                                                            finding, then files without any finding
    target = np.outer(frac, counts.sum(0)).astype(float)  # split x label: positives wanted
    scale = 1 / np.where(target > 0, target, 1)
    desired = target.copy()  # positives still wanted
    target_files = frac * sizes.sum()
    wanted = target_files.copy()  # files still wanted
    remaining = counts.sum(0)
    order = rng.permutation(len(groups))  # the seed's order in which each label's groups are dealt
    with_label = [order[counts[order, j] > 0] for j in range(k + 1)]
    done = np.zeros(len(groups), bool)
    while remaining.any():
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
        for g in with_label[label]:
            if done[g]:
                continue
            need = (desired * scale) @ counts[g] / counts[g].sum() + wanted / target_files
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:  # as in the paper: the split that wants the most files, then the seed
                best = best[wanted[best] == wanted[best].max()]
            s = int(best[0] if len(best) == 1 else rng.choice(best))
            done[g] = True
            desired[s] -= counts[g]
            wanted[s] -= sizes[g]
            remaining -= counts[g]
            assignment.update((m.path, splits[s]) for m in groups[g])
    dealt = set(assignment.values())
    for s in splits:
        if s not in dealt:
            raise ValueError(f"the {s} split is empty: {len(groups)} {GROUPS} are too few for split.val="
                             f"{fractions['val']} and split.test={fractions['test']}; add images or change them")


# ---------------------------------------------------------------- report

def _report(items, kept, assignment, classes, task, conflicts, moved, rejected, notes) -> SplitReport:
    sizes = Counter(assignment.values())
    where = np.array([SPLITS.index(assignment[it.path]) for it in kept], np.int64).reshape(-1)
    labels = np.array([it.label for it in kept], np.int64).reshape(-1)
    hot = multi_hot(labels, len(classes)) if task == "multilabel" else one_hot(labels, len(classes))
    per_class = {s: dict(zip(classes, (int(n) for n in hot[where == i].sum(0)))) for i, s in enumerate(SPLITS)}
    for s in ("val", "test") if task == "multilabel" else ():
        missing = [c for c in classes if sizes[s] and not per_class[s][c]]
        if missing:
            notes.append(f"no positive image in {s} for finding(s) {missing}: too rare for the split")
    diff = max((abs(per_class["train"][c] / sizes["train"] - per_class[s][c] / sizes[s])
                for s in ("val", "test") if sizes[s] and sizes["train"] for c in classes), default=0.0)
    split_of_patient: dict[str, str] = {}
    split_of_sha: dict[str, str] = {}
    overlap, content_overlap = set(), set()
    patient_files: Counter = Counter()
    per_patient_split: dict[str, set] = {s: set() for s in SPLITS}
    for it in kept:
        s = assignment[it.path]
        if split_of_sha.setdefault(it.sha1, s) != s:
            content_overlap.add(it.sha1)
        if it.patient is not None:
            patient_files[it.patient] += 1
            per_patient_split[s].add(it.patient)
            if split_of_patient.setdefault(it.patient, s) != s:
                overlap.add(it.patient)
    if overlap or content_overlap:  # an internal check: the grouping above makes this impossible
        raise AssertionError(f"split leak: {len(overlap)} patient(s) and {len(content_overlap)} content(s) in two "
                             f"splits")
    ipp = sorted(patient_files.values())
    per_source: dict[str, dict[str, int]] = {}
    if any(it.source is not None for it in items):
        per_source = {s: {} for s in SPLITS}
        for it in kept:
            row = per_source[assignment[it.path]]
            row[it.source or ""] = row.get(it.source or "", 0) + 1
    sources_of: dict[str, set] = defaultdict(set)
    for it in items:
        if it.source is not None:
            sources_of[it.sha1].add(it.source)
    dups = [n for n in Counter(it.sha1 for it in items).values() if n > 1]
    return SplitReport(
        assignment, {s: sizes.get(s, 0) for s in SPLITS}, per_class, len(dups), sum(dups) - len(dups), conflicts,
        moved, notes, rejected, patients={s: len(p) for s, p in per_patient_split.items()},
        images_per_patient={"min": ipp[0], "median": statistics.median(ipp), "max": ipp[-1]} if ipp else
        {"min": 0, "median": 0, "max": 0},
        patient_overlap=len(overlap), max_prevalence_diff=round(float(diff), 6), per_source=per_source,
        cross_source_duplicates=sum(len(s) > 1 for s in sources_of.values()))
