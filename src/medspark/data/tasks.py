"""What materialize's Spark tasks run: hash a partition of files; decode one chunk and write it as Parquet.

A file gives one row per image it holds (preprocess.decode_frames: one for a 2D image, the chosen frames of a
multi-frame DICOM file or slices of a NIfTI volume), each with the file's path, hash, label, split and patient.

Kept import-light (hashlib, numpy, PIL, pyarrow; no Petastorm, no pyspark.sql): every Python worker imports
this module before its first task, and on a 2-core machine half a second of imports per worker is visible.
The sequential baseline in benchmarks/preprocess.py runs these same functions in a plain loop.
"""
from __future__ import annotations

import io
import os

import numpy as np

from .names import to_text
from .phi import shown_path
from .preprocess import PreprocessConfig, Rejected, content_hash, decode_frames, read_bytes
from .schema import arrow_schema
from .targets import target_rows


def encode_ndarray(image: np.ndarray) -> bytes:
    """Petastorm's NdarrayCodec encoding (the .npy format), without importing Petastorm in the worker."""
    buf = io.BytesIO()
    np.save(buf, image)
    return buf.getvalue()


def hash_partition(records, max_file_mb: float = PreprocessConfig.max_file_mb):
    for path, label, split in records:
        try:
            yield path, label, split, content_hash(read_bytes(path, max_file_mb)), None
        except Rejected as e:
            yield path, label, split, None, str(e)
        except Exception as e:  # never let one file kill the job
            yield path, label, split, None, f"unexpected {type(e).__name__}: {e}"


def row_group_rows(shape, row_group_size_mb: int) -> int:
    """Rows per Parquet row group for ~row_group_size_mb MB groups (Petastorm shuffles and shards by row group)."""
    return max(16, int(row_group_size_mb * 2 ** 20 // (int(np.prod(shape)) + 256)))


def _rename(fs, src: str, dst: str) -> None:
    """Atomic rename on the dataset's filesystem (pyarrow's legacy local filesystem does not implement mv)."""
    try:
        fs.mv(src, dst)
    except NotImplementedError:
        os.replace(src, dst)


class _SplitFile:
    """One split's Parquet file of one task: written under a hidden temporary name (readers skip names that
    start with '.'), renamed to its final, deterministic name once complete."""

    def __init__(self, fs, url: str, split: str, index: int, group_rows: int, task: str, num_classes: int):
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.fs, self.split, self.group_rows = pa, fs, split, group_rows
        self.task, self.num_classes = task, num_classes
        self.schema = arrow_schema()  # data/schema.py: the columns' one definition
        self.name = f"part-{index:05d}.parquet"
        self.final = f"{url}/{split}/{self.name}"
        self.tmp = f"{url}/{split}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        self.stream = fs.open(self.tmp, "wb")
        self.writer = pq.ParquetWriter(self.stream, self.schema, compression="none")  # pixels barely compress
        self.buffer, self.groups = [], 0

    def add(self, image_bytes: bytes, label: int, path: str, frame: int, sha: str, patient: str | None,
            source: str | None):
        self.buffer.append((image_bytes, label, to_text(path), frame, sha, patient or "", source or ""))  # any name
        if len(self.buffer) >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            image, label, path, frame, sha, patient, source = zip(*self.buffer)
            targets = [encode_ndarray(t) for t in target_rows(label, self.task, self.num_classes)]
            cols = [image, label, targets, path, frame, sha, [self.split] * len(self.buffer), patient,
                    source]  # COLUMNS' order
            self.writer.write_table(self.pa.Table.from_arrays(
                [self.pa.array(c, f.type) for c, f in zip(cols, self.schema)], schema=self.schema))
            self.groups += 1
            self.buffer = []

    def close(self, keep: bool) -> None:
        try:
            if keep:
                self.flush()
        finally:
            self.writer.close()
            self.stream.close()
        if keep:
            _rename(self.fs, self.tmp, self.final)
        else:
            self.fs.rm(self.tmp)


def write_chunk(chunk, pre: PreprocessConfig, url: str, fs_factory, group_rows: int, task: str,
                num_classes: int, path_key: bytes | None = None) -> dict:
    """One task: decode a chunk of files and write each split's rows as one Parquet file of that split.

    A task that dies (a lost executor, a kill) leaves no partial file behind (temporary names), and a retried
    or speculative attempt of the same chunk replaces the same files instead of duplicating their rows.
    Pixels go from the image file to Parquet inside this Python worker; the driver gets counts back:
    {"counts": {(split, label, source): rows}, "accepted": files, "volumes": files that gave several rows,
    "rejected": [(path, reason)], "files": {split: {file: row groups}}}.
    chunk: (index, rows), a row (path, label, split, sha1, patient, source); task and num_classes say how a label
    becomes its `targets` vector (data/targets.py). path_key: privacy.hash_paths' key (data/phi.shown_path): the
    `path` column holds the file's pseudonym; None: its path. Rejected paths come back as they are (the driver
    hides them).
    """
    index, rows = chunk
    fs = fs_factory()
    files: dict[str, _SplitFile] = {}
    counts, rejected, accepted, volumes, ok = {}, [], 0, 0, False
    try:
        for path, label, split, sha, patient, source in rows:
            try:
                frames = decode_frames(read_bytes(path, pre.max_file_mb), pre)
            except Rejected as e:
                rejected.append((path, str(e)))
                continue
            except Exception as e:  # never let one file kill the job
                rejected.append((path, f"unexpected {type(e).__name__}: {e}"))
                continue
            if not frames:
                rejected.append((path, "no image: no frame or slice passed the selection (preprocess settings)"))
                continue
            if split not in files:
                files[split] = _SplitFile(fs, url, split, index, group_rows, task, num_classes)
            for frame, image in frames:
                files[split].add(encode_ndarray(image), label, shown_path(path, path_key), int(frame), sha, patient,
                                  source)
            counts[(split, label, source)] = counts.get((split, label, source), 0) + len(frames)
            accepted += 1
            volumes += len(frames) > 1
        ok = True
    finally:
        for f in files.values():
            f.close(keep=ok)
    return {"counts": counts, "accepted": accepted, "volumes": volumes, "rejected": rejected,
            "files": {s: {f.name: f.groups} for s, f in files.items()}}
