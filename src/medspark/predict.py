"""`medspark predict`: a predictions CSV for image files, from a logged or registered classifier.

    medspark predict model=models:/medspark-synthetic-classifier/1 input=scans/ [output=predictions.csv]
                     [spark=false] [cores=*] [batch_size=64] [tracking_uri=...]

model   an MLflow URI of a packaged classifier (the run's `classifier`, see medspark.serving):
        models:/<name>-classifier@champion, models:/<name>-classifier/1, runs:/<run id>/classifier, or a local
        model folder; the registered Keras model (models:/<name>@champion, models:/<name>/1) stands for the
        classifier registered by the same run
input   an image file, or a folder read recursively (names starting with `.` or `_` are skipped, as Spark's
        file reader does, so both modes see the same files)
output  the CSV: path, predicted_class, prob_<class>..., error (one row per file, sorted by path; a file that
        cannot become an image has no class and its reason in `error`); a multilabel model writes `findings`
        (those over their thresholds, "A|B", "No Finding" if none) in place of predicted_class and a
        prob_<finding> per finding; a binary model logged with an operating point answers its positive class
        when prob_<positive> reaches the threshold chosen on validation (medspark.operating_points), which the
        command prints after the counts; UTF-8 whatever the file names: a byte
        that is not UTF-8 is written `\\xNN`, a backslash `\\\\` (medspark.data.names.from_text reads it back)
spark   true = distributed batch inference on a local Spark session: executors read the file bytes
        (`binaryFile`) and run the model, loaded once per Python worker, over Arrow batches (`mapInPandas`)
cores   Spark local cores (spark=true); batch_size: files read at a time / per Arrow batch. The files are read
        here (the model reads none: it takes bytes) and sent in calls within the model's `serving:` limits
tracking_uri  the MLflow store holding `models:/` names; default $MLFLOW_TRACKING_URI, else the one
        medspark trains into (`tracking.uri` of conf/config.yaml)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .data.names import to_text

log = logging.getLogger("medspark.predict")
KEYS = {"model": None, "input": None, "output": "predictions.csv", "spark": "false", "cores": "*",
        "batch_size": "64", "tracking_uri": None}
REQUIRED = ("model", "input")
USAGE = ("usage: medspark predict model=<models:/name@champion | models:/name/version | runs:/id/classifier | folder> "
         "input=<file or folder> "
         "[output=predictions.csv] [spark=true|false] [cores=*] [batch_size=64] [tracking_uri=...]")
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class ArgError(ValueError):
    """A wrong or missing key=value argument; the message names it."""


def parse_args(argv: list[str]) -> dict:
    opts, seen = dict(KEYS), set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+").strip()
        if not sep or not key:
            raise ArgError(f"arguments are key=value, got {arg!r}")
        if key not in KEYS:
            raise ArgError(f"unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        if key in seen:
            raise ArgError(f"{key}= given twice")
        seen.add(key)
        opts[key] = value
    missing = [k for k in REQUIRED if not opts[k]]
    if missing:
        raise ArgError(f"required setting(s) not given: {', '.join(missing)}. Pass them as "
                       + " ".join(f"{k}=..." for k in missing))
    spark = str(opts["spark"]).lower()
    if spark not in TRUE | FALSE:
        raise ArgError(f"spark={opts['spark']} must be true or false")
    opts["spark"] = spark in TRUE
    try:
        assert int(opts["batch_size"]) >= 1
        opts["batch_size"] = int(opts["batch_size"])
    except (ValueError, AssertionError):
        raise ArgError(f"batch_size={opts['batch_size']} must be an integer >= 1") from None
    if opts["cores"] != "*":
        try:
            assert int(opts["cores"]) >= 1
            opts["cores"] = int(opts["cores"])
        except (ValueError, AssertionError):
            raise ArgError(f"cores={opts['cores']} must be a positive integer or '*'") from None
    if not os.path.exists(opts["input"]):
        raise ArgError(f"input={opts['input']}: no such file or folder")
    out_dir = Path(opts["output"]).resolve().parent
    if not out_dir.is_dir():
        raise ArgError(f"output={opts['output']}: folder {out_dir} does not exist")
    return opts


# -- which files ----------------------------------------------------------------------------------------------

def hidden(name: str) -> bool:
    """Spark's (Hadoop's) rule for files and folders its file sources skip."""
    return (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")


def list_files(input_path: str) -> list[str]:
    """Absolute paths of the files to predict, sorted: the file itself, or every non-hidden file under the folder."""
    root = os.path.abspath(input_path)
    if os.path.isfile(root):
        return [root]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not hidden(d)]
        out.extend(os.path.join(folder, f) for f in files if not hidden(f))
    return sorted(out)


def local_path(spark_path: str) -> str:
    """Spark's `file:/a/b` (or `file:///a/b`) -> `/a/b`; other schemes (hdfs://, s3a://) stay URIs."""
    return re.sub(r"^file:(//)?(?=/)", "", spark_path)


