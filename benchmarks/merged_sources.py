"""A dataset merged from two public brain MRI sets: what each source brings, and how many images they share.

    .venv/bin/python benchmarks/merged_sources.py            # ../shared/datasets, results/merged_sources.md
    .venv/bin/python benchmarks/merged_sources.py --train    # + a short training run through the CLI

Lists conf/dataset/brain_tumor_binary_merged.yaml exactly as a run does (the Merged source over
brain-tumor-mri/Training and brain-mri-yes-no), then hashes every listed file with the content hash the data
stage uses (SHA-1 of the file's bytes, data/preprocess.content_hash) and counts: files per source and class
(the source's own and the mapped ones), files dropped as unmapped, duplicate contents within each source and
across sources (a content present in both; also whether the copies carry different mapped labels). --train runs
`medspark dataset=brain_tumor_binary_merged` for a few epochs at a small image size and reports the test metrics
per source from the run's MLflow metrics. Written to --out/merged_sources.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DATASET = "brain_tumor_binary_merged"


def roots(shared: Path) -> list[str]:
    return [f"dataset.sources.brain_tumor_mri.root={shared / 'brain-tumor-mri' / 'Training'}",
            f"dataset.sources.brain_mri_yes_no.root={shared / 'brain-mri-yes-no'}"]


def measure(shared: Path) -> dict:
    """The merged listing's counts and the duplicate contents within and across its sources."""
    from medspark.config import compose_project_config
    from medspark.data.preprocess import Rejected, content_hash, read_bytes
    from medspark.data.sources import source
    from medspark.data.sources.merged import counts_per_source, dropped_per_source, merge

    cfg = compose_project_config([f"dataset={DATASET}", *roots(shared)])
    merged_source = source(cfg.dataset)
    t = time.perf_counter()
    parts = [(name, class_map, src.list()) for name, class_map, src in merged_source.parts]
    listing = merge(parts, merged_source.classes)
    list_seconds = time.perf_counter() - t
    own = {name: lst.counts() for name, _, lst in parts}
    maps = {name: class_map for name, class_map, _ in parts}

    t = time.perf_counter()
    contents: dict[str, list] = defaultdict(list)  # sha1 -> [record]
    unreadable = []
    for r in listing.records:
        try:
            contents[content_hash(read_bytes(r.path))].append(r)
        except Rejected as e:
            unreadable.append((r.path, str(e)))
    hash_seconds = time.perf_counter() - t

    names = [name for name, _, _ in parts]
    within = {}
    for name in names:
        copies = [sum(r.source == name for r in rs) for rs in contents.values()]
        within[name] = {"contents_with_copies": sum(c > 1 for c in copies),
                        "files_beyond_first": sum(c - 1 for c in copies if c > 1),
                        "distinct_contents": sum(c > 0 for c in copies)}
    across = [rs for rs in contents.values() if len({r.source for r in rs}) > 1]
    own_class = {r.path: f"{name}/{lst.classes[r.label]}" for name, _, lst in parts for r in lst.records}
    labels = Counter(tuple(sorted({f"{own_class[r.path]} -> {listing.classes[r.label]}" for r in rs}))
                     for rs in across)
    return {
        "command": " ".join(["medspark", f"dataset={DATASET}", *[a.replace(str(shared), "../shared/datasets")
                                                                 for a in roots(shared)]]),
        "sources": names, "classes": listing.classes, "class_maps": maps,
        "listed_per_source": {name: len(lst.records) for name, _, lst in parts},
        "source_class_counts": own,
        "merged_class_counts": counts_per_source(listing),
        "merged_total": len(listing.records),
        "dropped_unmapped": {name: dropped_per_source(listing).get(name, 0) for name in names},
        "ignored": len(listing.ignored), "rejected_by_sources": len(listing.rejected),
        "unreadable": len(unreadable),
        "distinct_contents": len(contents),
        "within_source": within,
        "across_sources": {"contents_in_both": len(across),
                           "files": sum(len(rs) for rs in across),
                           "files_per_source": {name: sum(r.source == name for rs in across for r in rs)
                                                for name in names},
                           "by_classes": {" + ".join(k): v for k, v in sorted(labels.items())}},
        "seconds": {"list": round(list_seconds, 2), "hash": round(hash_seconds, 2)},
    }


