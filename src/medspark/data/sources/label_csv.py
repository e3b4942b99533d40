"""Labels from a CSV (chest_xray14: NIH ChestX-ray14's Data_Entry_2017.csv; any `image,label[,patient]` table).

The CSV names each image (resolved against one or several image folders under the root) and its label: one class,
or several findings joined by a separator with a negative value for none ("No Finding"). An optional patient column
becomes a pseudonym (data/phi.py) at once, and optional split lists bring the dataset's own test split. Nothing else
of the CSV (ages, genders, view positions, the raw patient id) reaches the listing.

Accounting: a CSV row is a record, or `Listing.rejected` as ("<csv name>:row N", "<image>: why") (row 1 is the
header, as a spreadsheet numbers rows): its image is missing or in two image folders, its label is empty or unknown,
its image is listed again (a copy with the same labels is dropped, copies that disagree are all rejected), it is in
neither split list. A file under the root that no row names is `Listing.ignored` with the reason; the CSV and the
split lists themselves are read, not listed. The CSV is streamed: NIH's 112k rows and files list in 1.5-5 s.
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from ..names import to_text
from ..phi import CsvRow, path_key, pseudonym, shown_path
from ..targets import bits, task_of
from . import DatasetError, Listing, Record, check_root, log_ignored, walk

log = logging.getLogger(__name__)


class _Row(NamedTuple):
    """A usable CSV row: its number, image key (the name relative to an image folder), file, labels, split, patient."""
    number: int
    key: str
    path: str
    labels: frozenset[str]
    split: str | None
    patient: str | None


class LabelCsv:
    """A label CSV under `root` (conf/dataset/chest_xray14.yaml documents every key; paths are relative to root).

    csv: the file, or a list of names of which the first that exists is read (a dataset published in versions).
    image_dirs: folders or glob patterns (`images_*/images`) holding the images; null = root itself.
    separator: joins several findings in one cell (task multilabel); null = one class per row.
    negative: the multi-label value meaning no finding ("No Finding"). findings: the classes (null = every label
    seen but the negative, sorted). patient_column: null = patients unknown. split_lists: {test: file, train: file}
    of image names; with a train list, an image in neither list is rejected. task: null = multilabel when a
    separator is set, else from the class count.
    """

    def __init__(self, root, csv: str | list[str], image_column: str, label_column: str,
                 image_dirs: str | list[str] | None = None, separator: str | None = None, negative: str | None = None,
                 findings: list[str] | None = None, patient_column: str | None = None,
                 split_lists: dict | None = None, task: str | None = None):
        self.root, self.csv = root, csv
        self.image_column, self.label_column, self.patient_column = image_column, label_column, patient_column
        self.image_dirs = [image_dirs] if isinstance(image_dirs, str) else list(image_dirs or ["."])
        self.separator, self.negative = separator or None, negative or None
        self.findings = [str(f).strip() for f in findings] if findings else None
        if self.findings and (len(set(self.findings)) != len(self.findings) or self.negative in self.findings):
            raise DatasetError(f"dataset.findings={self.findings} must name each class once, without the negative "
                               f"value {self.negative!r}")
        self.split_lists = {k: v for k, v in dict(split_lists or {}).items() if v}
        unknown = sorted(set(self.split_lists) - {"train", "test"})
        if unknown:
            raise DatasetError(f"dataset.split_lists.{unknown[0]} is not a split list; use train and/or test")
        self.task = task or ("multilabel" if self.separator else "")
        if self.separator and self.task != "multilabel":
            raise DatasetError(f"dataset.separator={self.separator!r} means several findings per row, so "
                               f"dataset.task must be multilabel (or null), not {self.task!r}")
        if self.negative and self.task != "multilabel":
            raise DatasetError(f"dataset.negative={self.negative!r} is the multi-label 'no finding' value; for one "
                               f"class per row set dataset.negative=null (the value is then a class like any other)")

    @property
    def has_test_split(self) -> bool:
        return "test" in self.split_lists

    # ------------------------------------------------------------------------------------------------ listing

    def list(self) -> Listing:
        root = check_root(self.root)
        table = _existing(root, self.csv, "dataset.csv")
        lists = {s: _existing(root, f, f"dataset.split_lists.{s}") for s, f in self.split_lists.items()}
        dirs = self._image_folders(root)
        ignored: list[tuple[str, str]] = []
        images, elsewhere = _index(root, dirs, {str(table), *map(str, lists.values())}, ignored)
        named = {s: _names(p) for s, p in lists.items()}

        rows, rejected, referenced = self._read(table, images, named)
        rows, rejected = _drop_duplicates(rows, rejected, table.name)
        classes = self._classes(rows, table.name)
        index = {c: i for i, c in enumerate(classes)}
        multilabel = self.task == "multilabel"
        label = {ls: bits(index[f] for f in ls) if multilabel else index[next(iter(ls))]
                 for ls in {r.labels for r in rows}}  # once per distinct label set
        records = [Record(r.path, label[r.labels], r.split, r.patient) for r in rows]

        why = f"not in {table.name} (dataset.csv)"
        ignored += [(path, why) for key, paths in images.items() if key not in referenced for path in paths]
        ignored += [(path, "outside dataset.image_dirs") for path in elsewhere]
        tested = {r.patient for r in rows if r.split == "test"} - {None}
        straddle = len(tested & {r.patient for r in rows if r.split != "test"})
        if straddle:  # a leak in the lists themselves: reported here; the splits stage decides where they go
            log.warning("%d patient(s) have images in both the test split list and the training images of %s",
                        straddle, table.name)
        for split, names in named.items():
            stray = len(names - referenced)
            if stray:
                log.warning("%d image name(s) in %s (dataset.split_lists.%s) are not in %s", stray,
                            lists[split].name, split, table.name)
        kinds = Counter(why.split(": ", 1)[-1].split(" (")[0] for _, why in rejected)  # reasons, no names
        log.info("%s: %d image(s) listed, %d row(s) rejected %s", table.name, len(records), len(rejected),
                 dict(kinds.most_common()))
        log_ignored(ignored, root)
        return Listing(records, classes, "test" in lists, ignored, self.task, rejected)

    def _image_folders(self, root: Path) -> list[str]:
        """The image folders the patterns match (absolute, sorted, each once), all under root, none inside another."""
        found = []
        for pattern in self.image_dirs:
            pattern = str(pattern).strip()
            if pattern in ("", ".", "./"):
                found.append(str(root))
                continue
            try:
                matches = sorted(str(p) for p in root.glob(pattern) if p.is_dir())
            except (NotImplementedError, ValueError) as e:
                raise DatasetError(f"dataset.image_dirs: {pattern!r} is not a pattern relative to dataset.root "
                                   f"({e})") from None
            for m in matches:
                m = os.path.abspath(m)
                if not (m + os.sep).startswith(str(root) + os.sep):
                    raise DatasetError(f"dataset.image_dirs: {pattern!r} matches {m}, outside dataset.root={root}")
                found.append(m)
        found = sorted(set(found))
        if not found:
            present = sorted(p.name for p in root.iterdir() if p.is_dir())[:12]
            raise DatasetError(f"dataset.image_dirs={self.image_dirs} matches no folder under {root}; folders there: "
                               f"{present}")
        for a in found:
            for b in found:
                if b.startswith(a + os.sep):
                    raise DatasetError(f"dataset.image_dirs: {b} is inside {a}, another image folder; list one of "
                                       f"them")
        return found

    def _read(self, table: Path, images: dict[str, list[str]], named: dict[str, set[str]]):
        """Stream the CSV: (row, key, path, labels, split, patient) per usable row, the rows rejected so far, and
        every image key a row names (usable or not: such an image is accounted for by its row)."""
        rows, rejected, referenced = [], [], set()
        pseudonyms: dict[str, str] = {}
        # surrogateescape: a name that is not UTF-8 still matches the file os.walk listed under that name
        with open(table, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise DatasetError(f"dataset.csv={to_text(str(table))} is empty; it needs a header row naming the "
                                   f"columns")
            cols = [h.strip() for h in header]
            at = {key: _column(cols, want, key, table) for key, want in
                  (("image_column", self.image_column), ("label_column", self.label_column),
                   ("patient_column", self.patient_column)) if want}
            need = max(at.values()) + 1
            number, last_error = 1, None  # rows as a spreadsheet numbers them: the header is row 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # a malformed row is rejected, the rest is read (one bad row, not the job)
                    if reader.line_num == last_error:
                        break
                    last_error = reader.line_num
                    number += 1
                    rejected.append((CsvRow.of(table.name, number), f"unreadable CSV row ({e})"))
                    continue
                number += 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line is not a row
                where = CsvRow.of(table.name, number)
                key = row[at["image_column"]].strip() if len(row) > at["image_column"] else ""
                if key:
                    key = os.path.normpath(key) if os.sep in key else key  # ./a.png, a//b.png
                    referenced.add(key)
                if len(row) < need:
                    rejected.append((where, f"{_shown(key) + ': ' if key else ''}{len(row)} field(s), the header "
                                            f"has {len(cols)} (truncated row)"))
                    continue
                if not key:
                    rejected.append((where, f"no image name (column {self.image_column!r} is empty)"))
                    continue
                labels = self._labels(row[at["label_column"]])
                why = labels if isinstance(labels, str) else _where(key, images, named)
                if why:
                    rejected.append((where, f"{_shown(key)}: {why}"))
                    continue
                split = "test" if key in named.get("test", ()) else None
                patient = None
                if "patient_column" in at:
                    raw = row[at["patient_column"]].strip()
                    if raw:
                        patient = pseudonyms.get(raw) or pseudonyms.setdefault(raw, pseudonym(raw))
                rows.append(_Row(number, key, images[key][0], labels, split, patient))
        return rows, rejected, referenced

    def _labels(self, text: str) -> frozenset[str] | str:
        """The label names of a cell (frozenset; empty for the negative value), or why the cell is refused."""
        parts = [p.strip() for p in text.split(self.separator)] if self.separator else [text.strip()]
        if parts == [""]:
            return f"no label (column {self.label_column!r} is empty)"
        if "" in parts:
            return f"empty label name in {text.strip()!r}"
        names = frozenset(parts)
        if self.negative and self.negative in names:
            if len(names) > 1:
                return f"{self.negative!r} together with findings in {text.strip()!r}"
            return frozenset()
        unknown = sorted(names - set(self.findings)) if self.findings else []
        if unknown:
            return f"unknown label {', '.join(map(repr, unknown))} (not in dataset.findings)"
        for n in names:
            try:
                n.encode("utf-8")
            except UnicodeEncodeError:
                return f"label {to_text(n)!r} is not UTF-8 text"
        return names

    def _classes(self, rows, csv_name: str) -> list[str]:
        if self.findings:
            classes = list(self.findings)
        else:
            classes = sorted({name for row in rows for name in row.labels})
        if len(classes) < (1 if self.task == "multilabel" else 2) or (self.task == "binary" and len(classes) != 2):
            raise DatasetError(f"{csv_name} gives {len(classes)} usable class(es) {classes}: check dataset.csv, "
                               f"dataset.label_column={self.label_column!r} and dataset.findings (see the listing's "
                               f"rejected rows)")
        try:
            task_of(self.task, classes)
        except ValueError as e:
            raise DatasetError(f"dataset.task / dataset.findings: {e}") from None
        return classes


def _existing(root: Path, names: str | list[str], key: str) -> Path:
    """The file a key names (relative to root or absolute; of a list, the first that exists)."""
    options = [names] if isinstance(names, (str, os.PathLike)) else list(names or [])
    if not options:
        raise DatasetError(f"{key} is not set: name the file, relative to dataset.root")
    for name in options:
        path = Path(os.path.expanduser(str(name)))
        path = path if path.is_absolute() else root / path
        if path.is_file():
            return path
    present = sorted(p.name for p in root.iterdir() if p.is_file())[:12]
    raise DatasetError(f"{key}={options if len(options) > 1 else options[0]} not found in {root} (files there: "
                       f"{present}); set {key} to the file's name")


def _column(cols: list[str], want: str, key: str, table: Path) -> int:
    if want.strip() not in cols:
        raise DatasetError(f"dataset.{key}={want!r} is not a column of {to_text(str(table))}; its columns: "
                           f"{', '.join(map(repr, cols))}")
    return cols.index(want.strip())


def _names(path: Path) -> set[str]:
    """The image names of a split list: one a line."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        return {os.path.normpath(line.strip()) for line in fh if line.strip()}


