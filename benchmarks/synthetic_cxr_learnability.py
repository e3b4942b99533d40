"""Is the synthetic chest X-ray set learnable? small_cnn with a sigmoid head, trained in memory on 2 CPU cores.

A standalone check of the data, independent of medspark's Spark/Petastorm pipeline: the set is generated and
listed exactly as `dataset=synthetic_cxr14` does (conf/dataset/synthetic_cxr14.yaml: the NIH layout read by the
LabelCsv source), the PNGs are read into memory, validation is carved by patient from train_val_list.txt, the test
split is test_list.txt (patient-level, like NIH's), and the result is per-finding ROC-AUC on the test split.

    python benchmarks/synthetic_cxr_learnability.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def load(root: Path, patients: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    from medspark.config import compose_project_config
    from medspark.data.sources import list_dataset
    from medspark.data.targets import multi_hot

    cfg = compose_project_config(["dataset=synthetic_cxr14", f"dataset.root={root}", f"seed={seed}",
                                  f"dataset.generate.patients={patients}", f"dataset.generate.size={size}"])
    t = time.perf_counter()
    listing = list_dataset(cfg.dataset)
    took = time.perf_counter() - t
    images = np.stack([np.asarray(Image.open(r.path), np.uint8) for r in listing.records])[..., None]
    targets = multi_hot([r.label for r in listing.records], len(listing.classes)).astype("float32")
    split = np.array([r.split or "train" for r in listing.records])
    patient = np.array([r.patient for r in listing.records])
    rng = np.random.default_rng(seed)  # validation: 10% of the training patients
    train_patients = np.unique(patient[split == "train"])
    val_patients = set(rng.choice(train_patients, max(1, len(train_patients) // 10), replace=False))
    split[[s == "train" and p in val_patients for s, p in zip(split, patient)]] = "val"
    return listing, images, targets, split, took


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/medspark_synthetic_cxr14", help="where the set is generated")
    ap.add_argument("--patients", type=int, default=700)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--filters", type=int, nargs="+", default=[32, 64, 128, 256], help="small_cnn's model.filters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for synthetic_cxr_learnability.json (default: print only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from medspark.models import small_cnn

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    t0 = time.perf_counter()
    listing, x, y, split, list_s = load(Path(args.root), args.patients, args.size, args.seed)
    data_s = time.perf_counter() - t0
    k = len(listing.classes)
    keras.utils.set_random_seed(args.seed)
    base = small_cnn.build((args.size, args.size, 1), k, filters=tuple(args.filters))
    head = keras.layers.Dense(k, activation="sigmoid", dtype="float32", name="findings")(
        base.get_layer("dropout").output)  # medspark's multilabel head: one sigmoid per finding
    model = keras.Model(base.input, head)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", metrics=[keras.metrics.AUC(multi_label=True)])
    part = {s: split == s for s in ("train", "val", "test")}
    flip = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=args.seed)])
    train = tf.data.Dataset.from_tensor_slices((x[part["train"]].astype("float32"), y[part["train"]]))
    train = train.shuffle(4096, seed=args.seed).batch(args.batch_size).map(lambda a, b: (flip(a, training=True), b))
    t1 = time.perf_counter()
    hist = model.fit(train, validation_data=(x[part["val"]].astype("float32"), y[part["val"]]), epochs=args.epochs,
                     verbose=2)  # a fixed number of epochs: the validation split is too small to stop on
    fit_s = time.perf_counter() - t1
    p = model.predict(x[part["test"]].astype("float32"), verbose=0)
    yt = y[part["test"]]
    auc = {c: round(float(roc_auc_score(yt[:, i], p[:, i])), 4) for i, c in enumerate(listing.classes)}
    result = {
        "command": "python benchmarks/synthetic_cxr_learnability.py " + " ".join(argv or sys.argv[1:]),
        "patients": args.patients, "images": int(len(x)), "size": args.size, "seed": args.seed,
        "filters": args.filters, "batch_size": args.batch_size,
        "sizes": {s: int(m.sum()) for s, m in part.items()},
        "test_positives": {c: int(yt[:, i].sum()) for i, c in enumerate(listing.classes)},
        "no_finding_share": round(float((y.sum(1) == 0).mean()), 3),
        "prevalence": {c: round(float(y[:, i].mean()), 3) for i, c in enumerate(listing.classes)},
        "rejected": len(listing.rejected), "ignored": len(listing.ignored),
        "epochs": len(hist.history["loss"]), "val_auc_last": round(float(hist.history["val_auc"][-1]), 4),
        "threads": args.threads,
        "test_auc": auc, "test_mean_auc": round(float(np.mean(list(auc.values()))), 4),
        "seconds": {"generate_and_list": round(list_s, 1), "generate_list_read": round(data_s, 1),
                    "fit": round(fit_s, 1)},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "synthetic_cxr_learnability.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
