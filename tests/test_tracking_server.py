"""A real MLflow tracking server (`mlflow server`, sqlite backend, proxied artifacts): a training pointed at it with
tracking.uri=http://... logs its run, registers its model, sets the champion alias, and uploads its artifacts
through the server (nothing on the client's disk), all readable back through the server's API."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient

from medspark.backends.placement import free_port

SMALL = ["dataset.generate.per_class=60", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.epochs=2", "train.batch_size=16", "cluster.cores=2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp}/server.db", "--artifacts-destination", str(tmp / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "tmp": tmp}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: its own session
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


PASSWORD = "S3rv3r@Pw"  # credentials in the URI ("@" unescaped, as users write them); this server ignores them


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("client")
    uri = server["url"].replace("http://", f"http://alice:{PASSWORD}@")
    res = subprocess.run([sys.executable, "-m", "medspark.train", *SMALL, f"paths.work_dir={work}/work",
                          f"tracking.uri='{uri}'", f"hydra.run.dir={work}/hydra"],
                         cwd=work, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return {"stdout": res.stdout, "stderr": res.stderr, "work": work}


@pytest.mark.slow
def test_a_training_against_a_tracking_server_logs_registers_and_promotes(server, trained):
    client = MlflowClient(tracking_uri=server["url"])
    exp = client.get_experiment_by_name("medspark-synthetic")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] > 0
    assert run.data.params["tracking.uri"] == server["url"].replace("http://", "http://alice:***@")

    (mv,) = client.search_model_versions("name = 'medspark-synthetic'")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id
    assert {k: str(v) for k, v in client.get_registered_model("medspark-synthetic").aliases.items()} == {"champion": "1"}
    assert client.get_model_version_by_alias("medspark-synthetic", "champion").run_id == run.info.run_id
    assert run.data.tags["medspark.champion"] == "promoted"
    assert "models:/medspark-synthetic/1" in trained["stdout"]

    # artifacts went through the server into --artifacts-destination, not onto the client's disk
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "evaluation", "config"} <= paths
    stored = [p for p in (server["tmp"] / "artifacts").rglob("summary.json")]
    assert stored, "summary.json is not under the server's --artifacts-destination"
    assert not list(trained["work"].rglob("mlartifacts")), "no artifact store beside the client"
    local = [p for p in trained["work"].rglob("summary.json") if "hydra" not in p.parts]  # the run folder's own copy
    assert not local, local


@pytest.mark.slow
def test_the_champion_loads_through_the_server(server, trained):
    import mlflow

    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server["url"])  # the registry follows it (no set_registry_uri: it leaks into env vars)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/medspark-synthetic@champion")
    finally:
        mlflow.set_tracking_uri(old)
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 1)).astype("float32")
    probs = np.asarray(pyfunc.predict(x))
    assert probs.shape == (3, 4) and np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_never_reach_output_or_the_store(server, trained):
    """The password is handed to MLflow in its own variables (not the URI), so MLflow's 'View run ... at:' line,
    medspark's summary and everything stored on the server are clean."""
    assert "View run" in trained["stdout"] + trained["stderr"], "MLflow's own line is what is checked here"
    for where, text in (("stdout", trained["stdout"]), ("stderr", trained["stderr"])):
        assert PASSWORD not in text and "S3rv3r" not in text, f"the password in clear in {where}"
    for f in server["tmp"].rglob("*"):
        if f.is_file():
            assert b"S3rv3r" not in f.read_bytes(), f"the password in clear in {f}"
