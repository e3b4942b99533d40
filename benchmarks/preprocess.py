"""Preprocessing speed: image files -> Petastorm Parquet, a sequential loop against Spark local[k], and cost growth.

    .venv/bin/python benchmarks/preprocess.py                 # brain MRI Training (5,712) + synthetic 50,000
    .venv/bin/python benchmarks/preprocess.py --synthetic 20000 --growth 1000 5000 20000 --cores 1 2
    .venv/bin/python benchmarks/preprocess.py --brain '' --synthetic 0 --dicom 5000 --cores 1 2   # DICOM only

For each dataset: (a) the sequential baseline, one Python process running the very functions the Spark tasks
run (`data/tasks.py`: hash_partition, write_chunk; then `materialize._petastorm_metadata`: read, SHA-1, PIL decode + resize,
encode, pyarrow Parquet write, Petastorm metadata) in a plain loop; (b) `materialize()` on a fresh
`local[k]` SparkSession per k, each in its own process (a cold JVM and cold Python workers, as a user runs it).
The one-off session start is timed apart (the JVM: SparkSession creation; the Python workers: a first,
empty job); the Spark figures are the materialize() call, as a training run makes it after its session started. Every file is read once before anything is timed, so all runs see a
warm page cache. A per-stage profile of the sequential loop (microseconds per image) says where the time goes.

Reported: images/s, speedup over the baseline, scaling from local[1], per-core efficiency (rate / (k x the
baseline's rate)), and the peak memory of the Python driver and of the JVM (in local mode the JVM is driver and
executor at once; pixels never reach either). Growth: wall time at several sizes of the synthetic set, plotted,
with a least-squares line. preprocess.md, preprocess.json and preprocess_growth.png are logged to an MLflow run in
the experiment `medspark-bench-preprocess`, and written to benchmarks/results/ only with --save-results (or to
--out; results_folder.py).

--dicom N: also N DICOM files as hospitals store them (tests/medical_files.py: 16-bit stored values with a rescale,
a third MONOCHROME1, a quarter RLE Lossless; phantom slices of --dicom-size px, generated once under --dicom-root),
through the same paths (decode_frames: pydicom parse, pixel data, modality LUT, window, resize), with a DICOM
per-step profile (dicom_profile).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import results_folder  # benchmarks/results_folder.py: where the result files go

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "medspark-bench-preprocess"
BRAIN = ROOT.parent / "shared" / "datasets" / "brain-tumor-mri" / "Training"
SPLIT = {"val": 0.15, "test": 0.15, "seed": 0}


def listing_for(root: str, n: int | None, seed: int = 0):
    """The dataset's listing; n: a seeded random subset of n files (cost growth)."""
    import numpy as np

    from medspark.data.sources import Listing
    from medspark.data.sources.class_folders import ClassFolders

    full = ClassFolders(root).list()
    if n is None or n >= len(full.records):
        return full
    keep = np.sort(np.random.default_rng(seed).choice(len(full.records), n, replace=False))
    return Listing([full.records[i] for i in keep], full.classes, full.has_test_split)


def warm_page_cache(listing) -> float:
    t = time.perf_counter()
    for r in listing.records:
        with open(r.path, "rb") as f:
            f.read()
    return time.perf_counter() - t


