"""The model at work: the packaged classifier (medspark.serving) takes raw image files and predicts exactly what
the Keras model predicts on the training preprocessing of those files, in process, through `medspark predict`
(single process and Spark) and through a real `mlflow models serve` HTTP endpoint, which is treated as a hostile
client would: it reads no file it is told to, opens only the supported formats, keeps to the `serving:` limits the
model was logged with, and answers short, strict JSON.

One small training (module fixture, about a minute on 2 cores) and one model server feed every slow test here."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from medspark import predict
from medspark.backends.placement import free_port
from medspark.calibration import apply_temperature
from medspark.data.preprocess import PreprocessConfig, Rejected, decode, read_bytes
from medspark.serving import ServingLimits

LIMITS = ServingLimits(max_images=8, max_request_mb=1)  # small, so that tests reach them with small requests
SMALL = ["dataset.generate.per_class=60", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.epochs=3", "train.batch_size=16", "cluster.cores=2",
         f"serving.max_images={LIMITS.max_images}", f"serving.max_request_mb={LIMITS.max_request_mb}"]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_inputs(phantoms: Path, folder: Path) -> dict[str, Path]:
    """A folder a user might point the model at: training-like PNGs, a big RGB PNG in a subfolder, a JPEG, a
    16-bit PNG, a truncated PNG, a text file, OS litter, and hidden files that both CLI modes must skip."""
    (folder / "sub").mkdir(parents=True)
    files = {}
    for cls in CLASSES:
        for src in sorted((phantoms / cls).glob("*.png"))[:2]:
            files[f"{cls}_{src.name}"] = shutil.copy(src, folder / f"{cls}_{src.name}")
    base = Image.open(sorted((phantoms / "glioma").glob("*.png"))[0]).convert("L")
    big = Image.merge("RGB", [base, base.point(lambda v: v * 0.8), base.point(lambda v: v * 0.6)]).resize((300, 220))
    (folder / "sub" / "big_rgb.png").write_bytes(_png(big))  # other size, mode and aspect than training
    big.resize((150, 150)).save(folder / "scan.jpg", quality=92)
    arr16 = (np.asarray(base.resize((80, 80)), np.uint16) * 250).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "deep16.png")
    good = (folder / "sub" / "big_rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "Thumbs.db").write_bytes(b"\x00" * 64)
    (folder / ".DS_Store").write_bytes(b"\x00" * 64)  # hidden: skipped
    (folder / "_partial.png").write_bytes(good)  # hidden by Spark's rule: skipped
    for name in ("sub/big_rgb.png", "scan.jpg", "deep16.png", "truncated.png", "notes.txt", "Thumbs.db"):
        files[name] = folder / name
    return {k: Path(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real small run through `python -m medspark.train`: both logged models, registered."""
    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp}/mlruns.db"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "medspark.train", *SMALL, f"paths.work_dir={tmp}/work",
                          f"tracking.uri={uri}", f"tracking.artifact_location={tmp}/artifacts"],
                         cwd=tmp, capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stderr[-4000:]
    print(f"training took {time.perf_counter() - t0:.1f} s")
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    phantoms = next((tmp / "work" / "synthetic").iterdir())
    files = make_inputs(phantoms, tmp / "inputs")
    return {"uri": uri, "tmp": tmp, "run": run, "summary": summary, "files": files, "inputs": tmp / "inputs"}


@pytest.fixture(scope="module")
def models(trained):
    mlflow.set_tracking_uri(trained["uri"])
    return {"pyfunc": mlflow.pyfunc.load_model(trained["summary"]["classifier_uri"]),
            "keras": mlflow.tensorflow.load_model(trained["summary"]["model_uri"])}


@pytest.fixture(autouse=True)
def _store(request):
    if "trained" in request.fixturenames:
        mlflow.set_tracking_uri(request.getfixturevalue("trained")["uri"])