def check_classifier(metadata, model_uri: str):
    """The model's output schema, if it is a packaged classifier; the Keras `model` takes arrays, not files."""
    from .serving import answer_column

    outputs = metadata.get_output_schema()
    answers = {answer_column("multiclass"), answer_column("multilabel")}
    if outputs is None or not answers & set(outputs.input_names()):
        raise ArgError(f"model={model_uri} is not a medspark classifier (it takes arrays, not image files); use the "
                       "run's `classifier` model: models:/<registered name>-classifier@champion (or /<version>)")
    return outputs


REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?")


def classifier_uri(model_uri: str) -> str:
    """The classifier to predict with: `model_uri` itself, or for a registered Keras model (models:/<name>@alias,
    models:/<name>/<version>) the classifier the same run registered as `<name>-classifier`
    (the same alias when it points at that run's version, as the champion does, else that version)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import classifier_registered_name

    m = REGISTERED.fullmatch(model_uri)
    if not m or m["name"].endswith("-classifier"):
        return model_uri
    client, name = MlflowClient(), classifier_registered_name(m["name"])
    try:
        keras = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"] else
                 client.get_model_version(m["name"], m["version"]))
        found = client.search_model_versions(f"name = '{name}' and run_id = '{keras.run_id}'")
        if not found:
            return model_uri  # not a medspark Keras model: check_classifier says what to pass
        held = client.get_registered_model(name).aliases.get(m["alias"]) if m["alias"] else None
    except MlflowException:
        return model_uri  # no such model or alias: loading it gives MLflow's own (first-line) error
    version = max(int(v.version) for v in found)
    uri = f"models:/{name}@{m['alias']}" if held is not None and int(held) == version else f"models:/{name}/{version}"
    print(f"medspark predict: {model_uri} is the Keras model (arrays in); predicting with the classifier of the "
          f"same run, {uri}", flush=True)
    return uri


# -- the two ways to predict ---------------------------------------------------------------------------------

def _file_bytes(value) -> bytes | None:
    """A content as the model receives it (bytes or base64 text) -> the file's bytes; None when it is neither."""
    from .data.preprocess import Rejected
    from .serving import image_bytes

    try:
        return image_bytes(value)
    except Rejected:
        return None


def model_calls(sizes: list[int], max_images: int, max_bytes: float):
    """(start, end) of consecutive files, each run within the model's limits on images and bytes per call; a
    file over max_bytes by itself goes alone (the model rejects it)."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start == max_images or total + size > max_bytes):
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def predict_contents(model, paths: list[str], contents: list):
    """The caller's side of the classifier, which reads no file (medspark.serving): each file's bytes, or the
    Rejected that reading it raised -> path + predictions. The bytes go in calls within the model's `serving`
    limits; a file that could not be read keeps its reason in `error`. With DICOM or NIfTI files among them, a
    `frame` column after `path` says which frame or slice each prediction is for."""
    import pandas as pd

    from .data.preprocess import MB, Rejected, is_medical

    limits = model.unwrap_python_model().limits
    images = [None if isinstance(c, Rejected) else c for c in contents]
    sizes = [0 if b is None else len(b) for b in images]
    out = pd.concat([model.predict(pd.DataFrame({"image": images[a:b]}))
                     for a, b in model_calls(sizes, limits.max_images, limits.max_request_mb * MB)], ignore_index=True)
    for i, c in enumerate(contents):
        if isinstance(c, Rejected):
            out.at[i, "error"] = str(c)
    out.insert(0, "path", paths)
    raw = [None if b is None else _file_bytes(b) for b in images]  # contents may be base64 text, as the model takes
    if any(b is not None and is_medical(b) for b in raw):  # DICOM/NIfTI: which frame or slice was predicted
        pre = model.unwrap_python_model().preprocess
        frames = [None if b is None or not pd.isna(out.at[i, "error"]) else frame_index(b, pre)
                  for i, b in enumerate(raw)]  # None: no prediction
        out.insert(1, "frame", pd.array(frames, dtype="Int64"))
    return out


def frame_index(data: bytes, pre) -> int | None:
    """The frame (DICOM) or slice (NIfTI) of a file that the classifier predicts, as `decode` picks it (the first
    that preprocess selects; 0 for a 2D image); None when the file cannot be read."""
    from .data import dicom
    from .data.preprocess import Rejected, decode_frames, is_medical

    try:
        if dicom.is_dicom(data) or dicom.is_bare_dataset(data):  # from the header: no pixel decoded twice
            return dicom.select_frames(int(dicom.read(data).get("NumberOfFrames") or 1), pre.multi_frame)[0]
        return decode_frames(data, pre)[0][0] if is_medical(data) else 0
    except (Rejected, ValueError, TypeError):
        return None


def read_file(path: str):
    """A file's bytes, or the Rejected with the reason (read_bytes: system files, unreadable, not regular)."""
    from .data.preprocess import Rejected, read_bytes

    try:
        return read_bytes(path)
    except Rejected as e:
        return e


