"""Split folders (brain_mri, chest_xray): root/<train>/<class>/<images>, and the dataset's own test split beside it."""
from __future__ import annotations

from pathlib import Path

from . import DatasetError, not_inputs
from .class_folders import ClassFolders


class SplitFolders(ClassFolders):
    """Class folders inside a training folder and, when `split_dirs.test` names one that exists, a test folder
    whose images form the test split (validation is carved from training). Anything else under root is ignored."""

    def __init__(self, root, classes: list[str] | None = None, split_dirs: dict | None = None,
                 patient_pattern: str | None = None):
        super().__init__(root, classes, patient_pattern)
        self.split_dirs = dict(split_dirs or {})

    @property
    def has_test_split(self) -> bool:
        return bool(self.split_dirs.get("test"))

    def folders(self, root: Path, ignored: list[tuple[str, str]]) -> dict[str, Path]:
        names = self.split_dirs
        folders = {"train": root / names.get("train", "train")}
        if not folders["train"].is_dir():
            raise DatasetError(f"{folders['train']} not found: dataset.split_dirs.train={names.get('train')!r} must "
                               f"name the training folder inside dataset.root={root}")
        if names.get("test") and (root / names["test"]).is_dir():
            folders["test"] = root / names["test"]
        used = {p.name for p in folders.values()}
        why = (f"outside the split folders (dataset.split_dirs: train={names.get('train', 'train')!r}, "
               f"test={names.get('test')!r})")
        for entry in sorted(root.iterdir()):
            if entry.name not in used:
                not_inputs(entry, why, ignored)
        return folders