def training_preprocess(run) -> PreprocessConfig:
    """The preprocessing the run trained with, from its own logged params (not from the packaged model)."""
    p = run.data.params
    return PreprocessConfig(image_size=int(p["preprocess.image_size"]), channels=int(p["preprocess.channels"]),
                            resize=p["preprocess.resize"], denoise=p["preprocess.denoise"],
                            draft=p["preprocess.draft"] == "True", min_side=int(p["preprocess.min_side"]),
                            max_pixels=int(p["preprocess.max_pixels"]))


def keras_reference(keras_model, cfg: PreprocessConfig, paths, temperature: float) -> dict[str, np.ndarray | None]:
    """What training would have fed the network for each file, through the Keras model, scaled by the temperature
    the run's evaluation fitted (medspark.calibration); None = rejected."""
    out, arrays, ok = {}, [], []
    for p in paths:
        try:
            arrays.append(decode(read_bytes(str(p)), cfg))
            ok.append(str(p))
        except Rejected:
            out[str(p)] = None
    probs = apply_temperature(keras_model.predict(np.stack(arrays).astype("float32"), verbose=0), temperature)
    out.update(dict(zip(ok, probs)))
    return out


def assert_matches(frame: pd.DataFrame, paths, reference, classes=CLASSES):
    assert list(frame.columns[-len(classes) - 2:]) == ["predicted_class", *(f"prob_{c}" for c in classes), "error"]
    for (_, row), p in zip(frame.iterrows(), paths):
        ref = reference[str(p)]
        probs = row[[f"prob_{c}" for c in classes]].to_numpy(float)
        if ref is None:
            assert row["predicted_class"] is None or pd.isna(row["predicted_class"]), p
            assert np.isnan(probs).all() and isinstance(row["error"], str) and row["error"], p
        else:
            assert row["predicted_class"] == classes[int(np.argmax(ref))], p
            np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6, err_msg=str(p))
            assert row["error"] is None or pd.isna(row["error"]), (p, row["error"])


# -- in process -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_models_are_logged_and_registered_with_signature_and_example(trained):
    s = trained["summary"]
    assert s["model_uri"] == "models:/medspark-synthetic/1"
    assert s["classifier_uri"] == "models:/medspark-synthetic-classifier/1"
    info = mlflow.models.get_model_info(s["classifier_uri"])
    assert info.signature.inputs.input_names() == ["image"], "bytes only: no `path` input"
    assert info.signature.inputs.required_input_names() == []
    assert info.signature.outputs.input_names() == ["predicted_class", *(f"prob_{c}" for c in CLASSES), "error"]
    assert info.saved_input_example_info is not None
    assert info.run_id == trained["run"].info.run_id == mlflow.models.get_model_info(s["model_uri"]).run_id


@pytest.mark.slow
def test_packaged_model_predicts_raw_files_like_keras_on_the_training_preprocessing(trained, models):
    pyfunc, keras_model = models["pyfunc"], models["keras"]
    cfg = training_preprocess(trained["run"])
    assert pyfunc.unwrap_python_model().preprocess == cfg, "the packaged preprocessing is the training one"
    assert pyfunc.unwrap_python_model().limits == LIMITS, "the run's serving: limits are baked into the model"
    paths = list(trained["files"].values())
    reference = keras_reference(keras_model, cfg, paths, trained["run"].data.metrics["temperature"])
    rejected = {Path(p).name for p, r in reference.items() if r is None}
    assert rejected == {"truncated.png", "notes.txt", "Thumbs.db"}

    # 14 files, 8 images per call at most: medspark predict's own calls, the files read on the caller's side
    by_path = predict.predict_local(pyfunc, [str(p) for p in paths])
    assert_matches(by_path, paths, reference)
    raw = [p.read_bytes() for p in paths]
    by_bytes = predict.predict_contents(pyfunc, paths, raw)
    b64 = predict.predict_contents(pyfunc, paths, [base64.b64encode(b).decode() for b in raw])
    for frame in (by_bytes, b64):
        assert_matches(frame, paths, reference)
        np.testing.assert_allclose(frame.iloc[:, 2:-1].to_numpy(float), by_path.iloc[:, 2:-1].to_numpy(float),
                                   rtol=1e-5, atol=1e-7)
    errors = dict(zip((p.name for p in paths), by_path["error"]))
    assert "corrupt or truncated" in errors["truncated.png"]
    assert "not an image" in errors["notes.txt"]
    assert errors["Thumbs.db"] == "system file, not an image"
    assert by_path["predicted_class"].notna().sum() == len(paths) - 3