def _index(root: Path, dirs: list[str], metadata: set[str], ignored: list[tuple[str, str]]):
    """One walk of root: image key (path relative to its image folder) -> the files with that key (one per image
    folder holding it), and the other files under root but the CSV and split lists (`metadata`)."""
    images: dict[str, list[str]] = defaultdict(list)
    elsewhere = []
    prefixes, direct = [d + os.sep for d in dirs], set(dirs)
    for path in walk(root, ignored):
        if path in metadata:
            continue
        folder, _, name = path.rpartition(os.sep)
        if folder in direct:  # nearly all: a file right inside an image folder
            images[name].append(path)
            continue
        for d in prefixes:
            if path.startswith(d):
                images[path[len(d):]].append(path)
                break
        else:
            elsewhere.append(path)
    return images, elsewhere


def _where(key: str, images: dict[str, list[str]], named: dict[str, set[str]]) -> str | None:
    """Why a row's image cannot be used, or None: not found, found twice, not in the split lists."""
    paths = images.get(key)
    if not paths:
        return "image not found in dataset.image_dirs"
    if len(paths) > 1:
        return f"found in two image folders ({', '.join(_shown(os.path.dirname(p)) for p in paths)})"
    if "test" in named and "train" in named and key in named["test"] and key in named["train"]:
        return "in both split lists (dataset.split_lists)"
    if "train" in named and key not in named["train"] and key not in named.get("test", ()):
        return "in neither split list (dataset.split_lists)"
    return None


