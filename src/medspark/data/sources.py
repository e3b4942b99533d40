"""Dataset layouts on disk -> a listing of (path, label, predefined split). Paths only: never pixels."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = ("class_folders", "split_folders")


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message names the config key to fix."""


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    split: str | None  # "test" when the dataset's own test folder holds it, else None (assigned later)


@dataclass(frozen=True)
class Listing:
    records: list[Record]
    classes: list[str]
    has_test_split: bool  # the dataset brought its own test split

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for r in self.records:
            out[self.classes[r.label]] += 1
        return out


def _files_under(folder: Path) -> list[str]:
    """Every non-directory entry below folder, sorted; symlinks to directories are not followed (loops)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in filenames)
    return sorted(found)


def _class_dirs(root: Path, classes, key: str) -> list[str]:
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if len(present) < 2:
            raise DatasetError(f"{root} has {len(present)} class folder(s) {present}; a classifier needs at least 2 "
                               f"(layout: {key}/<class>/<images>)")
        return present
    missing = [c for c in classes if c not in present]
    if missing:
        raise DatasetError(f"class folder(s) {missing} not found in {root}; found {present}. "
                           f"Fix dataset.classes or dataset.root")
    return list(classes)


def _check_root(root, key: str = "dataset.root") -> Path:
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{key} is not set: pass {key}=/path/to/images")
    p = Path(os.path.expanduser(str(root))).absolute()  # executors may not share the driver's working directory
    if not p.is_dir():
        raise DatasetError(f"{key}={root} does not exist or is not a directory; set {key} to the dataset folder")
    return p


def list_images(cfg) -> Listing:
    """List a dataset from its config (`dataset` group): layout, root, classes, and split folder names."""
    layout = cfg.get("layout", "class_folders")
    if layout not in LAYOUTS:
        raise DatasetError(f"dataset.layout={layout!r} must be one of {', '.join(LAYOUTS)}")
    root = _check_root(cfg.get("root"))
    classes = list(cfg.classes) if cfg.get("classes") else None
    folders: dict[str, Path] = {}  # split name -> folder holding <class>/ subfolders
    if layout == "class_folders":
        folders["train"] = root
    else:
        names = cfg.get("split_dirs") or {}
        train_dir = root / names.get("train", "train")
        if not train_dir.is_dir():
            raise DatasetError(f"{train_dir} not found: dataset.split_dirs.train={names.get('train')!r} must name the "
                               f"training folder inside dataset.root={root}")
        folders["train"] = train_dir
        test_dir = root / names.get("test", "test") if names.get("test") else None
        if test_dir is not None and test_dir.is_dir():
            folders["test"] = test_dir
    classes = _class_dirs(folders["train"], classes, "dataset.root")
    records = []
    for split, folder in folders.items():
        for label, cls in enumerate(classes):
            cls_dir = folder / cls
            files = _files_under(cls_dir) if cls_dir.is_dir() else []
            if not files and split == "train":
                raise DatasetError(f"class folder {cls_dir} is empty; add images or remove {cls!r} from dataset.classes")
            records.extend(Record(f, label, None if split == "train" else split) for f in files)
    return Listing(records, classes, "test" in folders)