@pytest.mark.slow
def test_bad_rows_get_a_reason_and_never_kill_the_batch(models, trained):
    good = trained["files"]["sub/big_rgb.png"].read_bytes()
    out = models["pyfunc"].predict(pd.DataFrame({
        "image": [good, np.zeros((64, 64, 1), np.uint8), "%%% not base64 %%%", b"", None]}))
    assert out["predicted_class"].iloc[0] in CLASSES and pd.isna(out["error"].iloc[0])
    assert out["predicted_class"].iloc[1:].isna().all()
    assert out.iloc[1:, 1:-1].isna().all().all() and (out.iloc[1:, 1:-1].map(type) == type(None)).all().all(), \
        "no prediction is None (JSON null), not NaN"
    reasons = out["error"].tolist()[1:]
    assert "not decoded arrays" in reasons[0]
    assert "not base64" in reasons[1]
    assert reasons[2] == "empty file (0 bytes)"
    assert reasons[3].startswith("no image")
    # a path is never read, in process either: the model has no way to take one
    with pytest.raises(MlflowException, match="no `image` column"):
        models["pyfunc"].predict(pd.DataFrame({"path": [str(trained["files"]["sub/big_rgb.png"])]}))


@pytest.mark.slow
def test_a_classifier_logged_before_the_limits_loads_with_the_defaults(trained, tmp_path):
    """Models logged before `serving:` existed have no limits in preprocess.json (the pickle, an ImageClassifier
    with no state, is unchanged): they load, predict, and take the defaults."""
    folder = Path(mlflow.artifacts.download_artifacts(trained["summary"]["classifier_uri"], dst_path=str(tmp_path)))
    meta_path = next(folder.glob("artifacts/preprocess.json"))
    meta = json.loads(meta_path.read_text())
    assert meta["serving"] == {"max_images": 8, "max_request_mb": 1, "max_pixels": 20_000_000, "max_decoded_mb": 64}
    del meta["serving"]
    meta_path.write_text(json.dumps(meta))
    old = mlflow.pyfunc.load_model(str(folder))
    assert old.unwrap_python_model().limits == ServingLimits()
    out = old.predict(pd.DataFrame({"image": [trained["files"]["sub/big_rgb.png"].read_bytes()]}))
    assert out["predicted_class"].iloc[0] in CLASSES and pd.isna(out["error"].iloc[0])


def test_calls_keep_to_the_model_limits():
    """medspark predict's calls: at most max_images files and max_bytes each; a file over it by itself goes alone."""
    assert list(predict.model_calls([10] * 7, 3, 100)) == [(0, 3), (3, 6), (6, 7)]
    assert list(predict.model_calls([40, 40, 40, 500, 10], 8, 100)) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert list(predict.model_calls([], 8, 100)) == []


# -- `medspark predict` -----------------------------------------------------------------------------------------

def _cli(*args, cwd):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "medspark", "predict", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=ENV)
    return res, time.perf_counter() - t0


