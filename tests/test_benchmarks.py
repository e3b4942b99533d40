"""The speed benchmarks keep working: a tiny run of benchmarks/preprocess.py writes its table, plot and MLflow
run, and every path (the sequential loop, Spark local[1] and local[2]) writes the same number of rows."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
