"""The parameter server of `elephas_async`/`elephas_hogwild` as a stranger, a buggy worker and a stray program
would meet it: real HTTP on 127.0.0.1 (no mocks), bounded in count and time. Elephas 7.3's own server hung for
good after one malformed update, served the weights to anyone and took updates from anyone; ours must refuse
and count, and keep serving the run's workers. The last test does it during a real `elephas_async` run."""
import http.client
import re
import socket
import threading
import time

import mlflow
import numpy as np
import pytest

from medspark.backends.api import BackendError
from medspark.backends.param_server import Layout, ParamClient, ParameterServerError, ParamServer
from medspark.backends.placement import free_port
from conftest import make_cfg

WEIGHTS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(4, np.float32)]


@pytest.fixture(params=["asynchronous", "hogwild"])
def server(request):
    with ParamServer(WEIGHTS, request.param, "127.0.0.1", timeout_s=5) as s:
        s.start()
        yield s


def call(port, method, path, body=None, headers=None, length=None, timeout=5):
    """One raw request: (status, body). `length` declares a Content-Length without sending that many bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if length is not None or body is not None:
            conn.putheader("Content-Length", str(length if length is not None else len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def auth(client: ParamClient) -> dict:
    return {"Authorization": f"Bearer {client._secret}"}  # the run's secret, as a worker (or a buggy one) has it


def test_a_malformed_update_is_refused_and_the_server_keeps_answering(server):
    """Elephas' hang: 5 bytes of 0xff to /update, then /parameters never answered again."""
    client = server.client("127.0.0.1", retries=0)
    assert [call(server.port, "POST", "/update", b"\xff" * 5, auth(client))[0] for _ in range(3)] == [400] * 3
    with pytest.raises(ParameterServerError, match="HTTP 422"):  # the right size, but NaN: it would ruin the model
        client.update_parameters([np.full_like(w, np.nan) for w in WEIGHTS])
    with pytest.raises(ValueError, match="weight 0 has shape"):  # a wrong shape never leaves the worker
        client.update_parameters([np.zeros((4, 3), np.float32), WEIGHTS[1]])
    start = time.perf_counter()
    for got, want in zip(client.get_parameters(), WEIGHTS):
        np.testing.assert_array_equal(got, want)
    assert time.perf_counter() - start < 2, "the lock was released"
    client.update_parameters([np.ones_like(w) for w in WEIGHTS])  # training goes on
    for got, want in zip(client.get_parameters(), WEIGHTS):
        np.testing.assert_array_equal(got, want - 1)
    stats = server.stats()
    assert stats["updates"] == 1 and stats["rejected"] == 4 and stats["by_status"] == {400: 3, 422: 1}


def test_requests_without_the_run_secret_are_refused_and_get_no_weights(server):
    client = server.client("127.0.0.1", retries=0)
    secret = client._secret
    tries = [({}, 401), ({"Authorization": "Bearer guess"}, 403), ({"Authorization": f"Bearer {secret[:-1]}"}, 403),
             ({"Authorization": "Basic dXNlcjpwYXNz"}, 401), ({"Authorization": f"Bearer {secret}\xe9"}, 403)]
    for headers, want in tries:
        status, body = call(server.port, "GET", "/parameters", headers=headers)
        assert status == want and WEIGHTS[0].tobytes()[:16] not in body and len(body) != server.layout.nbytes
    delta = Layout(WEIGHTS).pack([np.full_like(w, 100) for w in WEIGHTS])  # well-formed, but from a stranger
    assert call(server.port, "POST", "/update", delta)[0] == 401
    assert call(server.port, "POST", "/update", delta, {"Authorization": "Bearer guess"})[0] == 403
    assert server.snapshot() == Layout(WEIGHTS).pack(WEIGHTS), "no stranger's update applied"
    assert server.stats()["unauthorized"] == len(tries) + 2

    with ParamServer(WEIGHTS, "asynchronous", "127.0.0.1") as other:  # another run's client: its own secret
        stranger = other.client("127.0.0.1", retries=3)
    stranger.port = server.port
    start = time.perf_counter()
    with pytest.raises(ParameterServerError, match=rf"http://127.0.0.1:{server.port}\) refused GET /parameters: "
                                                   "HTTP 403") as e:
        stranger.get_parameters()
    assert time.perf_counter() - start < 2, "a refusal is final, not retried"
    assert stranger._secret not in str(e.value) + repr(stranger) and secret not in repr(client)