@pytest.mark.slow
def test_cli_writes_the_csv_and_spark_gives_the_same_predictions(trained, models):
    tmp, uri = trained["tmp"], trained["summary"]["classifier_uri"]
    common = [f"model={uri}", f"input={trained['inputs']}", f"tracking_uri={trained['uri']}"]
    single, t_single = _cli(*common, f"output={tmp}/single.csv", cwd=tmp)
    assert single.returncode == 0, single.stderr[-3000:]
    spark, t_spark = _cli(*common, f"output={tmp}/spark.csv", "spark=true", "cores=2", "batch_size=4", cwd=tmp)
    assert spark.returncode == 0, spark.stderr[-3000:]
    print(f"medspark predict: single process {t_single:.1f} s, spark {t_spark:.1f} s")
    assert "14 file(s), 11 predicted, 3 not images" in single.stdout

    a, b = pd.read_csv(f"{tmp}/single.csv"), pd.read_csv(f"{tmp}/spark.csv")
    expected = sorted(str(p) for p in trained["files"].values())
    assert a["path"].tolist() == expected, "hidden files (.DS_Store, _partial.png) skipped, subfolders read"
    assert b["path"].tolist() == expected
    assert list(a.columns) == ["path", "predicted_class", *(f"prob_{c}" for c in CLASSES), "error"]
    assert list(b.columns) == list(a.columns)
    assert a["predicted_class"].fillna("-").tolist() == b["predicted_class"].fillna("-").tolist()
    assert a["error"].fillna("").tolist() == b["error"].fillna("").tolist()
    np.testing.assert_allclose(a.iloc[:, 2:-1].to_numpy(float), b.iloc[:, 2:-1].to_numpy(float), rtol=1e-4,
                               atol=1e-6, equal_nan=True)
    reference = keras_reference(models["keras"], training_preprocess(trained["run"]), expected,
                                trained["run"].data.metrics["temperature"])
    assert_matches(a, expected, reference)


@pytest.mark.slow
def test_cli_on_one_file_and_on_a_model_that_takes_arrays(trained, capsys):
    tmp = trained["tmp"]
    one = trained["files"]["sub/big_rgb.png"]
    assert predict.main([f"model={trained['summary']['classifier_uri']}", f"input={one}", f"output={tmp}/one.csv",
                         f"tracking_uri={trained['uri']}"]) == 0
    out = pd.read_csv(tmp / "one.csv")
    assert out["path"].tolist() == [str(one)] and out["predicted_class"].iloc[0] in CLASSES
    # the Keras model's URI (models:/<name>/<v> or @champion) predicts through the classifier its run registered
    assert predict.main([f"model={trained['summary']['model_uri']}", f"input={one}", f"output={tmp}/x.csv",
                         f"tracking_uri={trained['uri']}"]) == 0
    assert pd.read_csv(tmp / "x.csv")["predicted_class"].tolist() == out["predicted_class"].tolist()
    capsys.readouterr()
    assert predict.main(["model=models:/no-such-model/1", f"input={one}", f"tracking_uri={trained['uri']}",
                         f"output={tmp}/x.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medspark predict: error: model=models:/no-such-model/1") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    ([], "required setting(s) not given: model, input. Pass them as model=... input=..."),
    (["model=m"], "required setting(s) not given: input"),
    (["model=m", "input=/no/such/dir"], "input=/no/such/dir: no such file or folder"),
    (["model=m", "input=.", "colour=red"], "unknown key 'colour'"),
    (["model=m", "input=.", "spark=maybe"], "spark=maybe must be true or false"),
    (["model=m", "input=.", "batch_size=0"], "batch_size=0 must be an integer >= 1"),
    (["model=m", "input", "x"], "arguments are key=value, got 'input'"),
    (["model=m", "input=.", "output=/no/such/dir/p.csv"], "folder /no/such/dir does not exist"),
])
def test_cli_argument_errors_are_one_clear_line(argv, message, capsys):
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medspark predict: error: ") and message in err.splitlines()[0], err


def test_hidden_file_rule_matches_spark():
    assert predict.hidden(".DS_Store") and predict.hidden("_SUCCESS") and predict.hidden("x.png._COPYING_")
    assert not predict.hidden("_year=2020") and not predict.hidden("scan_1.png")
    assert predict.local_path("file:/a/b c.png") == "/a/b c.png" == predict.local_path("file:///a/b c.png")
    assert predict.local_path("hdfs://nn/a.png") == "hdfs://nn/a.png"


