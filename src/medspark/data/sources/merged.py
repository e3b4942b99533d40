"""Datasets merged from several sources (public sets copy each other and name their classes their own way).

The dataset option lists its sources by name, each with its own `_target_` and options (any source type, built
by `sources.source`) and a `class_map` from the source's class names to the dataset's; several may map to one,
and a class the map leaves out is dropped: its files go to `Listing.ignored` with the reason, so they are counted:

    _target_: medspark.data.sources.merged.Merged
    sources:
      kaggle4:                       # the source's name: records carry it (Record.source), reports key by it
        _target_: medspark.data.sources.class_folders.ClassFolders
        root: ???
        class_map: {glioma: tumor, meningioma: tumor, pituitary: tumor, notumor: no_tumor}
      yesno:
        _target_: medspark.data.sources.class_folders.ClassFolders
        root: ???
        class_map: {"yes": tumor, "no": no_tumor}
    classes: null                    # the mapped names, sorted; or the dataset's classes in the order to use

Without a `class_map` a source's classes keep their names. The dataset's classes are what the maps name (sorted)
or `classes`; a map naming a class outside `classes`, a map key that is not one of the source's classes, a
source without `_target_` and a duplicated name are one-line DatasetErrors naming the key. One file listed by
two sources is one input (the second listing is ignored, with the reason); equal contents in two sources are
grouped by the split like copies within one (data/splits.py), so a copy never straddles train and test.

Test splits: the dataset has its own test split when any source brings one (split.test is then not used), and a
source without one contributes to train and validation only, so its images are in no test metric; to evaluate
on every source, merge sources without test splits and let the split carve one from all of them.

Multilabel sources (a label CSV) merge with multilabel sources only: their maps rename findings (the bitmask is
rewritten, data/targets.py), and an image with a finding its map leaves out is dropped and counted (its label
cannot be written without that finding); a multilabel source beside a single-label one is a DatasetError.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace

from ..targets import bits, indices
from . import DatasetError, Listing, Record, source

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # a source's name is part of MLflow metric keys (test_source_<name>_...)
UNMAPPED = "{kind} '{cls}' of source '{source}' is not mapped (dataset.sources.{source}.class_map)"
_UNMAPPED = re.compile(r"^(?:class|finding) '.*' of source '([A-Za-z0-9_\-]+)' is not mapped ")


class Merged:
    """Several sources as one dataset: `sources` is name -> options (or a list of options, each with a `name`),
    each source's options hold its `_target_`, its own settings and an optional `class_map`."""

    def __init__(self, sources, classes: list[str] | None = None):
        self.classes = list(classes) if classes else None
        self.parts = []  # (name, class_map or None, source object)
        for name, options in _entries(sources):
            class_map = _class_map(name, options.pop("class_map", None))
            if self.classes is not None:
                for src_cls, target in (class_map or {}).items():
                    if target not in self.classes:
                        raise DatasetError(f"dataset.sources.{name}.class_map.{src_cls}={target!r} is not one of "
                                           f"dataset.classes {self.classes}; map it to one of them, or add it there")
            if not options.get("_target_"):
                raise DatasetError(f"dataset.sources.{name}._target_ is not set: name the source's class, e.g. "
                                   f"_target_: medspark.data.sources.class_folders.ClassFolders")
            with keyed(name):
                try:
                    self.parts.append((name, class_map, source(options)))
                except TypeError as e:  # a required setting of the source left out
                    raise DatasetError(f"dataset.sources.{name}: the {options['_target_']} source cannot be built from "
                                       f"these settings: {e}") from None

    @property
    def has_test_split(self) -> bool:
        """Whether any source can bring its own test split (see the module docstring for the others)."""
        return any(bool(getattr(src, "has_test_split", False)) for _, _, src in self.parts)

    def list(self) -> Listing:
        listings = []
        for name, class_map, src in self.parts:
            with keyed(name):
                listings.append((name, class_map, src.list()))
        return merge(listings, self.classes)