def test_bodies_that_are_not_exactly_an_update_are_refused_unread(server):
    client = server.client("127.0.0.1")
    size = server.layout.nbytes
    start = time.perf_counter()
    assert call(server.port, "POST", "/update", headers=auth(client), length=10 ** 10)[0] == 413  # nothing sent
    assert time.perf_counter() - start < 2, "refused on its declared size, not read"
    assert call(server.port, "POST", "/update", headers=auth(client))[0] == 411
    assert call(server.port, "POST", "/update", b"\0" * (size - 4), auth(client))[0] == 400
    assert call(server.port, "POST", "/update", headers={**auth(client), "Content-Length": "-8"})[0] == 400
    assert call(server.port, "GET", "/../../etc/passwd", headers=auth(client))[0] == 404
    assert call(server.port, "DELETE", "/parameters", headers=auth(client))[0] == 501
    assert server.stats()["by_status"] == {413: 1, 411: 1, 400: 2, 404: 1, 501: 1}
    assert server.snapshot() == Layout(WEIGHTS).pack(WEIGHTS)


def test_a_stalled_update_times_out_without_blocking_anyone():
    """A client that declares a whole update and sends 10 bytes: its connection is closed after timeout_s
    (408); meanwhile the workers' reads are answered at once (nothing is locked while a body arrives)."""
    with ParamServer(WEIGHTS, "asynchronous", "127.0.0.1", timeout_s=1) as server:
        server.start()
        client = server.client("127.0.0.1", retries=0)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
            slow.sendall(f"POST /update HTTP/1.0\r\nAuthorization: Bearer {client._secret}\r\nContent-Length: "
                         f"{server.layout.nbytes}\r\n\r\n".encode() + b"\0" * 10)
            start = time.perf_counter()
            client.get_parameters()
            assert time.perf_counter() - start < 0.5
            assert slow.recv(100).startswith(b"HTTP/1.0 408")
        assert server.stats()["by_status"] == {408: 1}


def test_a_retried_update_is_applied_once(server):
    client = server.client("127.0.0.1")
    delta = Layout(WEIGHTS).pack([np.ones_like(w) for w in WEIGHTS])
    headers = {**auth(client), "X-Update-Id": "0123abcd"}
    assert [call(server.port, "POST", "/update", delta, headers) for _ in range(2)] == [(200, b"applied"),
                                                                                       (200, b"duplicate")]
    assert server.snapshot() == Layout(WEIGHTS).pack([w - 1 for w in WEIGHTS])


def test_a_forced_port_in_use_is_one_line_and_a_free_port_is_chosen_otherwise():
    with socket.socket() as other:  # another program's server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(BackendError) as e:
            ParamServer(WEIGHTS, "asynchronous", "127.0.0.1", port)
        assert str(e.value) == (f"backend.port={port}: 127.0.0.1:{port} is already in use by another program; "
                                "choose another port or backend.port=null (a free one)")
        with ParamServer(WEIGHTS, "asynchronous", "127.0.0.1") as server:
            assert server.port not in (0, port)


def test_the_client_gives_up_after_bounded_retries_naming_the_server():
    port = free_port()  # nothing listens there
    client = ParamClient("127.0.0.1", port, "s3cret", Layout(WEIGHTS), timeout_s=1, retries=2)
    start = time.perf_counter()
    with pytest.raises(ParameterServerError, match=rf"ParamClient\(http://127.0.0.1:{port}\) did not answer GET "
                                                   r"/parameters after 3 tries \(ConnectionRefusedError"):
        client.get_parameters()
    assert 3 <= time.perf_counter() - start < 8, "waits 1 s, then 2 s, between tries"
    with socket.socket() as mute:  # accepts connections (the kernel's backlog) and never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        client = ParamClient("127.0.0.1", mute.getsockname()[1], "s3cret", Layout(WEIGHTS), timeout_s=0.5, retries=1)
        start = time.perf_counter()
        with pytest.raises(ParameterServerError, match=r"after 2 tries \(TimeoutError: timed out\)"):
            client.update_parameters(WEIGHTS)
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize("setting, line", [
    ("backend.timeout_s=0", "backend.timeout_s=0 must be a number of seconds"),
    ("backend.retries=-1", "backend.retries=-1 must be an integer from 0 to 10")])
def test_client_settings_are_checked_in_one_line(tmp_path, setting, line):
    from medspark.backends import build

    with pytest.raises(BackendError, match=re.escape(line)):
        build(make_cfg(tmp_path, ["backend=elephas_hogwild", setting]).backend)


