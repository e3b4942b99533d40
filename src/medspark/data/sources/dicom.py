"""DICOM files (dataset=dicom): a folder read recursively, labels from class folders or from a label CSV.

Labels: root/<class>/**/<files> (class_folders' layout and helpers), or `labels_csv` keyed by `key`: `file` (a
path relative to root, read by label_csv.LabelCsv) or a DICOM tag keyword (SOPInstanceUID: one file per row;
AccessionNumber, StudyInstanceUID, ...: every file of the study gets the row's label). The patient comes from the
`patient_tag` (PatientID) and is kept only as its pseudonym (data/phi.py); a tag used as the CSV key is compared on
the driver and never written: a CSV row whose key matches no file is rejected as "<csv>:row N" without its value.

Headers (never pixels) are read on the driver, `threads` at a time (data/dicom.read_tags); a file that is not
DICOM (from its first bytes) is rejected here with the reason, so the listing accounts for every file. Pixels are
decoded on the executors (data/preprocess.decode_frames): a multi-frame file gives the frames preprocess selects,
one row each.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..names import to_text
from ..phi import CsvRow, path_key, pseudonym, shown_rows
from ..preprocess import is_system_file
from . import DatasetError, Listing, Record, check_root, log_ignored, walk
from .class_folders import ClassFolders
from .label_csv import LabelCsv, _column, _existing

log = logging.getLogger(__name__)
HEAD = 4096  # bytes read to tell a DICOM file from anything else


class Dicom:
    """DICOM files under `root` (conf/dataset/dicom.yaml documents every key)."""
    has_test_split = False

    def __init__(self, root, classes: list[str] | None = None, labels_csv: str | None = None, key: str = "file",
                 key_column: str | None = None, label_column: str = "label", patient_tag: str | None = "PatientID",
                 threads: int = 8):
        self.root, self.classes, self.labels_csv = root, classes, labels_csv or None
        self.key, self.key_column = str(key or "file"), key_column or None
        self.label_column, self.patient_tag, self.threads = label_column, patient_tag or None, int(threads)
        if self.threads < 1:
            raise DatasetError(f"dataset.threads={threads} must be at least 1 (header reads in parallel)")
        if self.key != "file" and not self.key.isidentifier():
            raise DatasetError(f"dataset.key={key!r} must be `file` or a DICOM keyword such as SOPInstanceUID or "
                               f"AccessionNumber")

    def list(self) -> Listing:
        root = check_root(self.root)
        by_tag = self.labels_csv is not None and self.key != "file"
        if self.labels_csv is None:
            base = ClassFolders(root, self.classes).list()
        elif not by_tag:
            base = LabelCsv(root, self.labels_csv, self.key_column or "file", self.label_column).list()
        else:
            base = None
        if base is not None:
            files = [r.path for r in base.records]
        else:
            table = _existing(root, self.labels_csv, "dataset.labels_csv")
            ignored: list[tuple[str, str]] = []
            files = [f for f in walk(root, ignored) if f != str(table)]
        keywords = [k for k in (self.patient_tag, self.key if by_tag else None) if k]
        headers, refused = self._headers(files, keywords)
        if base is None:
            base = self._by_tag(root, table, files, headers, ignored)
        records = []
        for r in base.records:
            if r.path in refused:
                continue
            raw = headers.get(r.path, {}).get(self.patient_tag, "") if self.patient_tag else ""
            records.append(dataclasses.replace(r, patient=pseudonym(raw)) if str(raw).strip() else r)
        rejected = list(base.rejected) + sorted(refused.items())
        if refused:
            (path, why), = shown_rows([next(iter(refused.items()))], path_key())  # privacy.hash_paths
            log.warning("%d of %d file(s) are not readable DICOM, e.g. %s (%s); see data/rejected.csv", len(refused),
                        len(files), to_text(path), why)
        unknown = sum(r.patient is None for r in records)
        if self.patient_tag and unknown:
            log.warning("%d of %d DICOM file(s) have no %s (dataset.patient_tag): each is split as its own patient",
                        unknown, len(records), self.patient_tag)
        return Listing(records, base.classes, False, base.ignored, base.task, rejected)

    def _headers(self, files: list[str], keywords: list[str]):
        """path -> {keyword: value} for the DICOM files among `files`, and path -> reason for the others (judged from
        their first bytes: data/dicom.is_dicom, or a data set without preamble: is_bare_dataset)."""
        from ..dicom import is_bare_dataset, is_dicom, read_tags

        def one(path):
            if is_system_file(path):  # rejected later with the usual reason
                return path, {}, None
            try:
                with open(path, "rb") as f:
                    head = f.read(HEAD)
            except OSError as e:
                return path, None, f"unreadable: {e.strerror or type(e).__name__}"
            if not (is_dicom(head) or is_bare_dataset(head)):
                return path, None, "not a DICOM file (no 'DICM' marker after the preamble, nor a bare data set)"
            return path, read_tags(path, keywords), None

        headers, refused = {}, {}
        with ThreadPoolExecutor(self.threads) as pool:
            for path, tags, why in pool.map(one, files):
                if why:
                    refused[path] = why
                else:
                    headers[path] = tags
        return headers, refused

    def _by_tag(self, root: Path, table: Path, files: list[str], headers: dict, ignored) -> Listing:
        """Labels from a CSV whose `key_column` holds a tag's values: each row labels every file with that value.
        Key values are compared here and never kept: a rejected row names its row number, not its key."""
        key_values: dict[str, list[str]] = {}
        for path in files:
            value = str(headers.get(path, {}).get(self.key, "")).strip()
            if value:
                key_values.setdefault(value, []).append(path)
        labels: dict[str, str] = {}
        rejected: list[tuple[str, str]] = []
        with open(table, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            cols = [h.strip() for h in next(reader, [])]
            if not cols:
                raise DatasetError(f"dataset.labels_csv={to_text(str(table))} is empty; it needs a header row")
            k = _column(cols, self.key_column or self.key, "key_column", table)
            lab = _column(cols, self.label_column, "label_column", table)
            for number, row in enumerate(reader, start=2):
                if not row or not any(c.strip() for c in row):
                    continue
                where = CsvRow.of(table.name, number)
                value = row[k].strip() if len(row) > k else ""
                label = row[lab].strip() if len(row) > lab else ""
                if not value or not label:
                    rejected.append((where, f"no {self.key} or no label (truncated or empty cells)"))
                elif value not in key_values:
                    rejected.append((where, f"no DICOM file under dataset.root has this {self.key}"))
                elif labels.get(value, label) != label:
                    rejected.append((where, f"this {self.key} is listed again with another label"))
                else:
                    labels[value] = label
        classes = sorted(set(labels.values()))
        if self.classes:
            rejected += [(f"{table.name}", f"label {c!r} not in dataset.classes") for c in classes
                         if c not in self.classes]
            classes = list(self.classes)
        if len(classes) < 2:
            raise DatasetError(f"{table.name} gives {len(classes)} class(es) {classes} for the files under "
                               f"dataset.root; check dataset.labels_csv, dataset.key={self.key} and "
                               f"dataset.label_column")
        index = {c: i for i, c in enumerate(classes)}
        records = []
        for path in files:
            value = str(headers.get(path, {}).get(self.key, "")).strip()
            if value in labels and labels[value] in index:
                records.append(Record(path, index[labels[value]], None))
            elif path in headers or is_system_file(path):
                ignored.append((path, f"its {self.key} is in no row of {table.name} (dataset.labels_csv)"))
            else:
                records.append(Record(path, 0, None))  # not DICOM: refused by the header read, accounted there
        log_ignored(ignored, root)
        return Listing(records, classes, False, ignored, "", rejected)
