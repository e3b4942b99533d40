"""Patient leak on the chest X-ray set: how many patients an image-level split puts in train and test at once, and
what that does to the test metrics (issue 12, item 5); and what patient-level splitting costs at NIH scale.

    PYTHONPATH=src .venv/bin/python benchmarks/patient_leak.py              # (a) and (c): listing only, seconds
    PYTHONPATH=src .venv/bin/python benchmarks/patient_leak.py --train --epochs 8 --work /tmp/medspark-leak

(a) No Spark, no training: ../shared/datasets/chest-xray-pneumonia is listed as conf/dataset/chest_xray.yaml does,
with its test folder left out (dataset.split_dirs.test=null: val and test are carved from train/), every file
hashed, and split by the pipeline's own `materialize.plan_splits`, by image (dataset.patient_pattern=null) and by
patient (the shipped pattern), for several seeds: patients with images in train and test at once, and test images
whose patient has training images. Also: patients of the dataset's own test/ folder who have images in train/.
(b) --train: the same model and seed trained twice through the CLI, by image then by patient (one after the other),
each run's own test metrics, and both models scored by `medspark predict` on the same clean held-out images (the
test/ folder's images of patients without any image in train/); for the run split by image, its test accuracy
on images of patients seen in training and of unseen ones.
(c) `splits.assign` on an NIH-shaped listing (112,120 images of 30,805 patients, 14 findings): seconds, best of 3.
Writes --out/patient_leak.md and patient_leak.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHEST = ROOT.parent / "shared" / "datasets" / "chest-xray-pneumonia"
EXPERIMENT = "medspark-bench-patient-leak"
SPLIT = {"val": 0.15, "test": 0.15, "label_conflicts": "reject"}  # conf/config.yaml's split defaults


def listing(root: Path, by_patient: bool, test_folder: str | None = None):
    from omegaconf import OmegaConf

    from medspark.data.sources import list_dataset

    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "chest_xray.yaml")
    cfg.root, cfg.split_dirs.test = str(root), test_folder
    if not by_patient:
        cfg.patient_pattern = None
    return list_dataset(cfg)


def hashed(found) -> list[tuple]:
    """The hash pass's rows, as the Spark job makes them (the same function, here in one process)."""
    from medspark.data.tasks import hash_partition

    return list(hash_partition([(r.path, r.label, r.split) for r in found.records]))


def leak(report, patient_of: dict[str, str]) -> dict:
    """Patients in train and test at once (and in any two splits), test images whose patient has training images."""
    splits_of = defaultdict(set)
    for path, split in report.assignment.items():
        splits_of[patient_of[path]].add(split)
    train = {p for p, s in splits_of.items() if "train" in s}
    test_files = [p for p, s in report.assignment.items() if s == "test"]
    seen = sum(patient_of[p] in train for p in test_files)
    return {"patients_train_and_test": sum({"train", "test"} <= s for s in splits_of.values()),
            "patients_in_two_splits": sum(len(s) > 1 for s in splits_of.values()),
            "test_images": len(test_files), "test_images_of_training_patients": seen,
            "test_patients": report.patients["test"] or len({patient_of[p] for p in test_files}),
            "max_prevalence_diff": report.max_prevalence_diff}


def listing_part(root: Path, seeds: list[int]) -> dict:
    from medspark.data.materialize import plan_splits

    t = time.perf_counter()
    by_patient, naive = listing(root, True), listing(root, False)
    rows = hashed(by_patient)
    patient_of = {r.path: r.patient for r in by_patient.records}
    per_patient = Counter(patient_of.values())
    out = {"files": len(by_patient.records), "patients": len(per_patient),
           "images_per_patient": {"median": statistics.median(per_patient.values()), "max": max(per_patient.values()),
                                  "patients_with_2_or_more": sum(n > 1 for n in per_patient.values())},
           "matched": sum(r.patient is not None for r in by_patient.records), "seeds": {}}
    for seed in seeds:
        cfg = dict(SPLIT, seed=seed)
        out["seeds"][seed] = {"image": leak(plan_splits(rows, naive, cfg)[1], patient_of),
                              "patient": leak(plan_splits(rows, by_patient, cfg)[1], patient_of)}
    official = listing(root, True, "test")
    folder = defaultdict(set)
    for r in official.records:
        folder[r.patient].add(r.split or "train")
    shared = {p for p, s in folder.items() if len(s) > 1}
    out["official"] = {"test_folder_patients": sum("test" in s for s in folder.values()),
                       "also_in_train_folder": len(shared),
                       "their_train_images": sum(r.split is None and r.patient in shared for r in official.records),
                       "their_test_images": sum(r.split == "test" and r.patient in shared for r in official.records)}
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