# 40 phantoms per class at 32 px, 2 workers x batch 8: minutes on 2 cores, and learns well above chance.
SMALL = ["backend=elephas_async", "dataset.generate.per_class=40", "dataset.generate.size=32",
         "preprocess.image_size=32", "train.epochs=6", "train.batch_size=8", "train.verbose=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):  # one MLflow store and one materialized dataset for the real runs below
    return tmp_path_factory.mktemp("param_server")


@pytest.mark.slow
def test_elephas_async_trains_while_strangers_hit_its_parameter_server(spark, store, monkeypatch, capfd):
    """A real elephas_async run; as soon as its server starts, a thread on loopback sends it what a stranger
    would (malformed updates, weight reads without or with a guessed secret, a huge body): every one is refused
    and counted, the run finishes and learns, and the run's secret appears nowhere in the MLflow store or output."""
    from medspark.train import train

    started, servers, answers = threading.Event(), [], []
    real_start = ParamServer.start

    def spy(self):  # the real start(), recording which server this run made (a spy, not a mock)
        servers.append(self)
        started.set()
        real_start(self)

    monkeypatch.setattr(ParamServer, "start", spy)
    hostile = [("POST", "/update", b"\xff" * 5, {}, None), ("GET", "/parameters", None, {}, None),
               ("GET", "/parameters", None, {"Authorization": "Bearer guess"}, None),
               ("POST", "/update", None, {}, 10 ** 9)] * 3

    def attack():
        if not started.wait(600):
            return
        for method, path, body, headers, length in hostile:  # all within the first second: a 6-epoch run at
            answers.append(call(servers[0].port, method, path, body, headers, length))  # 32 px once ended in 3.5 s
            time.sleep(0.02)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    cfg = make_cfg(store, SMALL)
    train(cfg, overrides=["backend=elephas_async"], spark=spark)
    attacker.join(30)
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                               filter_string="attributes.status = 'FINISHED'")
    m = run.data.metrics
    assert len(answers) == len(hostile), "every hostile request was answered while the run trained"
    assert sorted({status for status, _ in answers}) == [401, 403]
    assert not any(len(body) == servers[0].layout.nbytes for _, body in answers), "no weights to a stranger"
    assert m["ps_rejected_requests"] == m["ps_unauthorized_requests"] == len(hostile)
    assert m["ps_updates"] == 2 * 6, "2 workers x 6 epochs, frequency=epoch: every worker update went through"
    assert m["test_accuracy"] >= 0.25 + 0.25, f"4 classes (chance 0.25): {m['test_accuracy']}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", run.data.params["backend_server"])
    secret = servers[0]._secret
    out, err = capfd.readouterr()
    assert secret not in out + err
    leaks = [p for p in store.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, f"the parameter server's secret is written in {leaks}"


@pytest.mark.slow
def test_workers_that_cannot_reach_the_server_fail_in_one_line_naming_it(spark, store):
    """Executors told a wrong address (127.0.0.2: loopback, but the server listens on 127.0.0.1 only): each
    call is refused, retried once, and the run fails with the worker's line, not a wait without end."""
    from medspark.train import train

    cfg = make_cfg(store, [*SMALL, "backend.advertise_host=127.0.0.2", "backend.retries=1", "backend.timeout_s=2"])
    start = time.perf_counter()
    with pytest.raises(ParameterServerError, match=r"^ParamClient\(http://127\.0\.0\.2:\d+\) did not answer GET "
                                                   r"/parameters after 2 tries \(ConnectionRefusedError") as e:
        train(cfg, overrides=["backend=elephas_async"], spark=spark)
    assert "\n" not in str(e.value) and time.perf_counter() - start < 300


def test_a_flood_of_connections_is_bounded_and_the_workers_get_through_after_it():
    """A stranger holds more idle connections than max_connections: the ones beyond are closed at once, unread and
    counted (503, no thread each); when the idle ones time out, a worker's client is answered again."""
    with ParamServer(WEIGHTS, "asynchronous", "127.0.0.1", timeout_s=1, max_connections=4) as server:
        server.start()
        client = server.client("127.0.0.1", retries=0)
        flood = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(10)]
        try:
            start, closed = time.perf_counter(), 0
            for s in flood[4:]:
                closed += s.recv(10) == b""  # closed by the server without an answer
            assert closed == 6 and time.perf_counter() - start < 0.5  # at once, not after timeout_s
            assert server.stats()["by_status"] == {503: 6}
            handlers = [t for t in threading.enumerate() if "process_request_thread" in t.name]
            assert len(handlers) == 4  # one thread per held connection, none for the refused ones
        finally:
            for s in flood:
                s.close()
        deadline = time.time() + 5
        while True:  # the handlers of the closed idle connections end (their read sees EOF)
            try:
                assert [w.tolist() for w in client.get_parameters()] == [w.tolist() for w in WEIGHTS]
                break
            except ParameterServerError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
