"""Does Grad-CAM point at the lesion? The pointing game on the synthetic phantoms, whose lesion masks are known.

A small_cnn (conf/model/small_cnn.yaml's builder and defaults; Adam 1e-3 with cosine decay, no augmentation) is
trained in memory on generated phantoms (the PNGs
`dataset=synthetic` writes, read back as files); on held-out phantoms (the last `--test-fraction` of each class's
files, never trained on) every correctly classified tumour image is explained for its true class with Grad-CAM and
Grad-CAM++ at the last conv block, and counts as a hit when the map's peak lies inside the lesion mask
(data.synthetic.lesion_mask, resized to the input and dilated by explain.POINTING_DILATE of the side). Chance is the
masks' share of the image (reported as `mask_fraction`).

    python benchmarks/pointing_game.py --out benchmarks/results     (about 2 minutes on 2 CPU cores)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/medspark_pointing_game", help="where the phantoms are generated")
    ap.add_argument("--per-class", type=int, default=300, help="phantoms per class (train + test)")
    ap.add_argument("--size", type=int, default=64, help="generated side = model input side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for pointing_game.json and .md (default: print only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from medspark import explain
    from medspark.data import synthetic
    from medspark.models import small_cnn

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    t0 = time.perf_counter()
    root = Path(synthetic.generate(args.root, per_class=args.per_class, size=args.size, seed=args.seed))
    paths = [p for c in synthetic.CLASSES for p in sorted((root / c).glob("*.png"))]
    images = np.stack([np.asarray(Image.open(p), np.uint8) for p in paths])[..., None].astype(np.float32)
    labels = np.array([synthetic.CLASSES.index(p.parent.name) for p in paths])
    index = np.array([int(p.stem.rsplit("_", 1)[1]) for p in paths])
    test = index >= round(args.per_class * (1 - args.test_fraction))
    generated = time.perf_counter() - t0

    model = small_cnn.build(images.shape[1:], len(synthetic.CLASSES))
    steps = args.epochs * -(-int((~test).sum()) // args.batch_size)  # cosine to 0: the last epoch's weights settle
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t1 = time.perf_counter()
    model.fit(images[~test], labels[~test], epochs=args.epochs, batch_size=args.batch_size, shuffle=True, verbose=2,
              validation_data=(images[test], labels[test]))  # shown, never used to choose anything
    trained = time.perf_counter() - t1
    probs = model.predict(images[test], batch_size=128, verbose=0)
    accuracy = float((probs.argmax(1) == labels[test]).mean())

    tumour = np.flatnonzero(test & (labels != synthetic.CLASSES.index("notumor")))
    correct = tumour[probs[np.searchsorted(np.flatnonzero(test), tumour)].argmax(1) == labels[tumour]]
    masks = np.stack([explain.input_mask(*synthetic.generated_file(paths[i]), side=args.size) for i in correct])
    raw = np.stack([synthetic.lesion_mask(*synthetic.generated_file(paths[i])) for i in correct])
    result = {"per_class": args.per_class, "size": args.size, "seed": args.seed, "epochs": args.epochs,
              "test_images": int(test.sum()), "test_accuracy": round(accuracy, 4),
              "correct_tumour_images": int(len(correct)), "dilate_px": round(args.size * explain.POINTING_DILATE),
              "mask_fraction": round(float(masks.mean()), 4), "mask_fraction_undilated": round(float(raw.mean()), 4),
              "generate_s": round(generated, 1), "train_s": round(trained, 1)}
    for method in explain.METHODS:
        cam = explain.GradCam(model, method)
        t2 = time.perf_counter()
        maps, _ = cam(images[correct], labels[correct])
        hits = explain.pointing_hits(maps, masks)
        strict = explain.pointing_hits(maps, raw)
        result[method] = {"layer": cam.layer_name, "pointing_game": round(float(hits.mean()), 4),
                          "pointing_game_undilated": round(float(strict.mean()), 4),
                          "per_class": {c: round(float(hits[labels[correct] == i].mean()), 4)
                                        for i, c in enumerate(synthetic.CLASSES) if (labels[correct] == i).any()},
                          "seconds_per_image": round((time.perf_counter() - t2) / len(correct), 4)}
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pointing_game.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = ["| method | layer | pointing game (dilated) | undilated | per class |", "|---|---|---|---|---|"]
        for method in explain.METHODS:
            r = result[method]
            per = ", ".join(f"{c} {v:.2f}" for c, v in r["per_class"].items())
            lines.append(f"| {method} | {r['layer']} | {r['pointing_game']:.3f} | {r['pointing_game_undilated']:.3f}"
                         f" | {per} |")
        (out / "pointing_game.md").write_text(
            f"Pointing game, small_cnn on {args.per_class} phantoms/class at {args.size} px, {args.epochs} epochs: "
            f"test accuracy {accuracy:.3f}, {len(correct)} correct tumour images, masks dilated "
            f"{result['dilate_px']} px (chance = mask share {result['mask_fraction']:.3f}).\n\n"
            + "\n".join(lines) + f"\n\n`python benchmarks/pointing_game.py --per-class {args.per_class} "
            f"--size {args.size} --epochs {args.epochs} --seed {args.seed} --out {args.out}`\n")


if __name__ == "__main__":
    main()