def merge(parts, classes: list[str] | None = None) -> Listing:
    """One Listing from (name, class_map or None, Listing) per source: labels renamed to the dataset's classes
    (`classes`, or the mapped names sorted), records tagged with their source, unmapped classes ignored."""
    tasks = {name: lst.task for name, _, lst in parts}
    multilabel = [n for n, t in tasks.items() if t == "multilabel"]
    if multilabel and len(multilabel) < len(tasks):
        other = next(n for n in tasks if n not in multilabel)
        raise DatasetError(f"dataset.sources: source '{multilabel[0]}' is multilabel and source '{other}' is "
                           f"{tasks[other]}; a merged dataset has one task: merge multilabel sources only with "
                           f"multilabel sources")
    maps = {}
    for name, class_map, lst in parts:
        if class_map is None:
            class_map = {c: c for c in lst.classes}
        unknown = [c for c in class_map if c not in lst.classes]
        if unknown:
            raise DatasetError(f"dataset.sources.{name}.class_map.{unknown[0]}: '{unknown[0]}' is not a class of "
                               f"source '{name}' (its classes: {lst.classes}); fix the map's key")
        maps[name] = class_map
    mapped = sorted({t for m in maps.values() for t in m.values()})
    if classes is None:
        classes = mapped
    elif missing := [c for c in classes if c not in mapped]:
        raise DatasetError(f"dataset.classes has {missing}, which no dataset.sources.<name>.class_map maps to; map a "
                           f"source's class to it or remove it from dataset.classes")
    if len(classes) < (1 if multilabel else 2):
        raise DatasetError(f"dataset.sources: the class maps give {len(classes)} class(es) {classes}; a classifier "
                           f"needs at least 2: map the sources' classes to two or more names")
    index = {c: i for i, c in enumerate(classes)}
    task = "multilabel" if multilabel else ""
    kind = "finding" if multilabel else "class"
    records, ignored, rejected, owner = [], [], [], {}
    for name, _, lst in parts:
        to_new = {i: index.get(maps[name].get(c, "")) for i, c in enumerate(lst.classes)}
        dropped: Counter = Counter()
        for r in lst.records:
            if r.path in owner:
                ignored.append((r.path, f"also listed by source '{owner[r.path]}': one file is one input"))
                continue
            new = [to_new[i] for i in indices(r.label, lst.task)]
            if None in new:
                cls = lst.classes[indices(r.label, lst.task)[new.index(None)]]
                ignored.append((r.path, UNMAPPED.format(kind=kind, cls=cls, source=name)))
                dropped[cls] += 1
                continue
            owner[r.path] = name
            records.append(Record(r.path, bits(new) if multilabel else new[0], r.split, r.patient, name))
        ignored += lst.ignored
        rejected += lst.rejected
        if dropped:
            log.info("source %s: %d file(s) of unmapped %s(s) dropped: %s", name, sum(dropped.values()), kind,
                     dict(dropped))
    merged = Listing(records, classes, any(lst.has_test_split for _, _, lst in parts), ignored, task, rejected)
    log.info("merged %d sources into %d classes %s: %s", len(parts), len(classes), classes, counts_per_source(merged))
    return merged


def counts_per_source(listing: Listing) -> dict[str, dict[str, int]]:
    """Source name -> images per class (as `Listing.counts`); records without a source count under ""."""
    by_source: dict[str, list[Record]] = {}
    for r in listing.records:
        by_source.setdefault(r.source or "", []).append(r)
    return {s: replace(listing, records=recs).counts() for s, recs in sorted(by_source.items())}


def dropped_per_source(listing: Listing) -> dict[str, int]:
    """Source name -> files dropped because their class (finding) is not in the source's class_map."""
    out: Counter = Counter()
    for _, why in listing.ignored:
        m = _UNMAPPED.match(why)
        if m:
            out[m.group(1)] += 1
    return dict(sorted(out.items()))


@contextmanager
def keyed(name: str):
    """A source's own errors name its keys as `dataset.<key>`: inside a merged dataset they are
    `dataset.sources.<name>.<key>`, so the message names the key to fix."""
    try:
        yield
    except DatasetError as e:
        raise DatasetError(re.sub(r"(?<![\w.])dataset\.(?!sources\.)", f"dataset.sources.{name}.", str(e))) from None


def _entries(sources) -> list[tuple[str, dict]]:
    """(name, options) per source, from name -> options or a list of options with `name`; names checked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(sources, (DictConfig, ListConfig)):
        sources = OmegaConf.to_container(sources, resolve=True)
    if isinstance(sources, Mapping):
        entries = [(str(k), v) for k, v in sources.items()]
    elif isinstance(sources, (list, tuple)):
        entries = []
        for i, v in enumerate(sources):
            if not isinstance(v, Mapping) or not v.get("name"):
                raise DatasetError(f"dataset.sources[{i}] has no name: give each source a `name` (it keys the "
                                   f"per-source counts and metrics), or write dataset.sources as name: options")
            entries.append((str(v["name"]), {k: x for k, x in v.items() if k != "name"}))
    else:
        raise DatasetError("dataset.sources is not set: list the sources as name: {_target_: ..., root: ..., "
                           "class_map: {...}}")
    if not entries:
        raise DatasetError("dataset.sources is empty: list at least one source (name: {_target_: ..., ...})")
    seen = set()
    for name, options in entries:
        if not _NAME.match(name):
            raise DatasetError(f"dataset.sources: source name {name!r} must be letters, digits, _ or - (it is part of "
                               f"the per-source metric keys); rename it")
        if name in seen:
            raise DatasetError(f"dataset.sources: source name '{name}' is used twice; give each source its own name")
        seen.add(name)
        if not isinstance(options, Mapping):
            raise DatasetError(f"dataset.sources.{name} must be the source's options ({{_target_: ..., root: ...}}), "
                               f"got {options!r}")
    return [(name, dict(options)) for name, options in entries]


def _class_map(name: str, class_map) -> dict[str, str] | None:
    if class_map is None:
        return None
    if not isinstance(class_map, Mapping) or not class_map:
        raise DatasetError(f"dataset.sources.{name}.class_map must map the source's class names to the dataset's "
                           f"(e.g. {{glioma_tumor: glioma}}), got {class_map!r}")
    for k, v in class_map.items():
        if not isinstance(v, str) or not v:
            raise DatasetError(f"dataset.sources.{name}.class_map.{k}={v!r} must be one of the dataset's class "
                               f"names (text); to drop the class, leave it out of the map")
    return {str(k): v for k, v in class_map.items()}
