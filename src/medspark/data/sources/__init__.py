"""Dataset sources: how a dataset's files are found, one module per source, chosen by the dataset option's `_target_`.

A source is a class whose constructor takes the dataset option's keys (all but `name`, which labels the data
folder and the runs) and whose `list() -> Listing` gives paths, labels and predefined splits, never pixels; its
`has_test_split` (default False) says whether the dataset can bring its own test split, for the config check
before listing (the listing says whether it did). A new source is one module here (or anywhere importable) plus
one conf/dataset/<name>.yaml naming its class in `_target_`.
Built in: class_folders (root/<class>/<images>), split_folders (root/<split>/<class>/<images>), label_csv (a label
CSV and its image folders: NIH ChestX-ray14, any `image,label` table) and synthetic (the built-in phantoms,
generated, then read as class folders; and the chest X-ray phantoms, generated in the NIH layout, read as a label CSV).

Every file under the root is accounted for: it is either an input (`Listing.records`: inside a class folder,
decodable or not; preprocessing accepts or rejects it with a reason) or `Listing.ignored` with the reason it is
not an input (outside the class folders, in a folder that is not a class, behind a symlink loop, ...).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..names import to_text
from ..phi import path_key, shown_rows

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message names the config key to fix."""


@dataclass(frozen=True)
class Record:
    path: str
    label: int  # the class index (binary, multiclass), or for multilabel the findings' bitmask (data/targets.py)
    split: str | None  # "test" when the dataset's own test folder holds it, else None (assigned later)
    patient: str | None = None  # pseudonymous patient key (data/phi.pseudonym), never the raw id; None: unknown
    source: str | None = None  # which source of a merged dataset listed it (None: a single-source dataset)


@dataclass(frozen=True)
class Listing:
    records: list[Record]
    classes: list[str]  # class names, or for multilabel the finding names (the negative value is not one)
    has_test_split: bool  # the dataset brought its own test split
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why): under the root, not an input
    task: str = ""  # binary | multiclass | multilabel (data/targets.TASKS); "" = from the class count
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path or "file:row N", why): entries the source
    #                                  itself refused (a label CSV's row without its image, an unknown label, ...)

    def __post_init__(self):
        from ..targets import task_of

        object.__setattr__(self, "task", task_of(self.task, self.classes))

    def counts(self) -> dict[str, int]:
        """Images per class; for multilabel, positive images per finding."""
        from ..targets import indices

        out = {c: 0 for c in self.classes}
        for r in self.records:
            for i in indices(r.label, self.task):
                out[self.classes[i]] += 1
        return out


def source(dataset_cfg):
    """The source object a `dataset` config names: its `_target_` class, built with the other keys but `name`.
    A key the source does not take is one line naming it (and the source's keys), as other settings are."""
    import inspect

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    options = dict(dataset_cfg) if isinstance(dataset_cfg, dict) else OmegaConf.to_container(dataset_cfg, resolve=True)
    options.pop("name", None)
    target = options.pop("_target_", None)
    if not target:
        raise DatasetError("dataset._target_ is not set: name the dataset's source, e.g. _target_: "
                           "medspark.data.sources.class_folders.ClassFolders (or split_folders.SplitFolders)")
    try:
        cls = get_class(target)
    except Exception as e:  # Hydra's message names the module or attribute that is missing
        raise DatasetError(f"dataset._target_={target} cannot be imported: {str(e).splitlines()[0]}") from None
    keys = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in keys.values()):
        for k in options:
            if k not in keys:
                raise DatasetError(f"dataset.{k} is not a setting of the {cls.__name__} source ({target}); its "
                                   f"settings: {', '.join(keys)}")
    return cls(**options)


def has_test_split(dataset_cfg) -> bool:
    """Whether the dataset's source can bring its own test split (then split.test is not needed), before listing."""
    return bool(getattr(source(dataset_cfg), "has_test_split", False))


def list_dataset(dataset_cfg) -> Listing:
    """The listing of the dataset a `dataset` config describes (see `source`)."""
    return source(dataset_cfg).list()


# ---------------------------------------------------------------- helpers the folder sources share

NOT_CLASSES = ("__MACOSX",)  # archive metadata folders (macOS zips): never a class, even when classes are inferred


def walk(folder: Path, ignored: list[tuple[str, str]]) -> list[str]:
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


def files_under(folder: Path) -> list[str]:
    """Every non-directory entry below folder, sorted (see walk); what cannot be walked is dropped."""
    return walk(folder, [])


def not_inputs(entry: Path, why: str, ignored: list[tuple[str, str]]) -> None:
    """A file, or every file of a folder, under the root that is not an input: counted, with the reason."""
    if entry.is_dir():
        ignored.extend((f, why) for f in walk(entry, ignored))
    else:
        ignored.append((str(entry), why))


def check_root(root, key: str = "dataset.root") -> Path:
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{key} is not set: pass {key}=/path/to/images")
    p = Path(os.path.expanduser(str(root))).absolute()  # executors may not share the driver's working directory
    if not p.is_dir():
        raise DatasetError(f"{key}={root} does not exist or is not a directory; set {key} to the dataset folder")
    return p


def log_ignored(ignored: list[tuple[str, str]], root: Path) -> None:
    """A warning when files under the root may be data left out; markers (_SUCCESS, .DS_Store) are only counted."""
    if ignored:
        notable = [(p, why) for p, why in ignored if not os.path.basename(p).startswith(("_", "."))]
        path, why = (notable or ignored)[0]
        (path, why), = shown_rows([(path, why)], path_key())  # privacy.hash_paths
        log.log(logging.WARNING if notable else logging.INFO, "%d file(s) under %s are not inputs, e.g. %s (%s); "
                "see the listing's `ignored`", len(ignored), to_text(str(root)), to_text(path), to_text(why))