def train(shared: Path, epochs: int, image_size: int) -> dict:
    """One short run of the merged set through the CLI, in a scratch MLflow store: its test metrics, pooled and per
    source (the run's own `test_source_*` metrics when evaluate_split logs them, else computed here the same way,
    evaluate_sources.per_source, from the run's logged model on its test split)."""
    import mlflow
    import numpy as np

    from medspark.data import loader
    from medspark.evaluate_sources import flat, per_source

    tmp = Path(tempfile.mkdtemp(prefix="medspark-merged-"))
    uri = f"sqlite:///{tmp}/mlruns.db"
    args = [f"dataset={DATASET}", *roots(shared), f"train.epochs={epochs}", f"preprocess.image_size={image_size}",
            f"paths.work_dir={tmp}/work", f"tracking.uri={uri}", f"tracking.artifact_location={tmp}/artifacts",
            "tracking.experiment=medspark-bench-merged", f"hydra.run.dir={tmp}/outputs"]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medspark.train", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-bench-merged"], output_format="list")[0]
    metrics = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("test_", "data_"))}
    splits = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/splits.json"))
    by = "the run (evaluate_split)"
    if not any(k.startswith("test_source_") for k in metrics):
        by = "this script, from the run's logged model (evaluate_split does not log them yet)"
        model = mlflow.tensorflow.load_model(f"runs:/{run.info.run_id}/model")
        test = loader.read_split(run.data.params["data_url"] + "/test", ["image", "label", "source"])
        probs = model.predict(test["image"].astype(np.float32), batch_size=128, verbose=0)
        classes = run.data.params["classes"].split(",")
        metrics.update(flat(per_source(test["label"], probs, test["source"], classes)))
    return {"command": " ".join(["medspark", *[a.replace(str(shared), "../shared/datasets") for a in args
                                               if not a.startswith(("paths.", "tracking.", "hydra."))]]),
            "seconds": round(seconds, 1), "metrics": metrics, "splits": splits, "per_source_by": by}


def markdown(m: dict, run: dict | None) -> str:
    names, classes = m["sources"], m["classes"]
    out = ["# A binary tumour / no-tumour set merged from two public brain MRI sets", "",
           "```bash", ".venv/bin/python benchmarks/merged_sources.py" + (" --train" if run else ""), "```", "",
           f"The listing is the one `{m['command']}` makes; every listed file is hashed with the data stage's "
           "content hash (SHA-1 of the file's bytes).", "",
           "## Per source", "",
           "| source | its class | files | mapped to |", "|---|---|---|---|"]
    for name in names:
        for cls, n in m["source_class_counts"][name].items():
            out.append(f"| {name} | {cls} | {n} | {m['class_maps'][name].get(cls, '(dropped)')} |")
    out += ["", "| source | listed | dropped (unmapped) | " + " | ".join(classes) + " | merged |",
            "|---|---|---|" + "---|" * len(classes) + "---|"]
    for name in names:
        counts = m["merged_class_counts"][name]
        out.append(f"| {name} | {m['listed_per_source'][name]} | {m['dropped_unmapped'][name]} | "
                   + " | ".join(str(counts[c]) for c in classes) + f" | {sum(counts.values())} |")
    out += ["", f"Merged: {m['merged_total']} files, {m['distinct_contents']} distinct contents; ignored "
            f"{m['ignored']}, refused by the sources {m['rejected_by_sources']}, unreadable {m['unreadable']}.", "",
            "## Duplicate contents", "",
            "| where | contents with copies | files beyond the first copy | distinct contents |", "|---|---|---|---|"]
    for name in names:
        w = m["within_source"][name]
        out.append(f"| within {name} | {w['contents_with_copies']} | {w['files_beyond_first']} | "
                   f"{w['distinct_contents']} |")
    a = m["across_sources"]
    out += ["", f"Across sources: {a['contents_in_both']} content(s) are in more than one source "
            f"({a['files']} files: " + ", ".join(f"{n} {k}" for k, n in a["files_per_source"].items()) + ")"
            + ". The split groups them like copies within one source (one content, one split; one content "
            "under two classes is rejected by default, split.label_conflicts).", "",
            "| classes of the copies (source/class -> mapped) | contents |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in a["by_classes"].items()]
    out += ["",
            f"Listing took {m['seconds']['list']} s, hashing {m['seconds']['hash']} s (one process)."]
    if run:
        metrics = run["metrics"]
        out += ["", "## A short training run", "", "```bash", run["command"], "```", "",
                f"{run['seconds']} s in all on this machine (2 shared CPU cores). Images per split and source: "
                f"{run['splits'].get('per_source')}; per-source metrics by {run['per_source_by']}.", "",
                "| test metric | all | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for metric in ("n", "accuracy", "balanced_accuracy", "roc_auc"):
            pooled = metrics.get("test_roc_auc_ovr" if metric == "roc_auc" else f"test_{metric}")
            cells = [metrics.get(f"test_source_{name}_{metric}") for name in names]
            out.append(f"| {metric} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in [pooled, *cells])
                       + " |")
        out += ["", "Data-stage metrics of the run: " + ", ".join(f"{k}={v:g}" for k, v in metrics.items()
                                                                 if k.startswith("data_"))]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=SHARED, help="the folder holding the two datasets")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--train", action="store_true", help="also run a short training of the merged set")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args(argv)
    m = measure(a.shared)
    run = train(a.shared, a.epochs, a.image_size) if a.train else None
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "merged_sources.json").write_text(json.dumps({"listing": m, "train": run}, indent=1))
    (a.out / "merged_sources.md").write_text(markdown(m, run))
    print(markdown(m, run))


if __name__ == "__main__":
    main()