# -- `mlflow models serve` --------------------------------------------------------------------------------------

TRIPWIRE_GS = """#!/bin/sh
# stands in for Ghostscript on the model server's PATH: Pillow's EPS loader runs `gs`; any call is recorded
echo "$@" >> "$0.calls"
exit 0
"""


@pytest.fixture(scope="module")
def server(trained):
    """One real `mlflow models serve` of the registered classifier on 127.0.0.1, with a tripwire `gs` first on
    its PATH. Yields its base URL, its process (psutil) and the tripwire's call record."""
    tmp, uri = trained["tmp"], trained["summary"]["classifier_uri"]
    bin_dir = tmp / "tripwire"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(TRIPWIRE_GS)
    (bin_dir / "gs").chmod(0o755)
    port, log_path = free_port(), tmp / "serve.log"
    env = {**ENV, "MLFLOW_TRACKING_URI": trained["uri"], "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0, base = time.perf_counter(), f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, f"server exited: {log_path.read_text()[-3000:]}"
            assert time.perf_counter() - t0 < 120, f"no /ping in 120 s: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        print(f"model server up in {time.perf_counter() - t0:.1f} s")
        yield {"base": base, "proc": psutil.Process(proc.pid), "gs_calls": bin_dir / "gs.calls", "gs": bin_dir / "gs"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: bare {constant} in {text[:200]}")
    return json.loads(text, parse_constant=refuse)


def _invoke(server, columns, rows, timeout=60) -> tuple[int, dict]:
    """POST one dataframe_split request (bytes go base64, as JSON must); (HTTP status, strict-JSON answer).
    Every answer, error or not, is checked for what a hostile client must never see."""
    rows = [[base64.b64encode(v).decode() if isinstance(v, bytes) else v for v in row] for row in rows]
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    req = urllib.request.Request(f"{server['base']}/invocations", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    for leak in ("Traceback", 'File "', "/work", "/root", "/tmp", "site-packages"):
        assert leak not in text, f"{leak!r} in the answer: {text[:500]}"
    return status, _strict_json(text)


def _refused(status, answer, reason):
    """A request refused whole: HTTP 400, one short message naming the reason, no predictions."""
    assert status == 400 and "predictions" not in answer, answer
    assert reason in answer["message"] and len(answer["message"]) < 200 and "\n" not in answer["message"], answer


def _bomb_png(side=7000) -> bytes:
    """A valid PNG of side x side 16-bit gray zeros: ~95 KB on disk, 98 MB once decoded (the tester's bomb)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    z, row = zlib.compressobj(9), b"\0" * (1 + 2 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.slow
def test_served_model_answers_http_with_the_in_process_predictions(trained, models, server):
    png = trained["files"]["sub/big_rgb.png"].read_bytes()
    text = trained["files"]["notes.txt"].read_bytes()
    expected = models["pyfunc"].predict(pd.DataFrame({"image": [png, text]}))
    status, answer = _invoke(server, ["image"], [[png], [text]])
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    ok, bad = answer["predictions"]
    assert ok["predicted_class"] == expected["predicted_class"].iloc[0] in CLASSES and ok.get("error") is None
    np.testing.assert_allclose([ok[f"prob_{c}"] for c in CLASSES],
                               expected[[f"prob_{c}" for c in CLASSES]].iloc[0].to_numpy(float), rtol=1e-5, atol=1e-7)
    assert bad["predicted_class"] is None and "not an image" in bad["error"]
    assert all(bad[f"prob_{c}"] is None for c in CLASSES), "null, not NaN"


@pytest.mark.slow
def test_served_model_reads_no_file_it_is_told_to(trained, server):
    scan = str(trained["files"]["sub/big_rgb.png"])  # a valid image on the server's disk
    for columns, rows in ((["path"], [[scan]]), (["path"], [["../../../../../../etc/passwd"]]),
                          (["picture"], [[scan]])):
        _refused(*_invoke(server, columns, rows), "no `image` column")
    # next to an `image`, a `path` is ignored: the text file's bytes are what gets predicted, not the scan
    status, answer = _invoke(server, ["image", "path"], [[b"just text\n", scan]])
    assert status == 200 and len(answer["predictions"]) == 1, answer
    row = answer["predictions"][0]
    assert row["predicted_class"] is None and row["error"].startswith("not an image"), row


@pytest.mark.slow
def test_served_model_opens_no_eps_and_no_bomb_and_keeps_to_its_limits(trained, server):
    good = trained["files"]["sub/big_rgb.png"].read_bytes()
    real_gs = shutil.which("gs")
    print(f"Ghostscript here: {real_gs or 'absent'}; a tripwire gs stands first on the server's PATH either way")
    # the tripwire works: plain Pillow, given this EPS, runs the `gs` it finds on PATH
    subprocess.run([sys.executable, "-c", "import io, sys; from PIL import Image\n"
                    "try: Image.open(io.BytesIO(sys.stdin.buffer.read())).load()\nexcept Exception: pass"],
                   input=EPS, env={**ENV, "PATH": f"{server['gs'].parent}{os.pathsep}{ENV['PATH']}"}, timeout=60)
    assert server["gs_calls"].exists(), "the EPS would reach Ghostscript in plain Pillow"
    server["gs_calls"].unlink()

    # three bombs, an EPS and a good scan: the server's peak memory (reset after a warm-up request, which traces
    # the network's first call) must not see a bomb decoded
    assert _invoke(server, ["image"], [[good]])[0] == 200
    worker = max([server["proc"], *server["proc"].children(recursive=True)], key=lambda p: p.memory_info().rss)
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # resets the process's peak RSS (VmHWM)
    rss = worker.memory_info().rss
    bomb, t0 = _bomb_png(), time.perf_counter()
    assert len(bomb) < 100_000
    status, answer = _invoke(server, ["image"], [[bomb], [bomb], [bomb], [EPS], [good]])
    took = time.perf_counter() - t0
    peak = int(next(line.split()[1] for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))) * 1024
    print(f"3 bombs + EPS + scan: {took:.2f} s, server peak {(peak - rss) / 1e6:+.0f} MB over its RSS before")
    assert status == 200, answer
    rows = answer["predictions"]
    assert [r["error"] for r in rows[:3]] == ["too large: declared 7000x7000 exceeds serving.max_pixels=20000000"] * 3
    assert rows[3]["error"] == "not an image in an accepted format (PNG, JPEG, BMP, TIFF, GIF, WEBP)"
    assert rows[4]["predicted_class"] in CLASSES and rows[4]["error"] is None
    assert not server["gs_calls"].exists(), f"Ghostscript ran: {server['gs_calls'].read_text()}"
    assert peak - rss < 60e6, "a 98 MB decode would show here: the bombs were refused from their header"

    # images per request, bytes per request, and one image over the byte limit by itself
    _refused(*_invoke(server, ["image"], [[good]] * (LIMITS.max_images + 1)),
             f"{LIMITS.max_images + 1} images in one request, more than serving.max_images={LIMITS.max_images}")
    half = os.urandom(int(LIMITS.max_request_mb * 1e6 * 0.6))
    _refused(*_invoke(server, ["image"], [[half], [half]]), f"serving.max_request_mb={LIMITS.max_request_mb}")
    status, answer = _invoke(server, ["image"], [[half + half], [good]])
    assert status == 200, answer
    big, ok = answer["predictions"]
    assert big["error"] == f"too large: file over serving.max_request_mb={LIMITS.max_request_mb}"
    assert ok["predicted_class"] in CLASSES
