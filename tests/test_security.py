"""Security basics (docs/SECURITY.md): secrets never reach MLflow in clear, the servers medspark starts listen on
loopback unless configured otherwise, and what medspark's own processes hand each other is data, not pickles."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from medspark import tracking
from conftest import REPO, make_cfg

SECRETS = ["hunter2", "t0k3n", "s3cr3t", "AKIAXYZ", "cr3d", "hunter4", "hunter5", "pa55"]
# one per secret word (password, token, secret, key, credential), nested, in a list, in a URL, in a Hydra dict
SECRET_OVERRIDES = ["+db.password=hunter2", "+api_token=t0k3n", "+s3={client_secret: s3cr3t}",
                    "+aws.access_key=AKIAXYZ", "+service={credentials: {user: bob, pw: cr3d}}",
                    "+remote.uri=https://bob:pa55@mlflow.example.org:5000",
                    "+hosts=[{name: a, auth_token: t0k3n}]",
                    "++cluster.conf={spark.hadoop.fs.s3a.secret.key: s3cr3t}"]


def test_masking_covers_every_secret_word_nesting_lists_urls_and_text():
    flat = tracking.mask_secrets(tracking.flatten({
        "db": {"password": "hunter2", "passwd": "hunter2", "user": "bob"}, "api_token": "t0k3n",
        "client_secret": "s3cr3t", "aws": {"access_key": "AKIAXYZ"}, "service": {"credentials": {"pw": "cr3d"}},
        "list": [{"auth_token": "t0k3n"}, "s3a://AK:s3cr3t@bucket/x"], "monitor": "val_loss", "empty_token": None,
        "uri": "https://bob:pa55@mlflow.example.org:5000/path"}))
    assert not any(s in str(flat) for s in SECRETS), flat
    assert flat["db.user"] == "bob" and flat["monitor"] == "val_loss" and flat["empty_token"] is None
    assert flat["service.credentials.pw"] == "***", "a secret word anywhere in the key path"
    assert flat["uri"] == "https://bob:***@mlflow.example.org:5000/path"
    nested = tracking.mask_nested({"service": {"credentials": {"user": "bob", "pw": "cr3d"}}, "a": {"b": "x"}})
    assert nested == {"service": {"credentials": "***"}, "a": {"b": "x"}}
    text = tracking.mask_text(" ".join(SECRET_OVERRIDES) + " model=dense KeyError: 'key'")
    assert not any(s in text for s in SECRETS), text
    assert "model=dense" in text and "KeyError: 'key'" in text and "https://bob:***@mlflow.example.org:5000" in text


# the leaks a hostile review found (issue 16): other secret words, HTTP auth headers, a token as URL user, passwords
# with '/' or '@', Azure SAS signatures; each string must vanish from params, tags, artifacts and printed text
MORE_SECRETS = {"+db.pwd=pwdleak1": "pwdleak1", "+ssh.passphrase=phraseleak2": "phraseleak2",
                "+http.auth='Bearer bearerleak3xyz'": "bearerleak3xyz",
                "+headers={Authorization: 'Basic YmFzaWNsZWFrNA=='}": "YmFzaWNsZWFrNA",
                "+git.url=https://tokenleak5@github.com/x.git": "tokenleak5",
                "+remote.a='https://bob:slash/leak6@host.example.org/p'": "leak6",
                "+remote.b='https://bob:at@leak7@host.example.org/p'": "leak7",
                "+blob='https://acct.blob.core.windows.net/c/f?sv=2020-01&sig=sasleak8%2Bx&se=2030'": "sasleak8"}


def test_masking_covers_the_leaks_of_the_hostile_review(tmp_path):
    text = tracking.mask_text(" ".join(MORE_SECRETS) + " Authorization: Basic YmFzaWNsZWFrNA== model=dense")
    assert not [s for s in MORE_SECRETS.values() if s in text], text
    assert "model=dense" in text and "https://***@github.com/x.git" in text
    cfg = make_cfg(tmp_path, list(MORE_SECRETS))
    tracking.configure(cfg.tracking)
    with tracking.run("more-secrets", {"medspark.overrides": " ".join(MORE_SECRETS)}):
        tracking.log_config(cfg, list(MORE_SECRETS))
    store = [f for f in tmp_path.rglob("*") if f.is_file() and "work" not in f.parts]  # sqlite db + artifacts
    assert any(f.suffix == ".db" for f in store)
    leaked = {f.name: [s for s in MORE_SECRETS.values() if s.encode() in f.read_bytes()] for f in store}
    assert not any(leaked.values()), leaked


def test_nothing_secret_reaches_mlflow_in_clear(tmp_path):
    """Through a real MLflow run: params (the flattened config and the override string), the resolved config
    artifact, the tags train() sets (the command line among them), and the error and traceback of a failure."""
    from medspark.pipeline import run_tags

    cfg = make_cfg(tmp_path, SECRET_OVERRIDES)
    tracking.configure(cfg.tracking)
    with pytest.raises(RuntimeError):
        with tracking.run("secrets", run_tags(cfg, SECRET_OVERRIDES)):
            tracking.log_config(cfg, SECRET_OVERRIDES)
            raise RuntimeError("cannot reach https://bob:hunter4@mlflow.example.org (password=hunter5)")
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    p, tags = run.data.params, run.data.tags
    assert run.info.status == "FAILED"
    assert p["db.password"] == "***" and p["api_token"] == "***" and p["aws.access_key"] == "***"
    assert p["remote.uri"] == "https://bob:***@mlflow.example.org:5000" and p["db.password"] == "***"
    resolved = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/resolved.yaml")
    traceback = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error/traceback.txt")
    assert "password: '***'" in resolved and "credentials: '***'" in resolved
    assert "https://bob:***@mlflow.example.org" in tags["error"] and "password=***" in tags["error"]
    assert "db.password=***" in tags["medspark.overrides"] and "db.password=***" in p["overrides"]
    for where, text in {"params": str(p), "tags": str(tags), "config/resolved.yaml": resolved,
                        "error/traceback.txt": traceback}.items():
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{leaked} in clear in {where}"


# ---------------------------------------------------------------- servers listen on loopback

def test_project_commands_and_configs_bind_loopback():
    """`make ui` and the tests' servers say 127.0.0.1; nothing medspark ships binds every interface by itself
    (docs/mlflow.md's shared `mlflow server --host 0.0.0.0` is an explicit example for a server machine)."""
    assert re.search(r"mlflow ui .*--host 127\.0\.0\.1", (REPO / "Makefile").read_text())
    every = re.compile(r"[\"']0\.0\.0\.0[\"']|(--host|-h|host=|bind_host:)\s*0\.0\.0\.0")  # a bind, not prose
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), REPO / "Makefile",
                 REPO / "MLproject"]:
        assert not every.search(path.read_text()), f"{path} binds every interface"
    for test in ("test_tracking_server.py", "test_predict.py"):
        text = (REPO / "tests" / test).read_text()
        assert "127.0.0.1" in text and "0.0.0.0" not in text, test
    local = (REPO / "conf" / "cluster" / "local.yaml").read_text()
    assert "spark.driver.bindAddress: 127.0.0.1" in local