def sequential(listing, pre, out: str, row_group_size_mb: int = 8) -> dict:
    """The baseline: materialize's own steps and task functions in a loop, in this one process, no Spark."""
    from petastorm.fs_utils import FilesystemResolver

    from medspark.data import materialize as M
    from medspark.data import tasks

    t0 = time.perf_counter()
    hashed = list(tasks.hash_partition((r.path, r.label, r.split) for r in listing.records))
    _, _, todo = M.plan_splits(hashed, listing, SPLIT)
    t1 = time.perf_counter()
    resolver = FilesystemResolver("file://" + out)
    factory, base = resolver.filesystem_factory(), resolver.get_dataset_path()
    for split in {row[2] for row in todo}:
        os.makedirs(f"{base}/{split}", exist_ok=True)
    group_rows = tasks.row_group_rows(pre.shape, row_group_size_mb)
    results = [tasks.write_chunk(c, pre, base, factory, group_rows, listing.task, len(listing.classes))
               for c in M._chunks(todo, 1)]
    t2 = time.perf_counter()
    sizes, _, _, _ = M.finish(results, listing.classes, listing.task, pre.shape, factory, base)
    t3 = time.perf_counter()
    return {"images": len(listing.records), "accepted": sum(sizes.values()), "seconds": t3 - t0,
            "stages": {"hash": t1 - t0, "decode_write": t2 - t1, "metadata": t3 - t2}}


