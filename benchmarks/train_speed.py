"""Training speed under the compute settings medspark could choose: images per second of one model's train steps on
in-memory tensors (no input pipeline, no Spark), for XLA `jit_compile`, the mixed precision policies (float16,
bfloat16) and TensorFlow's thread pools. It answers "is this setting worth turning on here?" before any recipe
does.

    .venv/bin/python benchmarks/train_speed.py --model res_cnn --image-size 128 --save-results
    .venv/bin/python benchmarks/train_speed.py --model small_cnn --variants default jit bf16

Each variant runs in its own processes (the policy and thread pools are global in TensorFlow), --rounds of them,
round-robin, so that the machine's own drift shows as spread and hits every variant alike. The model is built
from `conf/model/` exactly as training builds it (TrainJob's builder) and compiled by keras_fit.compile_model with
the run's optimizer (AdamW here, the res_cnn recipe's), plus the variant's `jit_compile`. A process compiles and
warms up for --warmup steps, then times --steps steps --repeats times; the median is reported, with the spread.
Speed only: a faster setting must still be checked on the time-to-accuracy curve (numerics change with bfloat16).
Results: an MLflow run in the experiment `medspark-bench-train-speed` (images/s per variant as metrics, the table and
the JSON as artifacts); benchmarks/results/train_speed_<model>.md and .json with --save-results (results_folder.py).
    mlflow run . -e bench_train_speed -P model=res_cnn --env-manager local
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import results_folder  # benchmarks/results_folder.py: where the result files go

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "medspark-bench-train-speed"
CORES = os.cpu_count() or 1
# name: (jit_compile, policy, intra-op threads, inter-op threads); None = TensorFlow's default
VARIANTS = {
    "default": (False, "float32", None, None),
    "jit": (True, "float32", None, None),
    "bf16": (False, "mixed_bfloat16", None, None),
    "jit+bf16": (True, "mixed_bfloat16", None, None),
    "fp16": (False, "mixed_float16", None, None),
    "threads 1x1": (False, "float32", 1, 1),
    f"threads {CORES}x1": (False, "float32", CORES, 1),
    f"threads {CORES}x2": (False, "float32", CORES, 2),
}


def one(variant: str, model: str, size: int, batch: int, warmup: int, steps: int, repeats: int) -> dict:
    jit, policy, intra, inter = VARIANTS[variant]
    import tensorflow as tf

    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras

    from medspark.backends.api import TrainJob
    from medspark.config import compose_project_config

    cfg = compose_project_config([f"model={model}", f"preprocess.image_size={size}", "train.optimizer=adamw"])
    classes = ["a", "b", "c", "d"]
    data = _Data(shape=(size, size, int(cfg.preprocess.channels)), classes=classes)
    job = TrainJob.from_config(cfg, data)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    net = job.build_model()
    from medspark.backends.keras_fit import compile_model

    compile_model(net, job)
    net.compile(optimizer=net.optimizer, loss=net.loss, metrics=["accuracy"], jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * 8, *data.shape), dtype=np.uint8).astype("float32")
    y = rng.integers(0, len(classes), batch * 8).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat().prefetch(2)
    it = iter(ds)
    for _ in range(warmup):
        net.train_on_batch(*next(it))
    rates = []
    for _ in range(repeats):
        batches = [next(it) for _ in range(steps)]
        t = time.perf_counter()
        for xb, yb in batches:
            net.train_on_batch(xb, yb)
        rates.append(steps * batch / (time.perf_counter() - t))
    return {"variant": variant, "model": model, "image_size": size, "batch_size": batch, "jit_compile": jit,
            "policy": policy, "intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_threads": tf.config.threading.get_inter_op_parallelism_threads(), "images_per_s": rates,
            "median_images_per_s": float(np.median(rates)), "cpu_flags": _cpu_flags()}


class _Data:
    """What TrainJob's model builder reads of a materialized dataset: the image shape and the classes."""

    multilabel = False

    def __init__(self, shape, classes):
        self.shape, self.classes = shape, classes


def _cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)


def table(rows: list[dict]) -> str:
    base = next((r["median_images_per_s"] for r in rows if r["variant"] == "default"), None)
    lines = ["| variant | jit_compile | policy | threads (intra x inter) | images/s (median) | spread | vs default |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        v = r["images_per_s"]
        lines.append(f"| {r['variant']} | {r['jit_compile']} | {r['policy']} | {r['intra_threads'] or 'auto'} x "
                     f"{r['inter_threads'] or 'auto'} | {r['median_images_per_s']:.1f} | {min(v):.1f}-{max(v):.1f} | "
                     + (f"{r['median_images_per_s'] / base:.2f}x |" if base else "- |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="res_cnn", help="a conf/model/ option")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    ap.add_argument("--warmup", type=int, default=15, help="steps before timing (compilation, oneDNN caches)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    ap.add_argument("--rounds", type=int, default=2,
                    help="processes per variant, run round-robin (the spread between processes is the noise)")
    ap.add_argument("--uri", default=f"sqlite:///{ROOT}/mlruns.db", help="MLflow tracking URI")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    results_folder.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.image_size, args.batch_size, args.warmup, args.steps,
                             args.repeats)))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown --variants {unknown}: choose from {', '.join(VARIANTS)}")
    by: dict[str, dict] = {}
    for r in range(args.rounds):  # round-robin: a slow minute of the machine hits every variant alike
        for v in args.variants:
            cmd = [sys.executable, __file__, "--one", v, "--model", args.model, "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                print(f"### {v}: failed\n{done.stderr[-3000:]}", flush=True)
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"### {v} (round {r + 1}): {got['median_images_per_s']:.1f} images/s", flush=True)
            if v in by:
                got["images_per_s"] = by[v]["images_per_s"] + got["images_per_s"]
            by[v] = got | {"processes": by.get(v, {}).get("processes", 0) + 1,
                           "median_images_per_s": float(np.median(got["images_per_s"]))}
    rows = [by[v] for v in args.variants if v in by]
    if not rows:
        sys.exit("every variant failed")
    md = (f"{args.model}, {args.image_size} px, batch {args.batch_size}, {CORES} cores "
          f"(CPU flags: {rows[0]['cpu_flags'] or '-'}); train steps on in-memory tensors: {args.rounds} processes "
          f"per variant, run round-robin, each timing {args.repeats} x {args.steps} steps after {args.warmup} warm-up "
          f"steps; the median and the range of all of them\n\n" + table(rows))
    print("\n" + md)
    out = results_folder.folder(args)
    name = f"train_speed_{args.model}"
    files = [out / f"{name}.md", out / f"{name}.json"]
    files[0].write_text(md)
    files[1].write_text(json.dumps(rows, indent=1))
    import mlflow

    mlflow.set_tracking_uri(args.uri)
    parent = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e bench_train_speed`: log into its run
    if not parent:
        mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_id=parent, run_name=None if parent else f"bench-train-speed-{args.model}"):
        given = mlflow.active_run().data.params
        mlflow.log_params({(f"bench_{k}" if k in given else k): v for k, v in {
            "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "cores": CORES,
            "steps": args.steps, "repeats": args.repeats}.items()})
        mlflow.log_metrics({re.sub(r"[^0-9A-Za-z_]+", "_", r["variant"]) + "_images_per_s": r["median_images_per_s"]
                            for r in rows})
        for f in files:
            mlflow.log_artifact(str(f))


if __name__ == "__main__":
    main()