class FakeSpark:
    def __init__(self, master, driver_host=None):
        self.sparkContext = type("SC", (), {"master": master})()
        self.conf = type("Conf", (), {"get": staticmethod(lambda k, d=None: driver_host if k ==
                                                          "spark.driver.host" else d)})()


def test_parameter_server_address_rules():
    from medspark.backends.elephas_async import ElephasAsync

    assert ElephasAsync().hosts(FakeSpark("local[2]", "10.1.2.3")) == ("127.0.0.1", "127.0.0.1")
    assert ElephasAsync().hosts(FakeSpark("spark://head:7077", "10.1.2.3")) == ("10.1.2.3", "10.1.2.3")
    assert ElephasAsync(bind_host="0.0.0.0", advertise_host="gw.example.org").hosts(
        FakeSpark("yarn", "10.1.2.3")) == ("0.0.0.0", "gw.example.org"), "configured otherwise: as configured"


def listening() -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every TCP socket listening in this process and its descendants."""
    import psutil

    out = set()
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            for c in proc.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port, proc.name()))
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_elephas_parameter_server_listens_on_loopback_only(spark, tmp_path):
    """A real elephas_async run on local[2]: while it trains, the parameter server (backends/param_server.py, a
    thread of the driver) and every other socket our process tree opens listen on 127.0.0.1."""
    from medspark.train import train

    before = listening()
    seen: set = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(listening() - before)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cfg = make_cfg(tmp_path, ["backend=elephas_async", "dataset.generate.per_class=40", "dataset.generate.size=48",
                                  "preprocess.image_size=32", "train.epochs=2", "train.batch_size=8",
                                  "model=dense", "train.verbose=0"])
        train(cfg, overrides=["backend=elephas_async"], spark=spark)
    finally:
        stop.set()
        watcher.join(5)
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    host, port = run.data.params["backend_server"].rsplit(":", 1)
    assert host == "127.0.0.1"
    server = {(ip, p) for ip, p, _ in seen if p == int(port)}
    assert server == {("127.0.0.1", int(port))}, f"parameter server listening on {server or 'nothing seen'}"
    public = {s for s in seen if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not public, f"listening beyond loopback during training: {public}"
    assert run.data.metrics["ps_updates"] > 0


@pytest.mark.slow
def test_tensorflow_grpc_servers_listen_on_every_interface_known_limitation(tmp_path):
    """spark_barrier's MultiWorkerMirroredStrategy workers: TensorFlow's gRPC server listens on every interface
    whatever address the cluster spec gives (grpc_server_lib.cc hard-codes it; there is no option). Recorded
    here so that docs/SECURITY.md is revisited the day TensorFlow changes it."""
    import json
    import subprocess
    import sys

    script = (
        "import json, psutil, socket, tensorflow as tf\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "tf.distribute.Server(tf.train.ClusterSpec({'worker': [f'127.0.0.1:{port}']}), job_name='worker',\n"
        "                     task_index=0, start=True)\n"
        "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('tcp')\n"
        "                  if c.status == 'LISTEN' and c.laddr.port == port]))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ips = json.loads(res.stdout.strip().splitlines()[-1])
    assert ips and set(ips) <= {"0.0.0.0", "::"}, f"TensorFlow now binds {ips}: update docs/SECURITY.md"


# ---------------------------------------------------------------- no pickles between our own processes

def test_barrier_results_travel_as_arrays_and_json_not_pickles():
    from medspark.backends.api import dump_result, load_result

    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0,), np.float64), np.int64(7)]
    out = load_result(dump_result({"weights": weights, "history": {"loss": [1.5, 1.0]}, "fit_seconds": 2.5,
                                   "addresses": ["127.0.0.1:1"], "threads": (1, 2), "epoch_seconds": [1.0]}))
    assert [w.dtype for w in out["weights"]] == [np.float32, np.float64, np.int64]
    assert all(np.array_equal(a, b) for a, b in zip(out["weights"], weights))
    assert out["history"] == {"loss": [1.5, 1.0]} and out["threads"] == [1, 2]
    assert load_result(dump_result({"done": True})) == {"done": True}, "a non-chief worker: no weights"
    import io
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = io.BytesIO()
    np.savez(evil, meta=np.array('{"done": true}'), w0=np.array([Boom()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_result(evil.getvalue())
    with pytest.raises(Exception):
        load_result(pickle.dumps({"weights": []}))
    assert "pickle.loads" not in (REPO / "src" / "medspark" / "backends" / "spark_barrier.py").read_text()


def test_medspark_loads_no_pickle_except_the_barrier_job():
    """Every pickle load in medspark's own code, so that a new one is a decision (docs/SECURITY.md)."""
    loads = {}
    for path in (REPO / "src" / "medspark").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|allow_pickle=True|cloudpickle\.loads?\(|joblib\.load\(", line):
                loads[f"{path.relative_to(REPO)}:{n}"] = line.strip()
    assert list(loads.values()) == [
        "job, spec = pickle.load(f)  # cloudpickle (the job holds code) from our own task, in its 0700 temp dir"], loads
