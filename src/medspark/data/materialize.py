"""Spark ETL: listed files -> preprocessed uint8 tensors -> Petastorm Parquet, one dataset per split.

The driver holds paths, labels and content hashes; pixels exist only on executors and in the Parquet files.
The output lives at `<data_url>/<dataset>/<fingerprint>`: the fingerprint covers the listing (path, size,
mtime, label) and every setting that changes a pixel or a split, so a second run with the same inputs
reuses the data, and anything else gets its own folder. A manifest written last marks a finished write;
a folder without it is a write that died and is rebuilt, never read.

Two Spark jobs. (1) Hash every file on the executors: content identities, from which the driver draws the
deduplicated, stratified splits (paths and hashes only). (2) Each task takes a chunk of one split, decodes and
resizes its images and writes them as one Parquet file with pyarrow, so pixels go from image file to Parquet
inside one Python worker: no round trip through the JVM, no cache, no shuffle (this is what makes Spark reach
the sequential loop's per-core rate: benchmarks/preprocess.py). Petastorm's metadata is then written from the
row-group counts the tasks report.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from . import splits as splitting
from .names import from_text, to_text
from .phi import shown_path, shown_rows
from .preprocess import PreprocessConfig
from . import targets
from .schema import image_schema
from .sources import Listing
from .tasks import hash_partition, row_group_rows, write_chunk  # what the Spark tasks run

log = logging.getLogger(__name__)
FORMAT_VERSION = 4  # bump when the on-disk layout or schema changes: old folders then stop matching
# v2: rows are written in a seeded random order (v1 kept the listing order: class-sorted row groups).
# v3: `targets` (one-hot / multi-hot), `patient` and `source` columns; the label of a multilabel row is a bitmask.
# v4: one row per frame or slice (DICOM multi-frame, NIfTI volumes) with its `frame` index; the preprocess settings
#     of those formats are part of PreprocessConfig, so of the fingerprint.
MANIFEST = "_MEDSPARK_DATASET.json"
REJECTED = "rejected.csv"


@dataclass
class Materialized:
    url: str
    fingerprint: str
    classes: list[str]  # class names, or the finding names of a multilabel set
    shape: tuple[int, int, int]
    sizes: dict[str, int]  # rows (images: a 2D file, a frame, a slice) per split
    per_class: dict[str, dict[str, int]]  # split -> class -> rows (multilabel: rows positive for the finding)
    listed: int  # files
    accepted: int  # files (listed = accepted + rejected); their rows are `sizes`
    rejected: list[tuple[str, str]]  # (path, reason)
    duplicate_groups: int
    duplicate_files: int
    label_conflicts: int
    moved_to_test: int
    seconds: dict[str, float]  # hash, preprocess, write
    reused: bool = False
    notes: list[str] = field(default_factory=list)
    task: str = "multiclass"  # binary | multiclass | multilabel (data/targets.py)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> source -> images (merged sets)
    split_stats: dict[str, float] = field(default_factory=dict)  # patients per split, prevalence gap, ... (splits)
    volumes: int = 0  # accepted files that gave several rows (multi-frame DICOM, NIfTI volumes): evaluate_volumes.py

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def split_url(self, split: str) -> str:
        return f"{self.url}/{split}"

    def summary(self) -> dict:
        """Flat numbers for MLflow."""
        out = {"data_listed": self.listed, "data_accepted": self.accepted, "data_rejected": len(self.rejected),
               "data_duplicate_groups": self.duplicate_groups, "data_duplicate_files": self.duplicate_files,
               "data_label_conflicts": self.label_conflicts, "data_moved_to_test": self.moved_to_test,
               "data_reused": int(self.reused), "data_volumes": self.volumes}
        out.update({f"data_n_{s}": n for s, n in self.sizes.items()})
        out.update({f"data_{k}": v for k, v in self.split_stats.items()})
        return out


# ---------------------------------------------------------------- filesystem (any Hadoop URL: file, hdfs, s3a)

class HadoopFS:
    """Tiny wrapper over the JVM's Hadoop FileSystem, so `hdfs://` and `s3a://` data URLs work like `file://`."""

    def __init__(self, spark):
        self._jvm, self._conf = spark._jvm, spark._jsc.hadoopConfiguration()

    def _fs(self, url):
        p = self._jvm.org.apache.hadoop.fs.Path(url)
        return p.getFileSystem(self._conf), p

    def exists(self, url) -> bool:
        fs, p = self._fs(url)
        return fs.exists(p)

    def mkdirs(self, url) -> None:
        fs, p = self._fs(url)
        fs.mkdirs(p)

    def delete(self, url) -> None:
        fs, p = self._fs(url)
        fs.delete(p, True)

    def write_bytes(self, url, data: bytes) -> None:
        fs, p = self._fs(url)
        out = fs.create(p, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def read_bytes(self, url) -> bytes:
        fs, p = self._fs(url)
        stream = fs.open(p)
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()


def normalize_url(url: str) -> str:
    """Plain paths become file:// URLs (Petastorm and Spark both want a scheme)."""
    return url if "://" in url else "file://" + os.path.abspath(os.path.expanduser(url))


def fingerprint(listing: Listing, pre: PreprocessConfig, split_cfg: dict, path_key: bytes | None = None) -> str:
    """Changes whenever an input file, a label, a preprocessing or a split setting changes, or how paths are written
    (privacy.hash_paths and its key, through a pseudonym of a constant: never the key)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "pre": asdict(pre), "split": split_cfg, "classes": listing.classes,
                        "task": listing.task, "refused": len(listing.rejected),
                        "paths": None if path_key is None else shown_path("fingerprint", path_key)},
                       sort_keys=True).encode())
    for r in listing.records:
        try:
            st = os.stat(r.path)
            stat = (st.st_size, st.st_mtime_ns)
        except OSError as e:  # unreadable entries still count: they are part of what was listed
            stat = (e.errno, 0)
        h.update(os.fsencode(r.path) + f"\0{r.label}\0{r.split}\0{stat}\0{r.patient}\0{r.source}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- driver

def _task_count(n: int, parallelism: int, max_rows: int) -> int:
    """As few tasks as keep every core busy: a multiple of the cores (each gets the same share), at most
    max_rows items each. Every PySpark task costs ~0.1 s of fixed overhead (measured: 8 empty tasks take
    0.8 s on local[1]), the time to decode about 200 images, so many small tasks are slower, not faster."""
    tasks = max(parallelism, math.ceil(n / max_rows))
    return max(1, min(n, math.ceil(tasks / parallelism) * parallelism))


def materialize(spark, listing: Listing, pre: PreprocessConfig, split_cfg: dict, data_url: str, name: str,
                row_group_size_mb: int = 8, rebuild: bool = False, path_key: bytes | None = None) -> Materialized:
    """Build (or reuse) the Petastorm splits of a listed dataset. split_cfg: {val, test, seed, label_conflicts}.
    path_key: privacy.hash_paths' key (data/phi.py): every path written (the `path` column, rejected.csv) is the
    file's pseudonym; None keeps the paths.
    Materialized.seconds: fingerprint and split (driver), hash, preprocess (decode + resize + Parquet write,
    on the executors) and write (Petastorm metadata)."""
    splitting.check_label_conflicts(split_cfg.get("label_conflicts", "reject"))
    t = time.perf_counter()
    fp = fingerprint(listing, pre, dict(split_cfg), path_key)
    seconds = {"fingerprint": time.perf_counter() - t}
    url = f"{normalize_url(data_url).rstrip('/')}/{name}/{fp}"
    fs = HadoopFS(spark)
    if fs.exists(f"{url}/{MANIFEST}") and not rebuild:
        m = _load(fs, url)
        log.info("reusing materialized dataset %s (fingerprint %s): %s", url, fp, m.sizes)
        return m
    if fs.exists(url):
        log.warning("%s exists without a manifest (an interrupted or forced rebuild): deleting and rebuilding", url)
        fs.delete(url)
    sc = spark.sparkContext
    records = [(r.path, r.label, r.split) for r in listing.records]
    n = len(records) + len(listing.rejected)  # listed: the source's own refusals count as listed and rejected

    t = time.perf_counter()
    sc.setJobDescription(f"medspark: hash {len(records)} files")
    hashed = (sc.parallelize(records, _task_count(len(records), sc.defaultParallelism, 25_000))
              .mapPartitions(lambda it: hash_partition(it, pre.max_file_mb)).collect())
    seconds["hash"] = time.perf_counter() - t
    t = time.perf_counter()
    rejected, report, todo = plan_splits(hashed, listing, split_cfg)
    rejected += listing.rejected
    seconds["split"] = time.perf_counter() - t

    t = time.perf_counter()
    chunks = _chunks(todo, sc.defaultParallelism)
    from petastorm.fs_utils import FilesystemResolver

    resolver = FilesystemResolver(url, sc._jsc.hadoopConfiguration(), user=sc.sparkUser())
    fs_factory, base = resolver.filesystem_factory(), resolver.get_dataset_path()
    for split in sorted({row[2] for row in todo}):
        fs.mkdirs(f"{url}/{split}")
    group_rows = row_group_rows(pre.shape, row_group_size_mb)
    sc.setJobDescription(f"medspark: decode + resize {len(todo)} images to {pre.shape} and write Parquet")
    task, k = listing.task, len(listing.classes)
    results = (sc.parallelize(chunks, len(chunks))
               .mapPartitions(lambda it: [write_chunk(c, pre, base, fs_factory, group_rows, task, k, path_key)
                                          for c in it])
               .collect())
    seconds["preprocess"] = time.perf_counter() - t  # decode, encode and Parquet write, fused in each task

    t = time.perf_counter()
    sizes, per_class, per_source, bad = finish(results, listing.classes, listing.task, pre.shape, fs_factory, base)
    rejected += bad
    accepted, volumes = sum(r["accepted"] for r in results), sum(r["volumes"] for r in results)
    sc.setJobDescription(None)
    seconds["write"] = time.perf_counter() - t  # Petastorm metadata (the Parquet itself is written above)

    m = Materialized(url, fp, listing.classes, pre.shape, sizes, per_class, n, accepted,
                     sorted(shown_rows(rejected, path_key)), report.duplicate_groups, report.duplicate_files,
                     report.label_conflicts, report.moved_to_test, seconds, task=listing.task, per_source=per_source,
                     split_stats=report.summary(), volumes=volumes)
    if m.listed != m.accepted + len(m.rejected):  # the accounting promise: every listed file is somewhere
        raise RuntimeError(f"accounting error: listed {m.listed} != accepted {m.accepted} + rejected {len(m.rejected)}")
    _save(fs, m)
    log.info("materialized %s: %d files accepted (%s rows; %d files of several frames or slices), %d rejected, "
             "%d duplicate contents, %s", url, m.accepted, m.sizes, m.volumes, len(m.rejected), m.duplicate_groups,
             {k: round(v, 1) for k, v in seconds.items()})
    return m


def plan_splits(hashed, listing: Listing, split_cfg: dict):
    """From the hash pass's (path, label, split, sha1 or None, reason) rows: the files rejected so far, the
    split report, and the rows to decode, (path, label, split, sha1, patient, source), in a seeded random order."""
    rejected = [(p, why) for p, _, _, sha, why in hashed if sha is None]
    who = {r.path: (r.patient, r.source) for r in listing.records}
    ok = [splitting.Item(p, label, sha, split, *who[p]) for p, label, split, sha, _ in hashed if sha is not None]
    policy = split_cfg.get("label_conflicts", "reject")
    report = splitting.assign(ok, listing.classes, split_cfg["val"], split_cfg["test"], split_cfg["seed"],
                              listing.has_test_split, policy, task=listing.task)
    log.info("split: %s files, %s patients, images per patient %s, largest prevalence difference %.3f",
             report.sizes, report.patients, report.images_per_patient, report.max_prevalence_diff)
    if report.label_conflicts:
        log.warning("%d content(s) are filed under more than one class: %s (split.label_conflicts=%s)",
                    report.label_conflicts, "their files are rejected, see rejected.csv" if policy == "reject"
                    else "each copy is trained with its own label", policy)
    rejected += report.rejected
    todo = [(it.path, it.label, report.assignment[it.path], it.sha1, it.patient, it.source) for it in ok
            if it.path in report.assignment]
    # Listings come sorted by class, and Petastorm shuffles whole row groups plus a bounded buffer: written in
    # listing order, a row group (~500 images) holds one class and batches see one or two classes at a time,
    # which wrecks BatchNorm statistics and SGD. A seeded permutation makes every row group a class mix.
    todo = [todo[i] for i in np.random.default_rng(split_cfg["seed"]).permutation(len(todo))]
    return rejected, report, todo


def finish(results, classes: list[str], task: str, shape, fs_factory, base: str):
    """Tally what the write_chunk tasks reported and write each split's Petastorm metadata. Returns (sizes per
    split, per-class counts per split, per-source counts per split, files rejected while decoding)."""
    sizes = dict.fromkeys(splitting.SPLITS, 0)
    per_class = {s: dict.fromkeys(classes, 0) for s in splitting.SPLITS}
    per_source: dict[str, dict[str, int]] = {}
    files: dict[str, dict[str, int]] = {}
    rejected = []
    for r in results:
        for (split, label, source), c in r["counts"].items():
            sizes[split] += c
            for i in targets.indices(label, task):
                per_class[split][classes[i]] += c
            if source:
                per_source.setdefault(split, {}).setdefault(source, 0)
                per_source[split][source] += c
        rejected += r["rejected"]
        for split, written in r["files"].items():
            files.setdefault(split, {}).update(written)
    schema = image_schema(shape, len(classes))
    for split, row_groups in files.items():
        if row_groups:
            _petastorm_metadata(fs_factory(), f"{base}/{split}", schema, row_groups)
    return sizes, per_class, per_source, rejected


def _chunks(todo, parallelism: int, max_rows: int = 5000):
    """(index, rows) work units, one task each (see _task_count; max_rows bounds a retry's cost on a lost
    executor). A chunk holds rows of every split, in the permuted order; its task writes one file per split."""
    n = _task_count(len(todo), parallelism, max_rows)
    bounds = [round(i * len(todo) / n) for i in range(n + 1)]
    return [(i, todo[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _petastorm_metadata(fs, path: str, schema, row_groups: dict[str, int]) -> None:
    """What petastorm's materialize_dataset adds after a Spark write, from the row-group counts the tasks
    reported (no second pass over the files): the Unischema and the row groups per file, in _common_metadata."""
    import pickle

    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY, load_row_groups
    from petastorm.utils import add_to_dataset_metadata

    with warnings.catch_warnings():  # petastorm 0.13 needs pyarrow's legacy dataset API, which warns
        warnings.simplefilter("ignore", FutureWarning)
        dataset = pq.ParquetDataset(path, filesystem=fs, validate_schema=False)
        add_to_dataset_metadata(dataset, UNISCHEMA_KEY, pickle.dumps(schema))  # petastorm's own format (a pickle)
        add_to_dataset_metadata(dataset, ROW_GROUPS_PER_FILE_KEY, json.dumps(row_groups))
        load_row_groups(pq.ParquetDataset(path, filesystem=fs, validate_schema=False))  # fails loudly if unreadable


def rejected_csv(rejected) -> str:
    """(path, reason) rows as CSV text, each cell as names.to_text writes it (any file name; `_load` reads back)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows((to_text(p), to_text(why)) for p, why in rejected)
    return buf.getvalue()


def _save(fs: HadoopFS, m: Materialized) -> None:
    fs.write_bytes(f"{m.url}/{REJECTED}", rejected_csv(m.rejected).encode())
    meta = asdict(m)
    meta.pop("rejected")
    meta["n_rejected"] = len(m.rejected)
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    fs.write_bytes(f"{m.url}/{MANIFEST}", json.dumps(meta, indent=1).encode())  # last: marks the write complete


def _load(fs: HadoopFS, url: str) -> Materialized:
    meta = json.loads(fs.read_bytes(f"{url}/{MANIFEST}"))
    text = fs.read_bytes(f"{url}/{REJECTED}").decode()
    rows = [[from_text(cell) for cell in r] for r in csv.reader(io.StringIO(text, newline=""))][1:]
    keep = {k: v for k, v in meta.items() if k in Materialized.__dataclass_fields__}
    keep.update(url=url, rejected=[tuple(r) for r in rows], shape=tuple(meta["shape"]), reused=True)
    return Materialized(**keep)