# ---------------------------------------------------------------- (b) training

def train(args, name: str, by_patient: bool) -> None:
    cmd = [sys.executable, "-m", "medspark.train", "dataset=chest_xray", f"dataset.root={args.root}",
           "dataset.split_dirs.test=null", f"preprocess.image_size={args.image_size}", f"train.epochs={args.epochs}",
           f"seed={args.seed}", f"paths.work_dir={args.work}", f"tracking.uri={uri(args)}",
           f"tracking.experiment={EXPERIMENT}", "tracking.registered_model=null", f"tracking.run_name={name}",
           f"hydra.run.dir={args.work}/outputs/{name}", *([] if by_patient else ["dataset.patient_pattern=null"])]
    print(f"\n### {name}: {' '.join(cmd[3:])}", flush=True)
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        sys.exit(f"training run {name} failed")
    print(f"### {name}: {time.perf_counter() - t:.0f} s wall", flush=True)


def uri(args) -> str:
    return f"sqlite:///{args.work}/mlruns.db"


def last_run(args, name: str):
    import mlflow

    mlflow.set_tracking_uri(uri(args))
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.mlflow.runName = '{name}' and attributes.status = 'FINISHED'")
    if not runs:
        sys.exit(f"no finished run {name} in {uri(args)} (experiment {EXPERIMENT}): run with --train")
    return runs[0]


