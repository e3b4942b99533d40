"""Class folders, root/<class>/<images> (image_folder, brain_mri_binary): the source the other folder sources extend.

`patient_pattern` (all folder sources): a regular expression searched in each file name; its group 1 (or the whole
match) is the patient id, kept only as `phi.pseudonym` (chest X-rays: `person1000_bacteria_2931.jpeg` -> person1000).
A name that does not match has no known patient (counted and logged once); splits then group by content alone.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from ..names import to_text
from ..phi import pseudonym
from ..preprocess import is_system_file
from . import NOT_CLASSES, DatasetError, Listing, Record, check_root, files_under, log_ignored, not_inputs, walk

log = logging.getLogger(__name__)


class ClassFolders:
    """Every subfolder of root is a class unless `classes` names them; the test split is carved out later."""
    has_test_split = False

    def __init__(self, root, classes: list[str] | None = None, patient_pattern: str | None = None):
        self.root, self.classes = root, list(classes) if classes else None
        self.patient_pattern = patient_regex(patient_pattern)

    def folders(self, root: Path, ignored: list[tuple[str, str]]) -> dict[str, Path]:
        """Split name -> the folder holding its <class>/ subfolders ("train": split later); what else is under
        root goes to `ignored` with the reason."""
        return {"train": root}

    def list(self) -> Listing:
        root = check_root(self.root)
        ignored: list[tuple[str, str]] = []
        folders = self.folders(root, ignored)
        classes = class_dirs(folders["train"], self.classes, "dataset.root")
        refuse_shared_class_folders(folders, classes)
        records = []
        for split, folder in folders.items():
            records += read_classes(folder, classes, split, ignored)
        log_ignored(ignored, root)
        return Listing(with_patients(records, self.patient_pattern), classes, "test" in folders, ignored)


def patient_regex(pattern: str | None, key: str = "dataset.patient_pattern") -> re.Pattern | None:
    """The compiled `patient_pattern`, or a one-line error naming the key."""
    if pattern is None or str(pattern) == "":
        return None
    try:
        return re.compile(str(pattern))
    except re.error as e:
        raise DatasetError(f"{key}={pattern!r} is not a valid regular expression ({e}); fix it, or set it to null "
                           f"to split by image") from None


def with_patients(records: list[Record], pattern: re.Pattern | None, key: str = "dataset.patient_pattern"):
    """The records with `patient` set from their file names (pseudonyms only); names that do not match keep None."""
    if pattern is None:
        return records
    out, unmatched = [], 0
    for r in records:
        if is_system_file(r.path):  # .DS_Store and the like: rejected later, nobody's image
            out.append(r)
            continue
        m = pattern.search(os.path.basename(r.path))
        patient = m and m.group(1 if pattern.groups else 0)
        unmatched += not patient
        out.append(dataclasses.replace(r, patient=pseudonym(patient)) if patient else r)
    if unmatched:
        log.warning("%d of %d file name(s) do not match %s: no patient known for them (each is split as its own "
                    "patient)", unmatched, len(records), key)
    return out


def class_dirs(root: Path, classes, key: str) -> list[str]:
    present = sorted(d.name for d in root.iterdir() if _is_class_dir(d))
    if classes is None:
        if len(present) < 2:
            raise DatasetError(f"{root} has {len(present)} class folder(s) {present}; a classifier needs at least 2 "
                               f"(layout: {key}/<class>/<images>)")
        return _check_names(present, root)
    missing = [c for c in classes if c not in present]
    if missing:
        raise DatasetError(f"class folder(s) {missing} not found in {root}; found {present}. "
                           f"Fix dataset.classes or dataset.root")
    return _check_names(list(classes), root)


def _check_names(classes: list[str], root: Path) -> list[str]:
    """Class names become labels, MLflow params and the model's output columns: they must be text."""
    for c in classes:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"class folder '{to_text(c)}' in {to_text(str(root))} has a name that is not UTF-8 "
                               f"text; rename the folder (the files in it may have any name)") from None
    return classes


def refuse_shared_class_folders(folders: dict[str, Path], classes: list[str]) -> None:
    """Two classes whose folders are one (a class folder that is a symlink to another, or to a folder inside it)
    would label every image twice: one line before Spark, instead of rejecting every one of its files."""
    real = [(cls, folder / cls, os.path.realpath(folder / cls)) for folder in folders.values() for cls in classes
            if (folder / cls).is_dir()]
    real.sort(key=lambda r: r[2] == os.path.abspath(r[1]))  # links first: the message names the link
    for cls, path, resolved in real:
        for other, other_path, other_resolved in real:
            if other != cls and (resolved + os.sep).startswith(other_resolved + os.sep):
                how = "is the same folder as" if resolved == other_resolved else "is inside"
                raise DatasetError(f"class folder {to_text(str(path))} resolves to {to_text(resolved)}, which {how} "
                                   f"class folder {to_text(str(other_path))}: its images would carry both labels "
                                   f"'{cls}' and '{other}'; remove the link or leave one class out of dataset.classes")


def _is_class_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CLASSES


def read_classes(folder: Path, classes: list[str], split: str, ignored: list[tuple[str, str]]) -> list[Record]:
    """The records of one folder of <class>/ subfolders (predefined split: None for "train", else `split`); its
    other entries go to `ignored`. A training class without a single candidate image is an error."""
    for entry in sorted(folder.iterdir()):
        if entry.name in classes and entry.is_dir():
            continue
        if not entry.is_dir():
            why = "not in a class folder (layout: <root>/<class>/<images>)"
        elif entry.name.startswith("."):
            why = "hidden folder, not a class"
        elif entry.name in NOT_CLASSES:
            why = f"{entry.name} holds archive metadata, not a class"
        else:
            why = f"folder {entry.name!r} is not one of dataset.classes {classes}"
        not_inputs(entry, why, ignored)
    records = []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        files = walk(cls_dir, ignored) if cls_dir.is_dir() else []
        if split == "train" and not any(not is_system_file(f) for f in files):
            raise DatasetError(_empty_class(cls_dir, cls, files, classes, folder))
        records.extend(Record(f, label, None if split == "train" else split) for f in files)
    return records


def _empty_class(cls_dir: Path, cls: str, files: list[str], classes: list[str], folder: Path) -> str:
    """The one line for a class without a single candidate image: what is there, and the two ways out."""
    what = "is empty" if not files else f"holds no images, only {len(files)} system file(s) such as " \
                                       f"{os.path.basename(files[0])}"
    others = [c for c in classes if c != cls and any(not is_system_file(f) for f in files_under(folder / c))]
    return (f"class folder {cls_dir} {what}; add images to it, or set dataset.classes to the classes to use "
            f"(with images: {others})")