def _drop_duplicates(rows: list[_Row], rejected: list[tuple[str, str]], csv_name: str):
    """An image listed in several rows: the first row is kept when they agree (labels and patient), the others
    are rejected as copies; when they disagree every one is rejected."""
    seen, again = set(), set()
    for row in rows:
        (again if row.key in seen else seen).add(row.key)
    if not again:
        return rows, rejected
    by_key = defaultdict(list)
    for row in rows:
        if row.key in again:
            by_key[row.key].append(row)
    keep = []
    for row in rows:
        copies = by_key.get(row.key)
        if not copies:
            keep.append(row)
            continue
        first = copies[0]
        where = CsvRow.of(csv_name, row.number)
        if len({(c.labels, c.patient) for c in copies}) > 1:
            what = "labels" if len({c.labels for c in copies}) > 1 else "patients"
            rejected.append((where, f"{_shown(row.key)}: listed with different {what} in rows "
                                    f"{', '.join(str(c.number) for c in copies)}"))
        elif row is first:
            keep.append(row)
        else:
            rejected.append((where, f"{_shown(row.key)}: duplicate of row {first.number} (same labels)"))
    return keep, rejected


def _shown(name: str) -> str:
    """An image name or folder as a rejection reason gives it: itself, or its pseudonym (privacy.hash_paths)."""
    return to_text(shown_path(name, path_key()))