def predict(args, run, files: dict[str, list[tuple[str, int]]], classes: list[str]) -> dict[str, dict]:
    """Accuracy and AUC of a run's classifier on named sets of (path, label), through `medspark predict`."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from medspark.data.names import from_text

    folder = Path(args.work) / f"predict-{run.info.run_id}"
    label = {}
    for set_name, items in files.items():
        for path, y in items:
            link = folder / set_name / classes[y] / os.path.basename(path)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(path, link)
            label[str(link)] = (set_name, y)
    csv = folder / "predictions.csv"
    cmd = [sys.executable, "-m", "medspark", "predict", f"model=runs:/{run.info.run_id}/classifier",
           f"input={folder}", f"output={csv}", f"tracking_uri={uri(args)}"]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    out = pd.read_csv(csv)
    result = {}
    for set_name in files:
        rows = [(label[from_text(p)][1], c, pr) for p, c, pr in zip(out["path"], out["predicted_class"],
                                                                      out[f"prob_{classes[1]}"])
                if label.get(from_text(p), ("",))[0] == set_name]
        y = np.array([r[0] for r in rows])
        result[set_name] = {"n": len(rows), "accuracy": float(np.mean([classes[t] == c for t, c, _ in rows])),
                            "auc": float(roc_auc_score(y, [r[2] for r in rows])) if len(set(y)) == 2 else None}
    return result


def training_part(args) -> dict:
    from medspark.data.materialize import plan_splits

    if args.train:
        train(args, "leak-by-image", by_patient=False)
        train(args, "leak-by-patient", by_patient=True)
    by_patient, naive = listing(args.root, True), listing(args.root, False)
    patient_of = {r.path: r.patient for r in by_patient.records}
    official = listing(args.root, True, "test")
    train_patients = {r.patient for r in official.records if r.split is None}
    heldout = [(r.path, r.label) for r in official.records if r.split == "test" and r.patient not in train_patients]
    rows = hashed(by_patient)
    label_of = {r.path: r.label for r in by_patient.records}
    out = {}
    for name, found in (("leak-by-image", naive), ("leak-by-patient", by_patient)):
        run = last_run(args, name)
        m, p = run.data.metrics, run.data.params
        report = plan_splits(rows, found, dict(SPLIT, seed=int(args.seed)))[1]  # the run's split, recomputed
        assert report.sizes["test"] == int(m["data_n_test"]), "the recomputed split is not the run's"
        train_set = {patient_of[f] for f, s in report.assignment.items() if s == "train"}
        test = [(f, label_of[f]) for f, s in sorted(report.assignment.items()) if s == "test"]
        sets = {"heldout": heldout, "own_test_seen": [t for t in test if patient_of[t[0]] in train_set],
                "own_test_unseen": [t for t in test if patient_of[t[0]] not in train_set]}
        out[name] = {"run_id": run.info.run_id, "test_accuracy": m.get("test_accuracy"),
                     "test_auc": m.get("test_roc_auc_ovr", m.get("test_auc")), "epochs_run": m.get("epochs_run"),
                     "train_seconds": m.get("train_seconds"), "n_test": int(m["data_n_test"]),
                     "overrides": p.get("overrides", ""),
                     "predict": predict(args, run, {k: v for k, v in sets.items() if v}, by_patient.classes)}
    return out


# ---------------------------------------------------------------- (c) NIH scale

NIH_PREVALENCE = [0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022, 0.015, 0.030, 0.002]


def nih_shaped(n_images: int = 112_120, n_patients: int = 30_805, seed: int = 0):
    """Items shaped like NIH ChestX-ray14: 14 findings at the published prevalences, heavy-tailed images per
    patient (1 to 184, mean 3.6), findings that run in patients."""
    from medspark.data.splits import Item

    rng = np.random.default_rng(seed)
    sizes = np.minimum(1 + rng.negative_binomial(1, 1 / 3.64, n_patients), 184)
    while sizes.sum() != n_images:  # exactly n_images: add to / take from random patients, each keeping one
        step = np.sign(n_images - sizes.sum())
        pick = rng.choice(np.flatnonzero(sizes > 1) if step < 0 else n_patients, abs(n_images - sizes.sum()))
        np.add.at(sizes, pick, step)
        sizes = np.clip(sizes, 1, 184)
    pid = np.repeat(np.arange(n_patients), sizes)
    risk = rng.gamma(0.5, 2.0, n_patients)[pid]
    pos = rng.random((len(pid), 14)) < np.minimum(np.array(NIH_PREVALENCE) * risk[:, None], 0.95)
    labels = (pos * (1 << np.arange(14))).sum(1)
    return [Item(f"/nih/{i:08d}.png", int(labels[i]), f"h{i}", None, f"p{pid[i]}") for i in range(len(pid))]


def scale_part() -> dict:
    from medspark.data.splits import assign

    items = nih_shaped()
    out = {"images": len(items), "patients": len({it.patient for it in items})}
    findings = [f"f{i}" for i in range(14)]
    for task, its, classes in (("multilabel", items, findings),
                               ("binary", [it._replace(label=int(it.label > 0)) for it in items], ["no", "any"])):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            rep = assign(its, classes, 0.1, 0.2, seed=0, task=task)
            times.append(time.perf_counter() - t)
        out[task] = {"seconds": round(min(times), 2), "max_prevalence_diff": rep.max_prevalence_diff,
                     "sizes": rep.sizes, "patients": rep.patients}
    return out


# ---------------------------------------------------------------- report

def se(p: float, n: int) -> float:
    """The binomial standard error of an accuracy p measured on n images: the noise two runs' figures share."""
    return (p * (1 - p) / n) ** 0.5