def predict_local(model, files: list[str], batch_size: int = 64):
    """Single process: this process reads the files, batch_size at a time, and hands their bytes to the model."""
    import pandas as pd

    batches = (files[i:i + batch_size] for i in range(0, len(files), batch_size))
    return pd.concat([predict_contents(model, b, [read_file(p) for p in b]) for b in batches], ignore_index=True)


_MODELS: dict = {}  # per Python worker: Spark reuses workers, so a model loads once per worker, not per task


def _worker_model(model_dir: str):
    if model_dir not in _MODELS:
        import mlflow.pyfunc

        _MODELS[model_dir] = mlflow.pyfunc.load_model(model_dir)
    return _MODELS[model_dir]


def _predict_partition(model_name: str, columns: list[str]):
    """mapInPandas body: Arrow batches of (path, content) -> predictions, the model loaded once per worker."""

    def run(batches):
        from pyspark import SparkFiles

        from medspark.data.preprocess import Rejected, is_system_file

        model = _worker_model(SparkFiles.get(model_name))
        for pdf in batches:
            paths = pdf["path"].map(local_path).tolist()
            contents = [Rejected("system file, not an image") if is_system_file(p) else c  # read_bytes' rule
                        for p, c in zip(paths, pdf["content"].tolist())]
            yield predict_contents(model, paths, contents)[columns]
    return run


def predict_spark(spark, model_uri: str, input_path: str):
    """Distributed: executors read the files' bytes (`binaryFile`, any Hadoop filesystem) and predict with
    the model shipped to them (`SparkContext.addFile`); only the predictions come back to the driver."""
    import mlflow
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    name = f"medspark-model-{uuid.uuid4().hex[:8]}"  # its name among the session's files
    with tempfile.TemporaryDirectory(prefix="medspark-predict-") as tmp:
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=os.path.join(tmp, "dl"))
        staged = os.path.join(tmp, name)
        shutil.move(model_dir, staged)
        spark.sparkContext.addFile(staged, recursive=True)
        outputs = check_classifier(mlflow.models.Model.load(staged), model_uri)
        schema = StructType([StructField("path", StringType())] + [
            StructField(c.name, DoubleType() if c.type.name == "double" else StringType()) for c in outputs.inputs])
        source = os.path.abspath(input_path) if "://" not in input_path else input_path
        files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
                 .select("path", "content"))
        result = files.mapInPandas(_predict_partition(name, schema.fieldNames()), schema).toPandas()
    return result.sort_values("path", kind="stable", ignore_index=True)


# -- the command ---------------------------------------------------------------------------------------------

def tracking_uris(opts) -> tuple[str | None, str | None]:
    """(tracking, registry) URIs: tracking_uri=..., else $MLFLOW_TRACKING_URI (MLflow's own variables then
    decide the registry), else medspark's configured `tracking.uri` and `tracking.registry_uri`."""
    if opts.get("tracking_uri"):
        return opts["tracking_uri"], None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    from .config import compose_project_config

    try:
        t = compose_project_config().tracking
        return str(t.uri), (str(t.registry_uri) if t.get("registry_uri") else None)
    except Exception:  # no readable config: MLflow's own default
        return None, None


