"""Any file name works: bytes that are not UTF-8 (old NAS exports), newlines, backslashes that look like escapes,
names of 250 bytes. They are listed, fingerprinted, preprocessed on Spark and written to the Petastorm `path`
column, to rejected.csv / ignored.csv (in the dataset folder and in the MLflow run) and to `medspark predict`'s
CSV, each as medspark.data.names.to_text writes it, and names.from_text gives back the very path."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from medspark.data.names import from_text, to_text

ODD = {  # name (bytes) -> what it exercises
    b"scan_\xff\xfe_latin1.png": "not UTF-8 (Latin-1 bytes)",
    b"scan\nsecond line.png": "a newline",
    b"l" * 246 + b".png": "250 bytes (NAME_MAX is 255)",
    "\u00e9".encode() * 123 + b".png": "250 bytes of 2-byte UTF-8",
    b"scan\\x41\\.png": "backslashes that look like an escape",
    b"\xe9t\xe9\\\xff.png": "not UTF-8 and a backslash",
}
PLAIN = [b"0.png", b"1.png"]


def fs_path(*parts: bytes) -> str:
    """The path as Python lists it (os.fsdecode: undecodable bytes as surrogates), from its bytes."""
    return os.fsdecode(os.path.join(*parts))


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> dict:
    """root/<a|b>/<odd names>.png, each a 40x40 grey square of its own level; in class a also a text file with a
    non-UTF-8 name (rejected) and a non-UTF-8 subfolder; beside the classes an odd README (ignored)."""
    root = os.fsencode(tmp_path_factory.mktemp("names") / "scans")
    levels, level = {}, 10
    names = list(ODD)
    for cls, mine in ((b"a", names[:3] + PLAIN), (b"b", names[3:] + PLAIN)):
        os.makedirs(os.path.join(root, cls))
        for name in mine:
            path = os.path.join(root, cls, name)
            with open(path, "wb") as f:  # PIL given a bytes path writes to exactly that name
                Image.new("L", (40, 40), level).save(f, "PNG")
            levels[os.fsdecode(path)], level = level, level + 20
    os.makedirs(os.path.join(root, b"a", b"sub_\xff"))
    deep = os.path.join(root, b"a", b"sub_\xff", b"deep_\xfe.png")
    with open(deep, "wb") as f:
        Image.new("L", (40, 40), level).save(f, "PNG")
    levels[os.fsdecode(deep)] = level
    bad = os.path.join(root, b"a", b"notes_\xff.txt")
    with open(bad, "wb") as f:
        f.write(b"not an image\n")
    readme = os.path.join(root, b"README_\xff.txt")
    with open(readme, "wb") as f:
        f.write(b"scans from site 3\n")
    return {"root": os.fsdecode(root), "levels": levels, "bad": os.fsdecode(bad), "readme": os.fsdecode(readme)}


def test_text_round_trip_is_exact():
    every_byte = bytes(b for b in range(1, 256) if b != ord("/"))
    for raw in [*ODD, every_byte, b"a\\\\b", b"\\", b"\\x", b"\\xzz", b"\xc3\xa9t\xc3\xa9.png"]:
        path = fs_path(b"/data", raw)
        text = to_text(path)
        text.encode("utf-8")  # what pyarrow, csv and MLflow require
        assert from_text(text) == path and os.fsencode(from_text(text)) == b"/data/" + raw
    assert to_text("/data/été.png") == "/data/été.png"  # UTF-8 names without a backslash: unchanged
    assert to_text(fs_path(b"scan_\xff\xfe_latin1.png")) == "scan_\\xff\\xfe_latin1.png"


def read_csv(path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        return {from_text(row["path"]): from_text(row["reason"]) for row in csv.DictReader(f)}


def read_paths(url: str) -> dict:
    from petastorm import make_reader

    with make_reader(url, schema_fields=["image", "path"], num_epochs=1, reader_pool_type="dummy") as reader:
        return {from_text(row.path): row.image for row in reader}


def test_preprocessing_writes_every_name_losslessly(odd_root, spark, cfg_factory):
    """`preprocess` (the data stage training runs too) on the real Spark session: the Petastorm rows, the
    dataset's rejected.csv and the MLflow run's data/rejected.csv and data/ignored.csv name every file exactly;
    a second run finds the same fingerprint and reuses the data, reading rejected.csv back."""
    import mlflow

    from medspark.preprocess_only import preprocess

    cfg = cfg_factory("dataset=image_folder", f"dataset.root={odd_root['root']}", "preprocess.image_size=32")
    summary = preprocess(cfg, spark=spark)
    levels = odd_root["levels"]
    assert summary["counts"]["data_listed"] == len(levels) + 1 and summary["counts"]["data_rejected"] == 1
    url = urlparse(summary["data_url"]).path
    rows = {}
    for split in ("train", "val", "test"):
        rows.update(read_paths(summary["data_url"] + "/" + split))
    assert set(rows) == set(levels)
    for path, image in rows.items():  # each file's own pixels under its own name
        assert image.shape == (32, 32, 1) and (image[4:-4, 4:-4] == levels[path]).all(), to_text(path)

    bad = {odd_root["bad"]: "not an image: no decoder recognises its content"}
    assert read_csv(Path(url) / "rejected.csv") == bad
    run = mlflow.get_run(summary["run_id"])
    store = Path(unquote(urlparse(run.info.artifact_uri).path))
    assert read_csv(store / "data" / "rejected.csv") == bad
    ignored = read_csv(store / "data" / "ignored.csv")
    assert set(ignored) == {odd_root["readme"]} and "not in a class folder" in ignored[odd_root["readme"]]

    again = preprocess(cfg, spark=spark)
    assert again["reused"] and again["fingerprint"] == summary["fingerprint"]
    assert again["counts"]["data_rejected"] == 1


def log_classifier(uri: str) -> str:
    """A real packaged classifier (untrained: names, not accuracy, are under test) in the store at `uri`."""
    import keras
    import mlflow

    from medspark import serving
    from medspark.data.preprocess import PreprocessConfig

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("file-names")  # of this store: an earlier test's active experiment is another store's
    with mlflow.start_run() as run:
        serving.log_model(model, PreprocessConfig(image_size=32), ["a", "b"], np.zeros((1, 32, 32, 1), np.uint8))
    return f"runs:/{run.info.run_id}/classifier"


@pytest.mark.slow
def test_predict_writes_its_csv_for_any_name(odd_root, tmp_path):
    """`medspark predict` (the CLI, single process) on the folder: every file gets its row, under its exact name."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    model = log_classifier(uri)
    out = tmp_path / "predictions.csv"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "medspark", "predict", f"model={model}", f"input={odd_root['root']}",
                          f"output={out}", f"tracking_uri={uri}"], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as f:
        rows = {from_text(r["path"]): r for r in csv.DictReader(f)}
    files = {os.fsdecode(os.path.join(d, n)) for d, _, names in os.walk(os.fsencode(odd_root["root"])) for n in names}
    assert set(rows) == files
    for path in odd_root["levels"]:
        assert rows[path]["predicted_class"] in ("a", "b") and not rows[path]["error"], to_text(path)
    for bad in (odd_root["bad"], odd_root["readme"]):
        assert "not an image" in rows[bad]["error"] and not rows[bad]["predicted_class"]
    assert f"{len(files)} file(s), {len(files) - 2} predicted" in res.stdout
