"""Spark ETL: listed files -> preprocessed uint8 tensors -> Petastorm Parquet, one dataset per split.

The driver holds paths, labels and content hashes; pixels exist only on executors and in the Parquet files.
The output lives at `<data_url>/<dataset>/<fingerprint>`: the fingerprint covers the listing (path, size,
mtime, label) and every setting that changes a pixel or a split, so a second run with the same inputs
reuses the data, and anything else gets its own folder. A manifest written last marks a finished write;
a folder without it is a write that died and is rebuilt, never read.
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
from dataclasses import asdict, dataclass, field

import numpy as np

from . import splits as splitting
from .preprocess import PreprocessConfig, Rejected, content_hash, decode, read_bytes
from .schema import image_schema
from .sources import Listing

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump when the on-disk layout or schema changes: old folders then stop matching
# v2: rows are written in a seeded random order (v1 kept the listing order: class-sorted row groups).
MANIFEST = "_MEDSPARK_DATASET.json"
REJECTED = "rejected.csv"


@dataclass
class Materialized:
    url: str
    fingerprint: str
    classes: list[str]
    shape: tuple[int, int, int]
    sizes: dict[str, int]  # accepted images per split
    per_class: dict[str, dict[str, int]]
    listed: int
    accepted: int
    rejected: list[tuple[str, str]]  # (path, reason)
    duplicate_groups: int
    duplicate_files: int
    label_conflicts: int
    moved_to_test: int
    seconds: dict[str, float]  # hash, preprocess, write
    reused: bool = False
    notes: list[str] = field(default_factory=list)

    def split_url(self, split: str) -> str:
        return f"{self.url}/{split}"

    def summary(self) -> dict:
        """Flat numbers for MLflow."""
        out = {"data_listed": self.listed, "data_accepted": self.accepted, "data_rejected": len(self.rejected),
               "data_duplicate_groups": self.duplicate_groups, "data_duplicate_files": self.duplicate_files,
               "data_label_conflicts": self.label_conflicts, "data_moved_to_test": self.moved_to_test,
               "data_reused": int(self.reused)}
        out.update({f"data_n_{s}": n for s, n in self.sizes.items()})
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


def fingerprint(listing: Listing, pre: PreprocessConfig, split_cfg: dict) -> str:
    """Changes whenever an input file, a label, a preprocessing or a split setting changes."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "pre": asdict(pre), "split": split_cfg, "classes": listing.classes},
                        sort_keys=True).encode())
    for r in listing.records:
        try:
            st = os.stat(r.path)
            stat = (st.st_size, st.st_mtime_ns)
        except OSError as e:  # unreadable entries still count: they are part of what was listed
            stat = (e.errno, 0)
        h.update(f"{r.path}\0{r.label}\0{r.split}\0{stat}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- executor-side functions (no driver state)

def _hash_partition(records):
    for path, label, split in records:
        try:
            yield path, label, split, content_hash(read_bytes(path)), None
        except Rejected as e:
            yield path, label, split, None, str(e)
        except Exception as e:  # never let one file kill the job
            yield path, label, split, None, f"unexpected {type(e).__name__}: {e}"


def _decode_partition(rows, pre: PreprocessConfig, schema):
    from petastorm.unischema import dict_to_spark_row

    for path, label, split, sha in rows:
        try:
            image = decode(read_bytes(path), pre)
        except Rejected as e:
            yield False, split, label, (path, str(e))
            continue
        except Exception as e:
            yield False, split, label, (path, f"unexpected {type(e).__name__}: {e}")
            continue
        yield True, split, label, dict_to_spark_row(schema, {
            "image": image, "label": label, "path": path, "sha1": sha, "split": split})


# ---------------------------------------------------------------- driver

def _partitions(spark, n: int, per_partition: int) -> int:
    """Enough tasks to balance cores, few enough that Python worker start-up stays negligible."""
    return max(1, min(n, max(spark.sparkContext.defaultParallelism * 2, math.ceil(n / per_partition))))


def materialize(spark, listing: Listing, pre: PreprocessConfig, split_cfg: dict, data_url: str, name: str,
                row_group_size_mb: int = 8, rebuild: bool = False) -> Materialized:
    """Build (or reuse) the Petastorm splits of a listed dataset. split_cfg: {val, test, seed}."""
    fp = fingerprint(listing, pre, dict(split_cfg))
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
    n = len(records)
    seconds = {}

    t = time.perf_counter()
    sc.setJobDescription(f"medspark: hash {n} files")
    hashed = sc.parallelize(records, _partitions(spark, n, 2000)).mapPartitions(_hash_partition).collect()
    seconds["hash"] = time.perf_counter() - t
    rejected = [(p, why) for p, _, _, sha, why in hashed if sha is None]
    ok = [(p, label, sha, split) for p, label, split, sha, _ in hashed if sha is not None]
    report = splitting.assign(ok, listing.classes, split_cfg["val"], split_cfg["test"], split_cfg["seed"],
                              listing.has_test_split)
    todo = [(p, label, report.assignment[p], sha) for p, label, sha, _ in ok]
    # Listings come sorted by class, and Petastorm shuffles whole row groups plus a bounded buffer: written in
    # listing order, a row group (~500 images) holds one class and batches see one or two classes at a time,
    # which wrecks BatchNorm statistics and SGD. A seeded permutation makes every row group a class mix.
    todo = [todo[i] for i in np.random.default_rng(split_cfg["seed"]).permutation(len(todo))]

    schema = image_schema(pre.shape)
    t = time.perf_counter()
    sc.setJobDescription(f"medspark: decode + resize {len(todo)} images to {pre.shape}")
    from pyspark import StorageLevel

    decoded = (sc.parallelize(todo, _partitions(spark, len(todo), 500))
               .mapPartitions(lambda rows: _decode_partition(rows, pre, schema))
               .persist(StorageLevel.MEMORY_AND_DISK))
    counts = decoded.map(lambda t: (t[0], t[1], t[2])).countByValue()  # runs the decode once, fills the cache
    seconds["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    rejected += decoded.filter(lambda t: not t[0]).map(lambda t: t[3]).collect()
    sizes, per_class = _tally(counts, listing.classes)
    from petastorm.etl.dataset_metadata import materialize_dataset

    for split in splitting.SPLITS:
        if not sizes[split]:
            continue
        sc.setJobDescription(f"medspark: write {split} split ({sizes[split]} rows) to Petastorm")
        rows = decoded.filter(lambda t, s=split: t[0] and t[1] == s).map(lambda t: t[3])
        files = max(1, min(sizes[split], _partitions(spark, sizes[split], 2000)))
        with materialize_dataset(spark, f"{url}/{split}", schema, row_group_size_mb):
            (spark.createDataFrame(rows, schema.as_spark_schema()).coalesce(files)
             .write.mode("overwrite").parquet(f"{url}/{split}"))
    decoded.unpersist()
    sc.setJobDescription(None)
    seconds["write"] = time.perf_counter() - t

    m = Materialized(url, fp, listing.classes, pre.shape, sizes, per_class, n, sum(sizes.values()),
                     sorted(rejected), report.duplicate_groups, report.duplicate_files, report.label_conflicts,
                     report.moved_to_test, seconds)
    if m.listed != m.accepted + len(m.rejected):  # the accounting promise: every listed file is somewhere
        raise RuntimeError(f"accounting error: listed {m.listed} != accepted {m.accepted} + rejected {len(m.rejected)}")
    _save(fs, m)
    log.info("materialized %s: %s accepted, %d rejected, %d duplicate contents, %s", url, m.sizes, len(m.rejected),
             m.duplicate_groups, {k: round(v, 1) for k, v in seconds.items()})
    return m


def _tally(counts, classes):
    sizes = dict.fromkeys(splitting.SPLITS, 0)
    per_class = {s: dict.fromkeys(classes, 0) for s in splitting.SPLITS}
    for (ok, split, label), c in counts.items():
        if ok:
            sizes[split] += c
            per_class[split][classes[label]] += c
    return sizes, per_class


def rejected_csv(rejected) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(rejected)
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
    rows = list(csv.reader(io.StringIO(fs.read_bytes(f"{url}/{REJECTED}").decode())))[1:]
    keep = {k: v for k, v in meta.items() if k in Materialized.__dataclass_fields__}
    keep.update(url=url, rejected=[tuple(r) for r in rows], shape=tuple(meta["shape"]), reused=True)
    return Materialized(**keep)