def spark_session(cores, batch_size: int):
    """A local Spark session of the project's `cluster=local` (conf/local included), quiet, with small Arrow
    batches (rows are images)."""
    from omegaconf import OmegaConf

    from .config import compose_project_config
    from .spark import session

    local = OmegaConf.to_container(compose_project_config(["cluster=local"]).cluster, resolve=True)
    cfg = OmegaConf.merge(local, {
        "cores": cores, "log_level": "ERROR",
        "conf": {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                 "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size)}})
    return session(cfg, app_name="medspark-predict")


def run(opts) -> "pd.DataFrame":  # noqa: F821
    import mlflow

    uri, registry = tracking_uris(opts)
    if uri:
        mlflow.set_tracking_uri(uri)
    if registry:
        mlflow.set_registry_uri(registry)
    files = list_files(opts["input"])
    if not files:
        raise ArgError(f"input={opts['input']}: no files to predict (names starting with . or _ are skipped)")
    opts["model"] = classifier_uri(opts["model"])
    if opts["spark"]:
        spark = spark_session(opts["cores"], opts["batch_size"])
        try:
            return predict_spark(spark, opts["model"], opts["input"])
        finally:
            spark.stop()
    model = mlflow.pyfunc.load_model(opts["model"])
    check_classifier(model.metadata, opts["model"])
    return predict_local(model, files, opts["batch_size"])


def write_csv(out, output: str) -> None:
    """The predictions CSV, UTF-8 whatever the file names: `path` (and `error`, which may quote one) as
    data/names.to_text writes them; names.from_text gives each path back."""
    text = {c: out[c].map(lambda v: to_text(v) if isinstance(v, str) else v) for c in ("path", "error") if c in out}
    out.assign(**text).to_csv(output, index=False)


def run_command(prog: str, argv: list[str], usage: str, parse, run):
    """The shell `medspark predict` and `medspark explain` share: parse the arguments, then run with MLflow quiet.
    A bad argument, or a model URI MLflow cannot open, is one line on stderr: returns the exit code 2; else
    (opts, what `run(opts)` returned, seconds it took)."""
    try:
        opts = parse(argv)
    except ArgError as e:
        print(f"{prog}: error: {e}\n{usage}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    t0 = time.perf_counter()
    try:
        result = run(opts)
    except ArgError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow's errors for a wrong model URI are long: show the first line
        from mlflow.exceptions import MlflowException

        if not isinstance(e, (MlflowException, OSError)):
            raise
        print(f"{prog}: error: model={opts['model']}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return opts, result, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    done = run_command("medspark predict", argv, USAGE, parse_args, run)
    if isinstance(done, int):
        return done
    opts, out, seconds = done
    write_csv(out, opts["output"])
    rule = decision(opts["model"])
    errors = int(out["error"].notna().sum()) if "error" in out else 0
    print(f"medspark predict: {len(out)} file(s), {len(out) - errors} predicted, {errors} not images "
          f"({'spark' if opts['spark'] else 'single process'}, {seconds:.1f} s) -> {to_text(opts['output'])}")
    if rule:
        print(f"medspark predict: {rule}")
    return 0


def decision(model_uri: str) -> str | None:
    """How a binary classifier with an operating point decides (its logged metadata), e.g. "predicted_class is
    PNEUMONIA when prob_PNEUMONIA >= 0.3712 (the operating point chosen on validation), else NORMAL"; None for
    argmax and multilabel models, or when the metadata cannot be read (it is only said, never needed)."""
    from mlflow.models import Model

    try:
        meta = (Model.load(model_uri).metadata or {}).get("medspark", {})
    except Exception:  # noqa: BLE001 - informational line only
        return None
    classes, thresholds = meta.get("classes") or [], meta.get("thresholds") or {}
    if meta.get("task") != "binary" or len(classes) != 2 or classes[1] not in thresholds:
        return None
    return (f"predicted_class is {classes[1]} when prob_{classes[1]} >= {float(thresholds[classes[1]]):.4g} "
            f"(the operating point chosen on validation), else {classes[0]}")
