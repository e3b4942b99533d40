"""Input pipeline speed: Petastorm -> tf.data against the model's own training rate from in-memory arrays.

    .venv/bin/python benchmarks/loader.py                        # synthetic 4 x 600, 128 px, small_cnn
    .venv/bin/python benchmarks/loader.py --per-class 1500 --epochs 4 --model dense

Materializes a synthetic set with the real Spark path (local[2]), then measures, in this one process:
  1. the loader alone: batches/s out of `loader.dataset` (the training pipeline: Petastorm reader, shuffle
     buffer, batching, float cast, prefetch), without and with the default augmentation;
  2. the model trained from in-memory arrays (`model.fit(x, y)`): the ceiling for this model on this machine;
  3. the project's training loop: the same model and batch size fed by `loader.dataset` (what the `single`
     backend runs), without augmentation (same work per step as 2) and with the default augmentation.
Training rates are images/s over the epochs after the first (the first compiles the graph), no validation.
Targets (issue 5): loader >= 5x the training rate; training loop >= 90% of the in-memory rate.
loader.md and loader.json are logged to an MLflow run in `medspark-bench-loader`, and written to benchmarks/results/
only with --save-results (or to --out; results_folder.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import results_folder  # benchmarks/results_folder.py: where the result files go

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "medspark-bench-loader"


def materialize_synthetic(per_class: int, size: int, work: str):
    from omegaconf import OmegaConf

    from medspark.data import synthetic
    from medspark.data.materialize import materialize
    from medspark.data.preprocess import PreprocessConfig
    from medspark.data.sources.class_folders import ClassFolders
    from medspark.spark import session

    root = synthetic.generate(os.path.join(work, f"synthetic-{per_class}-{size}"), per_class, size=size, seed=0,
                              workers=os.cpu_count() or 1)
    listing = ClassFolders(str(root)).list()
    spark = session(OmegaConf.create({"name": "local", "cores": 2, "log_level": "ERROR",
                                      "conf": {"spark.ui.showConsoleProgress": "false"}}))
    try:
        return materialize(spark, listing, PreprocessConfig(image_size=size), {"val": 0.15, "test": 0.15, "seed": 0},
                           os.path.join(work, "data"), "loader-bench")
    finally:
        spark.stop()


def loader_rate(job, batch: int, augment: bool, passes: int = 2) -> dict:
    """Images/s out of the training pipeline, per pass over the train split (nothing else running)."""
    from medspark.data import loader

    d = job.data
    ds = loader.dataset(d.split_url("train"), d.shape, batch, training=True, seed=0,
                        augment=job.train.augment if augment else None, rows=d.sizes["train"],
                        shuffle_buffer=job.train.shuffle_buffer)
    rates = []
    for _ in range(passes):
        t, n = time.perf_counter(), 0
        for x, _y in ds:
            n += int(x.shape[0])
        rates.append(n / (time.perf_counter() - t))
    return {"images_per_second": max(rates), "per_pass": rates}


def train_rate(job, model_cfg, shape, classes: int, x, epochs: int, batch: int, seed: int = 0) -> dict:
    """Fit a fresh model on `x` (arrays (x, y) or a tf.data.Dataset) and time every epoch."""
    import hydra
    import keras
    from medspark.backends.keras_fit import EpochTimer, compile_model

    keras.utils.set_random_seed(seed)
    model = hydra.utils.instantiate(model_cfg, input_shape=shape, num_classes=classes)
    compile_model(model, job)  # the run's optimizer and loss (train config)
    timer = EpochTimer()
    if isinstance(x, tuple):
        model.fit(x[0], x[1], batch_size=batch, epochs=epochs, shuffle=True, callbacks=[timer], verbose=0)
        n = len(x[0])
    else:
        model.fit(x, epochs=epochs, callbacks=[timer], verbose=0)
        n = None
    return {"epoch_seconds": timer.seconds, "n": n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=4, help="per training measurement; the first is not counted")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/medspark/bench-loader"))
    ap.add_argument("--uri", default=f"sqlite:///{ROOT}/mlruns.db")
    results_folder.add_arguments(ap)
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from medspark.backends.api import TrainJob
    from medspark.config import config_dir
    from medspark.data import loader

    data = materialize_synthetic(args.per_class, args.size, args.work)
    train_cfg = OmegaConf.load(os.path.join(config_dir(), "config.yaml"))["train"]
    job = TrainJob(data=data, build_model=None, train=train_cfg)  # the default config: augmentation on
    plain = TrainJob(data=data, build_model=None, train={**OmegaConf.to_container(train_cfg), "augment": {
        "flip": False, "rotation": 0, "brightness": 0, "contrast": 0}})  # same pipeline, no augmentation
    model_cfg = OmegaConf.load(os.path.join(config_dir(), "model", f"{args.model}.yaml"))
    model_cfg = {k: v for k, v in OmegaConf.to_container(model_cfg).items() if k != "name"}
    n_train = data.sizes["train"]
    print(f"train split: {n_train} images {data.shape} at {data.split_url('train')}", flush=True)

    res = {"loader": loader_rate(job, args.batch, augment=False),
           "loader_augmented": loader_rate(job, args.batch, augment=True)}
    print("loader:", res["loader"], "\nloader + augmentation:", res["loader_augmented"], flush=True)

    x, y = loader.read_arrays(data.split_url("train"))
    x = x.astype("float32")
    fits = {
        "in-memory arrays": lambda: train_rate(job, model_cfg, data.shape, len(data.classes), (x, y), args.epochs,
                                               args.batch),
        "training loop (Petastorm -> tf.data)": lambda: train_rate(
            job, model_cfg, data.shape, len(data.classes), plain.dataset("train", True, args.batch), args.epochs,
            args.batch),
        "training loop + augmentation": lambda: train_rate(
            job, model_cfg, data.shape, len(data.classes), job.dataset("train", True, args.batch), args.epochs,
            args.batch),
    }
    for name, fn in fits.items():
        r = fn()
        steady = r["epoch_seconds"][1:] or r["epoch_seconds"]
        r["images_per_second"] = n_train / statistics.median(steady)
        res[name] = r
        print(f"{name}: {r['images_per_second']:.1f} img/s, epochs {[round(s, 1) for s in r['epoch_seconds']]}",
              flush=True)

    ceiling = res["in-memory arrays"]["images_per_second"]
    loop = res["training loop (Petastorm -> tf.data)"]["images_per_second"]
    rows = [
        ("loader alone (no augmentation)", res["loader"]["images_per_second"], res["loader"]["images_per_second"] / ceiling, "loader / in-memory training rate"),
        ("loader alone + augmentation", res["loader_augmented"]["images_per_second"], res["loader_augmented"]["images_per_second"] / ceiling, "loader / in-memory training rate"),
        (f"{args.model} from in-memory arrays", ceiling, 1.0, "the ceiling"),
        (f"{args.model} via Petastorm -> tf.data", loop, loop / ceiling, "of the in-memory rate"),
        (f"{args.model} via Petastorm -> tf.data + augmentation", res["training loop + augmentation"]["images_per_second"],
         res["training loop + augmentation"]["images_per_second"] / ceiling, "of the in-memory rate"),
    ]
    md = [f"## Input pipeline vs training rate ({args.model}, {data.shape}, batch {args.batch}, {n_train} train "
          f"images, {os.cpu_count()} cores)\n\n| measurement | images/s | ratio | ratio means |\n|---|---|---|---|\n"]
    md += [f"| {a} | {b:,.0f} | {c:.2f}x | {d} |\n" for a, b, c, d in rows]
    text = "".join(md)
    args.out = results_folder.folder(args)  # a temporary folder unless --save-results or --out
    (args.out / "loader.md").write_text(text)
    (args.out / "loader.json").write_text(json.dumps(res, indent=1))
    print("\n" + text)

    import mlflow

    mlflow.set_tracking_uri(args.uri)
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run -e bench_*` made the run (in its experiment): use it
        mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_id=os.environ.get("MLFLOW_RUN_ID"), run_name="bench-loader"):
        mlflow.log_params({"bench_model": args.model, "bench_image_size": args.size, "bench_batch": args.batch,
                           "bench_train_images": n_train, "bench_epochs": args.epochs})
        mlflow.log_metrics({"loader_images_per_second": res["loader"]["images_per_second"],
                            "loader_augmented_images_per_second": res["loader_augmented"]["images_per_second"],
                            "inmemory_images_per_second": ceiling, "loop_images_per_second": loop,
                            "loop_fraction_of_inmemory": loop / ceiling,
                            "loader_over_training": res["loader"]["images_per_second"] / ceiling})
        mlflow.log_artifact(str(args.out / "loader.md"))
        mlflow.log_artifact(str(args.out / "loader.json"))


if __name__ == "__main__":
    main()
