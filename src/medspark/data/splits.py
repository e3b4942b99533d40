"""Stratified, seeded train/val/test assignment that never lets equal contents straddle splits."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "val", "test")
LABEL_CONFLICTS = ("reject", "keep")  # split.label_conflicts: what to do with one content under two classes


class Item(NamedTuple):
    """One hashed file to assign: patient and source may be None (unknown, a single-source dataset)."""
    path: str
    label: int
    sha1: str
    split: str | None
    patient: str | None = None
    source: str | None = None


@dataclass
class SplitReport:
    assignment: dict[str, str]  # path -> split
    sizes: dict[str, int]
    per_class: dict[str, dict[str, int]]  # split -> class -> count
    duplicate_groups: int  # contents that occur more than once
    duplicate_files: int  # files beyond the first copy of each content
    label_conflicts: int  # contents filed under more than one class
    moved_to_test: int = 0  # training files whose content is also in the predefined test split
    notes: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): label conflicts, when rejected


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
    can only lower a class's count, so a class that is short here is short for sure; `assign` checks again."""
    from .preprocess import is_system_file
    from .sources import DatasetError

    try:
        check_fractions(val, test, listing.has_test_split)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    targets = ["val"] if listing.has_test_split else ["test", "val"]
    files = Counter(r.label for r in listing.records if r.split is None and not is_system_file(r.path))
    for label, cls in enumerate(listing.classes):
        if files[label] < 1 + len(targets):
            raise DatasetError(
                f"class {cls!r} has {files[label]} distinct image(s) at most ({files[label]} file(s) listed); at "
                f"least {1 + len(targets)} are needed to stratify into train/{'/'.join(reversed(targets))}: add "
                f"images, or drop the class from dataset.classes (classes with enough: "
                f"{[c for i, c in enumerate(listing.classes) if files[i] >= 1 + len(targets)]})")


def assign(items, classes: list[str], val: float, test: float, seed: int, has_test_split: bool = False,
           label_conflicts: str = "reject", task: str = "multiclass") -> SplitReport:
    """items: (path, label, sha1, predefined_split or None). Groups by content hash, then splits the
    groups of each class with a seeded shuffle so that each split gets its share of every class.
    A content under two or more classes (a copy, a file linked into two class folders: one real file is one
    content) is ambiguous: by default (label_conflicts="reject") every copy is rejected with the reason
    `conflicting labels: a, b`; "keep" trains each copy with its own label, all in one split."""
    check_fractions(val, test, has_test_split)
    check_label_conflicts(label_conflicts)
    groups: dict[str, list] = defaultdict(list)
    for it in items:
        groups[it[2]].append(it)
    assignment: dict[str, str] = {}
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)  # label -> [(sha1, n_files)]
    conflicts = moved = 0
    rejected = []
    for sha, members in groups.items():
        if len(members) == 1 and members[0][3] != "test":  # the common case, without a Counter (50k files: 3x faster)
            by_class[members[0][1]].append((sha, 1))
            continue
        labels = Counter(m[1] for m in members)
        conflicts += len(labels) > 1
        if len(labels) > 1 and label_conflicts == "reject":
            why = "conflicting labels: " + ", ".join(classes[label] for label in sorted(labels))
            rejected.extend((m[0], why) for m in members)
        elif any(m[3] == "test" for m in members):  # the dataset's own test split wins for the whole group
            moved += sum(m[3] != "test" for m in members)
            for m in members:
                assignment[m[0]] = "test"
        else:
            by_class[labels.most_common(1)[0][0]].append((sha, len(members)))
    carve_test = 0.0 if has_test_split else test
    rng = np.random.default_rng(seed)
    label_of = {it[0]: it[1] for it in items}
    lost = Counter(label_of[path] for path, _ in rejected)
    for label in range(len(classes)):  # every class: conflicts may have emptied one
        grp = sorted(by_class[label])  # order independent of listing order
        order = rng.permutation(len(grp))
        total = sum(n for _, n in grp)
        targets = [s for s, frac in (("test", carve_test), ("val", val)) if frac > 0]
        quotas = {s: max(1, round((carve_test if s == "test" else val) * total)) for s in targets}
        if len(grp) < 1 + len(targets):
            raise ValueError(f"class {classes[label]!r} has {len(grp)} distinct image(s); at least {1 + len(targets)} "
                             f"are needed to stratify into train/{'/'.join(reversed(targets))}: add images or drop "
                             f"the class from dataset.classes" + (f" ({lost[label]} of its files were rejected: "
                             "conflicting labels)" if lost[label] else ""))
        filled = dict.fromkeys(targets, 0)
        for idx in order:
            sha, n = grp[idx]
            split = next((s for s in targets if filled[s] < quotas[s]), "train")
            if split != "train":
                filled[split] += n
            for m in groups[sha]:
                assignment[m[0]] = split
        if not any(assignment[m[0]] == "train" for sha, _ in grp for m in groups[sha]):
            raise ValueError(f"class {classes[label]!r} has no training image left after the val/test split; "
                             f"lower split.val/split.test or add images")
    sizes = Counter(assignment.values())
    per_class: dict[str, dict[str, int]] = {s: {c: 0 for c in classes} for s in SPLITS}
    for path, s in assignment.items():
        per_class[s][classes[label_of[path]]] += 1
    dups = [len(m) for m in groups.values() if len(m) > 1]
    return SplitReport(assignment, {s: sizes.get(s, 0) for s in SPLITS}, per_class, len(dups),
                       sum(dups) - len(dups), conflicts, moved, rejected=rejected)
