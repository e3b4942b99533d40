"""Dataset layouts on disk -> a listing of (path, label, predefined split). Paths only: never pixels.

Every file under the root is accounted for: it is either an input (`Listing.records`: inside a class folder,
decodable or not; preprocessing accepts or rejects it with a reason) or `Listing.ignored` with the reason it is
not an input (outside the class folders, in a folder that is not a class, behind a symlink loop, ...).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .preprocess import is_system_file

log = logging.getLogger(__name__)
LAYOUTS = ("class_folders", "split_folders")
NOT_CLASSES = ("__MACOSX",)  # archive metadata folders (macOS zips): never a class, even when classes are inferred


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
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why): under the root, not an input

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for r in self.records:
            out[self.classes[r.label]] += 1
        return out


def _walk(folder: Path, ignored: list[tuple[str, str]]) -> list[str]:
    """Every non-directory entry below folder, sorted. Symlinked folders are followed (datasets assembled from
    links), each real folder once: a link back up the tree (a loop) or a second way into a folder already read
    goes to `ignored`, as does a folder that cannot be read. Dangling links and links to themselves are files
    here: reading them fails, and preprocessing rejects them with the OS's reason."""
    found = []
    seen = {os.path.realpath(folder)}

    def unreadable(err: OSError):
        ignored.append((err.filename or str(folder), f"unreadable folder: {err.strerror or type(err).__name__}"))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if real in seen:
                ignored.append((full, f"symlink to a folder already listed ({real}): not followed (a loop or a "
                                      f"second path to the same files)"))
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        found.extend(os.path.join(dirpath, f) for f in filenames)
    return sorted(found)


def _files_under(folder: Path) -> list[str]:
    """Every non-directory entry below folder, sorted (see _walk); what cannot be walked is dropped."""
    return _walk(folder, [])


def _not_inputs(entry: Path, why: str, ignored: list[tuple[str, str]]) -> None:
    """A file, or every file of a folder, under the root that is not an input: counted, with the reason."""
    if entry.is_dir():
        ignored.extend((f, why) for f in _walk(entry, ignored))
    else:
        ignored.append((str(entry), why))


def _is_class_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CLASSES


def _class_dirs(root: Path, classes, key: str) -> list[str]:
    present = sorted(d.name for d in root.iterdir() if _is_class_dir(d))
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
    ignored: list[tuple[str, str]] = []
    if layout == "split_folders":
        used = {p.name for p in folders.values()}
        names = cfg.get("split_dirs") or {}
        why = (f"outside the split folders (dataset.split_dirs: train={names.get('train', 'train')!r}, "
               f"test={names.get('test')!r})")
        for entry in sorted(root.iterdir()):
            if entry.name not in used:
                _not_inputs(entry, why, ignored)
    records = []
    for split, folder in folders.items():
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
            _not_inputs(entry, why, ignored)
        for label, cls in enumerate(classes):
            cls_dir = folder / cls
            files = _walk(cls_dir, ignored) if cls_dir.is_dir() else []
            if split == "train" and not any(not is_system_file(f) for f in files):
                raise DatasetError(_empty_class(cls_dir, cls, files, classes, folder))
            records.extend(Record(f, label, None if split == "train" else split) for f in files)
    if ignored:  # a warning when it may be data left out; markers (_SUCCESS, .DS_Store) are only counted
        notable = [(p, why) for p, why in ignored if not os.path.basename(p).startswith(("_", "."))]
        log.log(logging.WARNING if notable else logging.INFO, "%d file(s) under %s are not inputs, e.g. %s (%s); "
                "see the listing's `ignored`", len(ignored), root, *(notable or ignored)[0])
    return Listing(records, classes, "test" in folders, ignored)


def _empty_class(cls_dir: Path, cls: str, files: list[str], classes: list[str], folder: Path) -> str:
    """The one line for a class without a single candidate image: what is there, and the two ways out."""
    what = "is empty" if not files else f"holds no images, only {len(files)} system file(s) such as " \
                                       f"{os.path.basename(files[0])}"
    others = [c for c in classes if c != cls and any(not is_system_file(f) for f in _files_under(folder / c))]
    return (f"class folder {cls_dir} {what}; add images to it, or set dataset.classes to the classes to use "
            f"(with images: {others})")