def _profile(listing, pre, sample: int, decode_steps) -> dict:
    """Microseconds per file for each step of the per-file path, on a sample, in this process: read, SHA-1, the
    format's own decoding steps (`decode_steps(data, out)` times them into `out` and returns the images), npy
    encoding and the Parquet write."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medspark.data.preprocess import content_hash, read_bytes
    from medspark.data.schema import image_schema

    paths = [r.path for r in listing.records[:sample]]
    field = image_schema(pre.shape, len(listing.classes)).image
    out, t = {}, time.perf_counter()
    data = [read_bytes(p) for p in paths]
    out["read"] = time.perf_counter() - t
    t = time.perf_counter()
    for d in data:
        content_hash(d)
    out["sha1"] = time.perf_counter() - t
    images = decode_steps(data, out)
    t = time.perf_counter()
    encoded = [field.codec.encode(field, i) for i in images]
    out["encode (npy)"] = time.perf_counter() - t
    t = time.perf_counter()
    pq.write_table(pa.table({"image": pa.array(encoded, pa.binary()), "label": np.zeros(len(encoded), np.int32)}),
                   io.BytesIO(), compression="none", row_group_size=500)
    out["parquet write"] = time.perf_counter() - t
    return {k: 1e6 * v / len(paths) for k, v in out.items()}


def profile(listing, pre, sample: int = 2000) -> dict:
    """Microseconds per image for each step of the per-file path, on a sample, in this process."""

    def decode_steps(data, out):
        import io

        from PIL import Image, ImageOps

        from medspark.data.preprocess import decode

        t = time.perf_counter()  # decode alone (PIL open + draft + load), without mode fix and resize
        for d in data:
            img = Image.open(io.BytesIO(d))
            if pre.draft and img.format == "JPEG":
                img.draft("L", (pre.image_size, pre.image_size))
            ImageOps.exif_transpose(img.convert("L") if img.mode != "L" else img)
        out["pil_decode"] = time.perf_counter() - t
        t = time.perf_counter()
        images = [decode(d, pre) for d in data]
        out["decode_and_resize"] = time.perf_counter() - t
        out["resize_mode_fix (difference)"] = out["decode_and_resize"] - out["pil_decode"]
        return images

    return _profile(listing, pre, sample, decode_steps)


def dicom_profile(listing, pre, sample: int = 500) -> dict:
    """Microseconds per DICOM file for each step of its path, on a sample, in this process: read, SHA-1, the
    header and pixel bytes parsed (pydicom), the pixel data decoded (pixel_array: RLE decompression here), the
    whole decode_frames (parse + pixels + modality LUT + window + resize; its remainder is the transforms), npy
    encoding and the Parquet write."""

    def decode_steps(data, out):
        import io

        import pydicom

        from medspark.data.preprocess import decode_frames

        t = time.perf_counter()
        parsed = [pydicom.dcmread(io.BytesIO(d)) for d in data]
        out["pydicom parse"] = time.perf_counter() - t
        t = time.perf_counter()
        for ds in parsed:
            ds.pixel_array
        out["pixel data (decompress)"] = time.perf_counter() - t
        t = time.perf_counter()
        images = [decode_frames(d, pre)[0][1] for d in data]
        out["decode_frames (all steps)"] = time.perf_counter() - t
        out["LUTs + window + resize (difference)"] = (out["decode_frames (all steps)"] - out["pydicom parse"]
                                                      - out["pixel data (decompress)"])
        return images

    return _profile(listing, pre, sample, decode_steps)


def dicom_set(root: str, n: int, size: int) -> str:
    """n DICOM files (2 classes) under root/n<n>_s<size>, written once (a marker file ends a complete set)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from medical_files import dicom_set as write_set

    folder = Path(root) / f"n{n}_s{size}"
    if not (folder / "_COMPLETE").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_set(folder, classes=("glioma", "notumor"), per_class=-(-n // 2), size=size, per_patient=4)
        (folder / "_COMPLETE").write_text("done\n")
    return str(folder)


def _decode_part(paths, pre, start, out):
    from medspark.data.preprocess import decode, read_bytes

    start.wait()
    t = time.perf_counter()
    for p in paths:
        try:
            decode(read_bytes(p), pre)
        except Exception:
            pass
    out.put(time.perf_counter() - t)


def process_ceiling(listing, pre, k: int) -> float:
    """Images/s of k plain processes decoding disjoint halves of the files, no Spark: what this machine's
    cores give when nothing else shares them (the ceiling for Spark's local[k] scaling)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    paths = [r.path for r in listing.records]
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_decode_part, args=(paths[i::k], pre, start, out)) for i in range(k)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # all forked and waiting
    start.set()
    seconds = max(out.get() for _ in procs)
    for p in procs:
        p.join()
    return len(paths) / seconds


# ------------------------------------------------------------------ one Spark run (its own process)

def _peak_rss_of_children(stop: threading.Event, peaks: dict) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for p in me.children(recursive=True):
            try:
                kind = "jvm" if "java" in p.name() else "python_workers"
                peaks.setdefault(kind, {})[p.pid] = max(peaks.get(kind, {}).get(p.pid, 0), p.memory_info().rss)
            except Exception:
                pass
        stop.wait(0.2)


def spark_worker(args) -> None:
    """Child process: a fresh local[k] session, one materialize() into a temporary folder, JSON on stdout."""
    import logging

    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.WARNING)
    from medspark.data.materialize import materialize
    from medspark.data.preprocess import PreprocessConfig
    from medspark.spark import session

    listing = listing_for(args.root, args.n)
    pre = PreprocessConfig(image_size=args.size)
    peaks: dict = {}
    stop = threading.Event()
    threading.Thread(target=_peak_rss_of_children, args=(stop, peaks), daemon=True).start()
    t = time.perf_counter()
    spark = session(OmegaConf.create({"name": "local", "cores": args.cores, "log_level": "ERROR",
                                      "conf": {"spark.ui.showConsoleProgress": "false"}}))
    jvm = time.perf_counter() - t
    t = time.perf_counter()  # PySpark forks its daemon and one Python worker per core on the first job
    spark.sparkContext.parallelize(range(args.cores), args.cores).mapPartitions(lambda it: [0]).collect()
    workers = time.perf_counter() - t
    out = tempfile.mkdtemp(prefix="medspark-bench-")
    try:
        t = time.perf_counter()
        m = materialize(spark, listing, pre, SPLIT, out, "bench")
        total = time.perf_counter() - t
    finally:
        spark.stop()
        stop.set()
        shutil.rmtree(out, ignore_errors=True)
    print("RESULT " + json.dumps({
        "images": len(listing.records), "accepted": m.accepted, "seconds": total, "jvm_start": jvm,
        "worker_start": workers,
        "stages": {"fingerprint": m.seconds["fingerprint"], "hash": m.seconds["hash"], "split": m.seconds["split"],
                   "decode_write": m.seconds["preprocess"], "metadata": m.seconds["write"]},
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jvm_peak_mb": sum(peaks.get("jvm", {}).values()) / 2 ** 20,
        "workers_peak_mb": sum(peaks.get("python_workers", {}).values()) / 2 ** 20}), flush=True)


def spark_run(root: str, n: int | None, cores: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "_spark", "--root", root, "--cores", str(cores), "--size", str(size)]
    if n:
        cmd += ["--n", str(n)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"spark run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ report

def rows_for(name: str, seq: dict, spark: dict[int, dict]) -> list[dict]:
    base = seq["images"] / seq["seconds"]
    loop = "sequential pydicom loop" if name.startswith("DICOM") else "sequential PIL loop"
    rows = [{"dataset": name, "images": seq["images"], "path": loop, "cores": 1,
             "seconds": seq["seconds"], "images/s": base, "speedup": 1.0, "vs local[1]": float("nan"),
             "per-core efficiency": 1.0, "JVM + workers start s": float("nan"), "cold total s": seq["seconds"],
             "driver peak MB": seq.get("driver_peak_mb")}]
    one = spark.get(1)
    for k, r in sorted(spark.items()):
        rate = r["images"] / r["seconds"]
        rows.append({"dataset": name, "images": r["images"], "path": f"Spark local[{k}]", "cores": k,
                     "seconds": r["seconds"], "images/s": rate, "speedup": rate / base,
                     "vs local[1]": rate / (one["images"] / one["seconds"]) if one else float("nan"),
                     "per-core efficiency": rate / (k * base),
                     "JVM + workers start s": r["jvm_start"] + r["worker_start"],
                     "cold total s": r["seconds"] + r["jvm_start"] + r["worker_start"],
                     "driver peak MB": r["driver_peak_mb"]})
    return rows


def markdown(rows: list[dict]) -> str:
    fmt = {"seconds": "{:.1f}", "images/s": "{:,.0f}", "speedup": "{:.2f}x", "vs local[1]": "{:.2f}x",
           "per-core efficiency": "{:.0%}", "JVM + workers start s": "{:.1f}", "cold total s": "{:.1f}", "driver peak MB": "{:.0f}",
           "JVM peak MB": "{:.0f}"}
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for k in head:
            v = row[k]
            cells.append("-" if v is None or (isinstance(v, float) and v != v) else fmt.get(k, "{}").format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_growth(growth: list[dict], path: Path) -> dict:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in sorted({g["path"] for g in growth}):
        pts = sorted((g["images"], g["seconds"]) for g in growth if g["path"] == label)
        x, y = np.array(pts, dtype=float).T
        slope, icpt = np.polyfit(x, y, 1)
        r2 = 1 - ((y - (slope * x + icpt)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
        fits[label] = {"ms_per_image": 1e3 * slope, "fixed_s": icpt, "r2": r2}
        ax.plot(x, y, "o", label=f"{label}: {1e3 * slope:.2f} ms/image + {icpt:.1f} s (R²={r2:.4f})")
        ax.plot(x, slope * x + icpt, "-", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xlabel("images")
    ax.set_ylabel("wall seconds, files -> Petastorm")
    ax.set_title("Preprocessing cost growth (synthetic 128 px PNG -> 128 px)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = sys.argv[1:] if argv is None else argv
    if sub and sub[0] == "_spark":
        wp = argparse.ArgumentParser()
        wp.add_argument("--root")
        wp.add_argument("--cores", type=int)
        wp.add_argument("--size", type=int)
        wp.add_argument("--n", type=int)
        return spark_worker(wp.parse_args(sub[1:]))
    ap.add_argument("--brain", default=str(BRAIN), help="real image folder (class subfolders); '' to skip")
    ap.add_argument("--synthetic", type=int, default=50_000, help="synthetic images (4 classes); 0 to skip")
    ap.add_argument("--synthetic-root", default=os.path.expanduser("~/.cache/medspark/bench-synthetic"),
                    help="where the synthetic set is generated once and reused")
    ap.add_argument("--dicom", type=int, default=0, help="DICOM files (2 classes, tests/medical_files.py); 0 to skip")
    ap.add_argument("--dicom-size", type=int, default=256, help="side of the DICOM files' images (px)")
    ap.add_argument("--dicom-root", default=os.path.expanduser("~/.cache/medspark/bench-dicom"),
                    help="where the DICOM set is written once and reused")
    ap.add_argument("--growth", type=int, nargs="*", default=[1000, 5000, 20000, 50000])
    ap.add_argument("--cores", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    ap.add_argument("--size", type=int, default=128, help="preprocess.image_size")
    ap.add_argument("--uri", default=f"sqlite:///{ROOT}/mlruns.db")
    results_folder.add_arguments(ap)
    args = ap.parse_args(sub)

    from medspark.data.preprocess import PreprocessConfig

    pre = PreprocessConfig(image_size=args.size)
    datasets = []
    if args.brain:
        datasets.append(("brain MRI Training", args.brain, None))
    if args.synthetic:
        from medspark.data import synthetic

        per_class = -(-args.synthetic // 4)
        root = os.path.join(args.synthetic_root, f"n{per_class}_s128_seed0")
        t = time.perf_counter()
        synthetic.generate(root, per_class=per_class, size=128, seed=0, workers=os.cpu_count() or 1)
        print(f"synthetic set {root}: {time.perf_counter() - t:.0f} s to generate or check", flush=True)
        datasets.append((f"synthetic {4 * per_class:,}", root, None))
    if args.dicom:
        t = time.perf_counter()
        root = dicom_set(args.dicom_root, args.dicom, args.dicom_size)
        print(f"DICOM set {root}: {time.perf_counter() - t:.0f} s to write or check", flush=True)
        datasets.append((f"DICOM {2 * -(-args.dicom // 2):,}", root, None))
    rows, growth, profiles, raw = [], [], {}, {}
    for name, root, n in datasets:
        listing = listing_for(root, n)
        print(f"\n## {name}: {len(listing.records)} files; page cache warmed in {warm_page_cache(listing):.1f} s",
              flush=True)
        profiles[name] = (dicom_profile if name.startswith("DICOM") else profile)(listing, pre)
        print("profile, us/image: " + ", ".join(f"{k} {v:.0f}" for k, v in profiles[name].items()), flush=True)
        ceiling = {k: process_ceiling(listing, pre, k) for k in args.cores}
        profiles[name]["ceiling_images_per_second"] = ceiling
        print("decode only, k plain processes (no Spark): " + ", ".join(
            f"{k}: {v:.0f} img/s ({v / ceiling[min(ceiling)]:.2f}x)" for k, v in ceiling.items()), flush=True)
        with tempfile.TemporaryDirectory(prefix="medspark-bench-seq-") as out:
            seq = sequential(listing, pre, out)
        print(f"sequential: {seq['seconds']:.1f} s ({seq['images'] / seq['seconds']:.0f} img/s) {seq['stages']}",
              flush=True)
        spark = {}
        for k in args.cores:
            spark[k] = spark_run(root, n, k, args.size)
            print(f"local[{k}]: {spark[k]['seconds']:.1f} s ({spark[k]['images'] / spark[k]['seconds']:.0f} img/s), "
                  f"JVM start {spark[k]['jvm_start']:.1f} s, workers start {spark[k]['worker_start']:.1f} s, stages {spark[k]['stages']}, driver peak "
                  f"{spark[k]['driver_peak_mb']:.0f} MB, JVM peak {spark[k]['jvm_peak_mb']:.0f} MB", flush=True)
        raw[name] = {"sequential": seq, "spark": spark}
        rows += rows_for(name, seq, spark)
        if name.startswith("synthetic"):  # cost growth on subsets of this set (the full set is the last point)
            top = max(args.cores)
            for size in args.growth:
                if size > len(listing.records):
                    continue
                full = size == len(listing.records)
                sub_listing = listing if full else listing_for(root, size)
                with tempfile.TemporaryDirectory(prefix="medspark-bench-seq-") as out:
                    s = seq if full else sequential(sub_listing, pre, out)
                r = spark[top] if full else spark_run(root, size, top, args.size)
                growth += [{"path": "sequential", "images": size, "seconds": s["seconds"]},
                           {"path": f"Spark local[{top}]", "images": size, "seconds": r["seconds"],
                            "driver_peak_mb": r["driver_peak_mb"], "jvm_peak_mb": r["jvm_peak_mb"]}]
                print(f"growth {size}: sequential {s['seconds']:.1f} s, local[{top}] {r['seconds']:.1f} s, "
                      f"driver peak {r['driver_peak_mb']:.0f} MB, JVM peak {r['jvm_peak_mb']:.0f} MB", flush=True)

    args.out = results_folder.folder(args)  # a temporary folder unless --save-results or --out
    md = ["## Files -> Petastorm Parquet: sequential loop vs Spark\n", markdown(rows)]
    for name, prof in profiles.items():
        ceiling = prof.pop("ceiling_images_per_second")
        md.append(f"\nSequential per-image profile, {name} (us/image): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in prof.items()) + "\n")
        md.append(f"\nHardware ceiling, {name}: decode + resize only in k plain processes, no Spark: " + ", ".join(
            f"{k} -> {v:,.0f} images/s ({v / ceiling[min(ceiling)]:.2f}x)" for k, v in ceiling.items()) + "\n")
        prof["ceiling_images_per_second"] = ceiling
    fits = {}
    if growth:
        fits = plot_growth(growth, args.out / "preprocess_growth.png")
        md.append("\n## Cost growth\n")
        md.append(markdown([{"path": g["path"], "images": g["images"], "seconds": g["seconds"],
                             "driver peak MB": g.get("driver_peak_mb"), "JVM peak MB": g.get("jvm_peak_mb")}
                            for g in growth]))
        md.append("\nLinear fits: " + "; ".join(f"{k}: {v['ms_per_image']:.3f} ms/image + {v['fixed_s']:.1f} s, "
                                               f"R² {v['r2']:.4f}" for k, v in fits.items()) + "\n")
    text = "".join(md)
    (args.out / "preprocess.md").write_text(text)
    (args.out / "preprocess.json").write_text(json.dumps({"rows": rows, "growth": growth, "fits": fits,
                                                          "profiles": profiles, "raw": raw}, indent=1))
    print("\n" + text)

    import mlflow

    mlflow.set_tracking_uri(args.uri)
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run -e bench_*` made the run (in its experiment): use it
        mlflow.set_experiment(EXPERIMENT)
    parent = os.environ.get("MLFLOW_RUN_ID")
    with mlflow.start_run(run_id=parent, run_name=None if parent else "bench-preprocess"):
        mlflow.log_params({"bench_cores": " ".join(map(str, args.cores)), "bench_image_size": args.size,
                           "bench_synthetic": args.synthetic, "bench_cpu_count": os.cpu_count()})
        for r in rows:
            key = f"{r['dataset'].split()[0]}_{r['path'].replace(' ', '_').replace('[', '').replace(']', '')}"
            mlflow.log_metrics({f"{key}_images_per_second": r["images/s"], f"{key}_seconds": r["seconds"],
                                f"{key}_speedup": r["speedup"], f"{key}_per_core_efficiency": r["per-core efficiency"]})
        for k, v in fits.items():
            mlflow.log_metrics({f"growth_{k.split()[0].lower()}_ms_per_image": v["ms_per_image"],
                                f"growth_{k.split()[0].lower()}_r2": v["r2"]})
        for f in ("preprocess.md", "preprocess.json", "preprocess_growth.png"):
            if (args.out / f).exists():
                mlflow.log_artifact(str(args.out / f))


if __name__ == "__main__":
    main()