def markdown(args, a: dict, b: dict | None, c: dict) -> str:
    cmd = "PYTHONPATH=src .venv/bin/python benchmarks/patient_leak.py --seeds " + " ".join(map(str, args.seeds))
    if b:  # the command that trains the runs reported (--report-training rewrites the report from them)
        cmd += f" --train --epochs {args.epochs} --image-size {args.image_size} --seed {args.seed} --work {args.work}"
    lines = [f"## Patient leak: chest X-ray pneumonia (Kermany), split by image vs by patient\n",
             f"Command: `{cmd}` (machine: {os.cpu_count()} cores)\n",
             f"Listing: {a['files']} files in train/, {a['matched']} matched by the shipped dataset.patient_pattern, "
             f"{a['patients']} patients, {a['images_per_patient']['patients_with_2_or_more']} with 2 or more images "
             f"(median {a['images_per_patient']['median']}, max {a['images_per_patient']['max']}). Split: "
             f"val {SPLIT['val']}, test {SPLIT['test']}, both carved from train/ (dataset.split_dirs.test=null).\n",
             "| seed | split by | patients in train and test | patients in two splits | test images | test images "
             "of training patients | largest prevalence diff |", "|---|---|---|---|---|---|---|"]
    for seed, by in a["seeds"].items():
        for kind in ("image", "patient"):
            r = by[kind]
            lines.append(f"| {seed} | {kind} | {r['patients_train_and_test']} | {r['patients_in_two_splits']} | "
                         f"{r['test_images']} | {r['test_images_of_training_patients']} "
                         f"({r['test_images_of_training_patients'] / r['test_images']:.0%}) | "
                         f"{r['max_prevalence_diff']:.4f} |")
    o = a["official"]
    lines.append(f"\nThe dataset's own split: {o['also_in_train_folder']} of the {o['test_folder_patients']} patients "
                 f"of test/ also have images in train/ ({o['their_train_images']} train images, "
                 f"{o['their_test_images']} test images); with the shipped pattern and split_dirs.test=test, those "
                 f"train images go to test (`moved_to_test`).\n")
    if b:
        lines += ["### Training: same model and seed, split by image vs by patient\n",
                  f"Each run: `python -m medspark.train {b['leak-by-image']['overrides']}` (the patient run without "
                  f"`dataset.patient_pattern=null`). `held-out` = the test/ folder's images of patients with no image "
                  f"in train/, scored by `medspark predict` with each run's classifier.\n",
                  "| split by | epochs | own test n | own test accuracy (± s.e.) | own test AUC | own test acc., seen "
                  "patients (n) | own test acc., unseen patients (n) | held-out accuracy (n) | held-out AUC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in b.items():
            p = r["predict"]
            cell = lambda k: f"{p[k]['accuracy']:.3f} ({p[k]['n']})" if k in p else "- (0)"  # noqa: E731
            lines.append(f"| {name.split('-')[-1]} | {r['epochs_run']:.0f} | {r['n_test']} | "
                         f"{r['test_accuracy']:.3f} (± {se(r['test_accuracy'], r['n_test']):.3f}) | "
                         f"{r['test_auc']:.3f} | {cell('own_test_seen')} | "
                         f"{cell('own_test_unseen')} | {cell('heldout')} | {p['heldout']['auc']:.3f} |")
        naive = b["leak-by-image"]["predict"]
        if "own_test_seen" in naive and "own_test_unseen" in naive:
            seen, unseen = naive["own_test_seen"], naive["own_test_unseen"]
            diff_se = (se(seen["accuracy"], seen["n"]) ** 2 + se(unseen["accuracy"], unseen["n"]) ** 2) ** 0.5
            gap = b["leak-by-image"]["test_accuracy"] - b["leak-by-patient"]["test_accuracy"]
            lines.append(f"\nSplit by image, test images of patients seen in training vs unseen: accuracy "
                         f"{seen['accuracy'] - unseen['accuracy']:+.3f} (s.e. of the difference {diff_se:.3f}); own "
                         f"test accuracy by image minus by patient: {gap:+.3f}.")
    lines += ["\n### `splits.assign` at NIH ChestX-ray14 scale (NIH-shaped synthetic listing)\n",
              f"{c['images']} images, {c['patients']} patients, val 0.1, test 0.2; best of 3 on this machine.\n",
              "| task | seconds | largest prevalence diff | sizes | patients per split |", "|---|---|---|---|---|"]
    for task in ("multilabel", "binary"):
        r = c[task]
        lines.append(f"| {task} | {r['seconds']} | {r['max_prevalence_diff']:.4f} | {r['sizes']} | {r['patients']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=CHEST)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3])
    ap.add_argument("--train", action="store_true", help="train the two runs (else: report runs already in --work)")
    ap.add_argument("--report-training", action="store_true", help="report the runs in --work without training")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medspark-patient-leak"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.root = args.root.resolve()
    if not args.root.is_dir():
        sys.exit(f"{args.root} not found: pass --root /path/to/chest-xray-pneumonia")
    a = listing_part(args.root, args.seeds)
    b = training_part(args) if args.train or args.report_training else None
    c = scale_part()
    md = markdown(args, a, b, c)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "patient_leak.md").write_text(md)
    (args.out / "patient_leak.json").write_text(json.dumps({"listing": a, "training": b, "nih_scale": c}, indent=1,
                                                           default=str))
    print(md)


if __name__ == "__main__":
    main()
