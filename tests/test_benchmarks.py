"""The speed benchmarks keep working: a tiny run of benchmarks/preprocess.py writes its table, plot and MLflow
run, and every path (the sequential loop, Spark local[1] and local[2]) writes the same number of rows; the backends
benchmark takes its data size, and results reach benchmarks/results/ only when asked (benchmarks/results_folder.py)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_folder  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def test_preprocess_benchmark_runs_every_path_and_logs(tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/m.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "preprocess.py"), "--brain", "", "--synthetic", "200",
         "--growth", "100", "200", "--cores", "1", "2", "--synthetic-root", str(tmp_path / "syn"),
         "--out", str(out), "--uri", uri], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "preprocess.json").read_text())
    raw = result["raw"]["synthetic 200"]
    assert raw["sequential"]["accepted"] == 200
    assert {k: v["accepted"] for k, v in raw["spark"].items()} == {"1": 200, "2": 200}
    assert [r["path"] for r in result["rows"]] == ["sequential PIL loop", "Spark local[1]", "Spark local[2]"]
    assert all(r["images/s"] > 0 for r in result["rows"])
    assert sorted(g["images"] for g in result["growth"]) == [100, 100, 200, 200]
    assert (out / "preprocess_growth.png").stat().st_size > 10_000
    assert "| synthetic 200 | 200 | Spark local[2] | 2 |" in (out / "preprocess.md").read_text()

    import mlflow

    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-bench-preprocess"], output_format="list")[0]
    assert run.data.metrics["synthetic_Spark_local2_images_per_second"] > 0
    assert "preprocess.md" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def parsed(*argv):
    ap = argparse.ArgumentParser()
    results_folder.add_arguments(ap)
    return ap.parse_args(list(argv))


def test_results_go_to_benchmarks_results_only_when_asked(tmp_path):
    default = results_folder.folder(parsed())
    assert default.is_dir() and not default.is_relative_to(ROOT)  # a temporary folder: the MLflow run gets the files
    for argv in (["--save-results"], ["--save-results", "true"], ["--save-results", "yes"]):
        assert parsed(*argv).save_results is True
    assert parsed("--save-results", "false").save_results is False  # what `-P save_results=false` passes
    assert results_folder.folder(parsed("--save-results", "true")) == ROOT / "benchmarks" / "results"
    assert results_folder.folder(parsed("--out", str(tmp_path / "o"), "--save-results")) == tmp_path / "o"
    with pytest.raises(SystemExit):
        parsed("--save-results", "maybe")


@pytest.mark.slow
def test_backends_benchmark_takes_the_data_size_and_keeps_committed_results(tmp_path):
    committed = {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("backends.*")}
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "backends.py"), "--backends", "single", "--epochs", "1",
         "--per-class", "8", "--image-size", "32", "--uri", uri, "--", f"paths.work_dir={tmp_path}/work",
         f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.run.dir={tmp_path}/outputs"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("backends.*")} == committed

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["medspark-bench-backends"], output_format="list")
    summary, = [r for r in runs if r.data.tags.get("medspark.bench") == "summary"]
    single, = [r for r in runs if r.data.tags.get("medspark.backend") == "single"]
    assert single.data.metrics["data_listed"] == 4 * 8 and single.data.params["preprocess.image_size"] == "32"
    assert summary.data.params["per_class"] == "8" and summary.data.params["save_results"] == "False"
    assert summary.data.metrics["single_test_accuracy"] == single.data.metrics["test_accuracy"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.info.run_id)}
    assert {"backends.md", "backends.png"} <= artifacts
    assert "| single |" in mlflow.artifacts.load_text(f"runs:/{summary.info.run_id}/backends.md")


@pytest.mark.slow
def test_time_to_accuracy_curves_table_and_resume(tmp_path):
    """Two recipes through the real pipeline: a curve point per epoch, the table with the reference first, each run
    kept as it ends, and --resume building the same table again from those without training anything."""
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/m.db"
    argv = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"),
            "--recipe", "ref=model=small_cnn", "--recipe", "new=model=res_cnn train.optimizer=adamw",
            "--seeds", "7", "--negative", "none", "--out", str(out), "--uri", uri, "--subset", "gliomas=/glioma/", "--",
            "dataset=synthetic", "dataset.generate.per_class=10", "dataset.generate.size=32",
            "preprocess.image_size=32", "train.epochs=2", "train.batch_size=8", f"paths.work_dir={tmp_path}/work",
            f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.run.dir={tmp_path}/outputs"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads((out / "time_to_accuracy_runs" / f"{n}-s7.json").read_text()) for n in ("ref", "new")]
    for r in results:
        assert [p["epoch"] for p in r["curve"]] == [1, 2]
        assert 0 < r["curve"][0]["minutes"] < r["curve"][1]["minutes"]
        assert 0.0 <= r["final"]["test_accuracy"] <= 1.0 and r["flops_per_image"] > 0 and r["params"] > 0
        assert set(r["final_tta"]) == {"flip", "flip_shift"}  # test-time augmentation on the same weights
        gliomas = r["final_subsets"]["gliomas"]  # the test images of one folder, scored alone
        assert 0 < gliomas["images"] < r["test_images"] and np.isnan(gliomas["recall_notumor"])  # none of the others
        assert gliomas["test_accuracy"] == pytest.approx(gliomas["recall_glioma"])
    assert results[1]["flops_per_image"] < results[0]["flops_per_image"]  # res_cnn: fewer multiply-adds at 32 px
    table = (out / "time_to_accuracy.md").read_text().splitlines()
    assert table[2].startswith("| ref | 1 |") and table[3].startswith("| new | 1 |")
    assert (out / "time_to_accuracy.png").stat().st_size > 10_000
    kept = sorted(p.name for p in (out / "time_to_accuracy_runs").iterdir())
    assert kept == ["new-s7.json", "ref-s7.json"]

    again = subprocess.run([*argv[:2], "--resume", *argv[2:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("reused") == 2 and "[time-to-accuracy] epoch" not in again.stdout
    assert (out / "time_to_accuracy.md").read_text().splitlines() == table

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["medspark-bench-time-to-accuracy"], output_format="list")
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("medspark.bench") == "time_to_accuracy") == [
        "tta-new-s7", "tta-ref-s7"]
    curve = mlflow.MlflowClient().get_metric_history(results[0]["run_id"], "curve_test_accuracy")
    assert [m.step for m in curve] == [1, 2]
    summaries = [r for r in runs if r.data.tags.get("medspark.bench") == "summary"]
    assert len(summaries) == 2  # the comparison and its resumed remake
    logged = mlflow.artifacts.load_dict(f"runs:/{summaries[0].info.run_id}/time_to_accuracy.json")
    assert [(r["recipe"], r["seed"]) for r in logged] == [("ref", 7), ("new", 7)]


@pytest.mark.slow
def test_train_speed_measures_each_variant_in_its_own_process_and_logs_them(tmp_path):
    """benchmarks/train_speed.py: one process per setting (thread pools are global), the model built as training
    builds it, images/s in the table, the JSON and the MLflow run."""
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/m.db"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--model", "res_cnn",
                           "--image-size", "32", "--batch-size", "8", "--variants", "default", "threads 1x1",
                           "--warmup", "2", "--steps", "3", "--repeats", "2", "--rounds", "1", "--out", str(out),
                           "--uri", uri],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "train_speed_res_cnn.json").read_text())
    assert [r["variant"] for r in rows] == ["default", "threads 1x1"]
    assert rows[1]["intra_threads"] == 1 and rows[1]["inter_threads"] == 1  # set in that process only
    assert all(len(r["images_per_s"]) == 2 and r["processes"] == 1 and r["median_images_per_s"] > 0 for r in rows)
    assert "| threads 1x1 | False | float32 | 1 x 1 |" in (out / "train_speed_res_cnn.md").read_text()
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-bench-train-speed"], output_format="list")[0]
    assert run.data.metrics["threads_1x1_images_per_s"] == pytest.approx(rows[1]["median_images_per_s"])
