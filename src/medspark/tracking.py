"""Everything MLflow: where runs go, what a run records, how it ends, and the registered model."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from .interrupts import terminate_raises

log = logging.getLogger(__name__)
SECRET_WORDS = ("password", "passwd", "pwd", "passphrase", "token", "secret", "key", "credential", "auth",
                "signature", "bearer", "cookie", "session")  # in any part of a key
SECRET = re.compile("|".join(SECRET_WORDS), re.I)  # never logged in clear
MASK = "***"
PARAM_MAX = 6000  # MLflow's limit on a param value


# scheme://user:password@host: the password runs to the last '@' that a host follows ('/' and '@' inside it are
# not escaped by everyone); erring long masks a little of the path, never leaves part of a password
URL_PASSWORD = re.compile(r"([a-zA-Z][\w+.\-]*://[^\s:/@]*:)\S*@(?=[^\s@/?#]+(?:[/?#\s'\",;\]}]|$))")
URL_TOKEN_USER = re.compile(r"([a-zA-Z][\w+.\-]*://)[^\s:/@]+@(?=[^\s@/?#]+)")  # scheme://TOKEN@host (no ':')
# query parameters that carry credentials: Azure SAS ?sig=, AWS X-Amz-Signature/-Credential, ?token=, ?code=, ...
URL_QUERY_SECRET = re.compile(r"([?&](?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
                              r"access_token|token|code|key|apikey|api_key|password|secret)=)[^&#\s'\"]+", re.I)
AUTH_HEADER = re.compile(r"\b(Bearer|Basic|Digest|Token|Negotiate)(\s+)[A-Za-z0-9._~+/=\-]{6,}", re.I)  # HTTP auth
# key=value or key: value in free text (command-line overrides, Hydra dict literals, error messages) whose key
# contains a secret word: `db.password=x`, `+aws.secret_key=x`, `{spark.hadoop.fs.s3a.secret.key:x}`
SECRET_ASSIGNMENT = re.compile(
    r"((?<![\w.\-/@])[+~]{0,2}[\w.\-]*(?:" + "|".join(SECRET_WORDS) + r")[\w.\-]*)(\s*[=:]\s*)"  # key, = or :
    r"('[^']*'|\"[^\"]*\"|\{(?:[^{}]|\{[^{}]*\})*\}|\[(?:[^\[\]]|\[[^\[\]]*\])*\]|[^\s,;&}\]'\"]+)",  # value
    re.I)


def is_secret_key(key) -> bool:
    """A key (dotted path or one name) of which any part contains password/token/secret/key/credential."""
    return bool(SECRET.search(str(key)))


def mask_text(text: str) -> str:
    """Free text with the password of every user:password@host URL and every secret-looking key=value masked."""
    def assignment(m):  # not an exception's name and message: "KeyError: 'x'"
        if ":" in m.group(2) and re.search(r"(Error|Exception|Warning)$", m.group(1)):
            return m.group(0)
        return m.group(1) + m.group(2) + MASK

    text = URL_TOKEN_USER.sub(rf"\1{MASK}@", URL_PASSWORD.sub(rf"\1{MASK}@", text))
    text = AUTH_HEADER.sub(rf"\1\2{MASK}", URL_QUERY_SECRET.sub(rf"\1{MASK}", text))
    return SECRET_ASSIGNMENT.sub(assignment, text)


def _mask_value(key, value):
    if is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return mask_nested(value)
    if isinstance(value, (list, tuple)):
        return [_mask_value("", v) for v in value]
    return value


def mask_secrets(flat: dict) -> dict:
    """Secret-looking keys (any part of the dotted key) are masked; so is the password of any
    user:password@host URL and any secret-looking key=value in a value, nested lists and dicts included."""
    return {k: _mask_value(k, v) for k, v in flat.items()}


def mask_nested(d: dict) -> dict:
    """mask_secrets for a nested config (the resolved YAML): a secret-looking key hides its whole value."""
    return {k: _mask_value(k, v) for k, v in d.items()}


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


STORE_TIMEOUT_S = 5  # how long a tracking server may take to answer the check before Spark starts


def check_store(tracking) -> None:
    """The tracking store is usable, checked in seconds before anything starts (MLflow itself retries for minutes):
    a local store's folder exists or can be made and is writable; a tracking server answers HTTP."""
    from .config import ConfigError

    uri = str(tracking.uri)
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        import requests

        try:
            requests.get(f"{strip_credentials(uri)[0].rstrip('/')}/health", timeout=STORE_TIMEOUT_S)
        except requests.RequestException as e:
            raise ConfigError(f"tracking.uri={mask_text(uri)} does not answer within {STORE_TIMEOUT_S} s "
                              f"({type(e).__name__}); start the tracking server or fix tracking.uri") from None
        return
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return
        folder = Path(path).parent
    elif scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        folder = Path(uri[len("file://"):] if scheme == "file" else uri)
    else:
        return  # databricks, a plugin's store: MLflow checks them itself
    folder = folder.expanduser().absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"tracking.uri={mask_text(uri)}: {existing} is not a folder, so the store cannot be "
                          "created there; point tracking.uri at a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"tracking.uri={mask_text(uri)}: the folder {existing} is not writable by this user; "
                          "point tracking.uri at a writable folder")


def strip_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) tracking URI without its user:password@ (or token@), and the MLflow variables that carry them
    instead: MLflow then never prints or stores them (its 'View run ... at: <uri>' line included)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, password = userinfo.partition(":")
    env = ({"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)} if sep
           else {"MLFLOW_TRACKING_TOKEN": unquote(user)})
    return urlunsplit(parts._replace(netloc=host)), env


def configure(tracking) -> str:
    """Point MLflow at the configured store and return the experiment id. An experiment medspark creates gets
    `artifact_location`, or by default (null): `<folder of the sqlite file>/mlartifacts` for a sqlite store (the
    checkout's `mlartifacts/` with the default store), MLflow's own default for other local stores, and the
    server's choice for a tracking server (http/https/databricks: artifacts go through the server when it serves
    them, `mlflow server --artifacts-destination`). An existing experiment keeps its artifact root."""
    import mlflow

    from .config import ConfigError

    mode = tracking.get("champion_mode") or "max"
    if mode not in ("max", "min"):
        raise ConfigError(f"tracking.champion_mode={mode} must be max (higher is better) or min (lower is better)")
    from .registry import check_register

    check_register(tracking)  # tracking.register: auto | always | never
    uri, credentials = strip_credentials(str(tracking.uri))
    os.environ.update(credentials)  # MLflow's own variables: nothing prints or logs them
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # a server gone mid-run: fail in about a minute,
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")     # not after MLflow's default 7 retries x 120 s
    mlflow.set_tracking_uri(uri)
    system_metrics(bool(tracking.get("system_metrics", True)))
    if tracking.get("registry_uri"):
        mlflow.set_registry_uri(str(tracking.registry_uri))
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is None:
        location = artifact_location(uri, tracking.get("artifact_location"))
        exp_id = mlflow.create_experiment(tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


SYSTEM_METRICS_INTERVAL_S = 5  # MLflow samples every 10 s by default: a short run would get one point or none


def system_metrics(on: bool) -> None:
    """MLflow's built-in system metrics (tracking.system_metrics) for every run this process starts: CPU, memory,
    disk, network (psutil) and GPU where pynvml finds one, as `system/...` metrics sampled every
    SYSTEM_METRICS_INTERVAL_S seconds ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins). MLflow's INFO lines about
    starting and stopping the monitor stay off the console."""
    import mlflow

    if on:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))
        mlflow.enable_system_metrics_logging()
    else:
        mlflow.disable_system_metrics_logging()
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def is_remote(uri: str) -> bool:
    """A tracking server (or Databricks) rather than a store this process opens itself."""
    return str(uri).split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc", "uc")


def artifact_location(uri: str, configured: str | None) -> str | None:
    """The artifact root for a new experiment in store `uri` (see configure); None lets MLflow or the server decide.
    A local path becomes an absolute file:// URI (created); with a tracking server it is honoured but warned about:
    artifacts then bypass the server and only machines that see that path can read them."""
    if configured:
        location = str(configured)
        if "://" in location:
            return location
        if is_remote(uri):
            log.warning("tracking.artifact_location=%s is a local path but tracking.uri=%s is a server: artifacts "
                        "will be written to this machine's disk, not through the server (leave it null to let the "
                        "server store them)", location, uri)
        Path(location).mkdir(parents=True, exist_ok=True)
        return Path(location).resolve().as_uri()
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        return artifact_location("", str(db.parent / "mlartifacts"))
    return None


CODE_TAG = "medspark.code"  # the folder of the medspark package that recorded the run
PARENT_RUN_ENV = "MEDSPARK_PARENT_RUN_ID"  # set by medspark.sweep (and benchmarks/backends.py) for their jobs
SWEEP_PARAMS_ENV = "MEDSPARK_SWEEP_PARAMS"  # set by medspark.sweep for its jobs: its `sweep_params` (run names)


@contextmanager
def run(run_name: str | None = None, tags: dict | None = None):
    """An MLflow run that always ends: FINISHED, or FAILED with the error and traceback recorded on it, or KILLED
    (Ctrl-C, or SIGTERM: see medspark.interrupts) with the reason recorded alike.

    Launched by `mlflow run` (it sets MLFLOW_RUN_ID): this *is* that run, not a second one, and it stays in the
    experiment `mlflow run` put it in (its --experiment-name/--experiment-id, else MLflow's default).
    A job of a sweep ($MEDSPARK_PARENT_RUN_ID, see medspark.sweep): a child run of the sweep's parent run
    (tag mlflow.parentRunId), in the parent's experiment so that the UI nests it.
    Either way the process's log file is saved on the run as it ends (log_own_log)."""
    import mlflow

    tags = {k: mask_text(str(v)) for k, v in (tags or {}).items()}  # e.g. medspark.overrides: the command line
    tags.setdefault(CODE_TAG, str(Path(__file__).resolve().parent))  # which medspark ran (mlflow run of a checkout)
    launched = os.environ.get("MLFLOW_RUN_ID")  # mlflow.start_run() resumes it (and removes it from os.environ)
    parent = os.environ.get(PARENT_RUN_ENV)
    if launched:
        use_experiment_of(launched, "this process was launched by `mlflow run` (MLFLOW_RUN_ID)")
    elif parent:
        use_experiment_of(parent, f"this job belongs to the sweep run {PARENT_RUN_ENV}")
    if parent and parent != launched:
        tags["mlflow.parentRunId"] = parent
        tags.setdefault("medspark.job", _hydra_job_num())  # the sweep summary's row order
    active = mlflow.start_run(run_name=run_name, tags=tags)
    try:
        with terminate_raises():  # SIGTERM raises Terminated (a KeyboardInterrupt): KILLED, not RUNNING forever
            yield active
    except BaseException as e:
        try:
            mlflow.set_tags({"error": mask_text(f"{type(e).__name__}: {e}")[:5000], "error_type": type(e).__name__})
            mlflow.log_text(mask_text("".join(traceback.format_exception(e))), "error/traceback.txt")
            log_own_log()
        finally:
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    log_own_log()
    mlflow.end_run("FINISHED")


# ---------------------------------------------------------------- run names and descriptions

GROUP_KEYS = ("model", "backend", "dataset", "cluster", "experiment", "hparams_search", "local")  # group choices
NAME_NOISE = ("paths.", "tracking.", "hydra.", "hydra/", "materialize.", "serving.", "train.verbose", "train.resume")
NAME_MAX = 120  # characters of a run name medspark makes up
SWEEP_KEY = re.compile(r"(?:^|\s)[+~]*([\w./@-]+)=")  # the keys of a sweep's `sweep_params` ("train.lr=1e-3,3e-4")


def run_name(cfg, overrides=()) -> str:
    """The MLflow run name: tracking.run_name when set, else `<model>-<backend>` plus the command-line overrides
    that are not group choices (nor where things go: paths, tracking, hydra), shortened to the key's last part and
    the value (`train.lr=3e-3` -> `lr3e-3`): `small_cnn-single-lr3e-3`. A sweep job ($MEDSPARK_PARENT_RUN_ID) is
    named by the overrides its sweep varies (its parent's `sweep_params`), so sibling jobs differ at a glance."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = sweep_keys(os.environ.get(PARENT_RUN_ENV), os.environ.get(SWEEP_PARAMS_ENV))
    parts = [f"{cfg.model.name}-{cfg.backend.name}"]
    for override in overrides:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+")
        if not sep or key.startswith("~") or key.startswith(NAME_NOISE) or is_secret_key(key):
            continue
        if swept is not None and key not in swept:
            continue
        if key in GROUP_KEYS:  # a swept dataset or cluster names itself; model and backend are already there
            if swept is not None and key not in ("model", "backend"):
                parts.append(_short_value(value))
            continue
        parts.append(key.rsplit(".", 1)[-1] + _short_value(value))
    return "-".join(parts)[:NAME_MAX]


def _short_value(value: str) -> str:
    """An override's value as a run name shows it: floats to 3 significant digits, paths by their last part."""
    value = value.strip().strip("'\"")
    try:
        if any(c in value for c in ".eE") and len(value) > 6:
            value = f"{float(value):.3g}"
    except ValueError:
        pass
    if "/" in value:
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[\s,\[\]{}()]+", "_", value)[:24]


def sweep_keys(parent_id: str | None, swept: str | None = None) -> set[str] | None:
    """The keys a sweep varies: from `swept` ($MEDSPARK_SWEEP_PARAMS, which medspark.sweep exports), else read
    from the parent run's `sweep_params` (a parent made by another tool, e.g. benchmarks/backends.py); None outside
    a sweep (or when the parent is not readable: the job is then named by all its overrides)."""
    if not parent_id:
        return None
    if swept is None:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            swept = mlflow.MlflowClient().get_run(parent_id).data.params.get("sweep_params")
        except MlflowException:
            return None
    if not swept or swept == "(none)":
        return None
    return {k.lstrip("+") for k in SWEEP_KEY.findall(swept)}


def describe_run(cfg, data, objective: str, overrides=()) -> str:
    """The run's description (tag mlflow.note.content, shown on the run's page in the UI): what was trained on
    what, judged by which metric, and the command-line overrides."""
    classes = list(data.classes)
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes) - 8} more)" if len(classes) > 8 else "")
    kind = "findings" if data.task == "multilabel" else "classes"
    sizes = data.sizes
    text = [f"{cfg.model.name} trained with backend {cfg.backend.name} on dataset `{cfg.dataset.name}`: "
            f"{data.task}, {len(classes)} {kind} ({shown}).",
            f"Objective: {objective}. Data: {sizes.get('train', 0)} train / {sizes.get('val', 0)} val / "
            f"{sizes.get('test', 0)} test images ({data.accepted} of {data.listed} listed accepted), "
            f"image shape {'x'.join(str(d) for d in data.shape)}, fingerprint {data.fingerprint}."]
    given = mask_text(" ".join(str(o) for o in overrides))
    text.append(f"Overrides: `{given}`" if given else "Overrides: none (the defaults of conf/config.yaml).")
    return "\n\n".join(text)


def log_inputs(data, splits=("train", "val", "test")) -> None:
    """Each Petastorm split as an MLflow dataset input of the run (the UI's Datasets column, lineage):
    name `<dataset>-<split>`, digest = the data fingerprint, source = the split's URL, context = the split."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset = data.url.rstrip("/").rsplit("/", 2)[-2] if data.url.count("/") >= 2 else "data"  # <url>/<name>/<fp>
    for split in splits:
        url = data.split_url(split)
        try:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": local sources register twice
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(url)
        except Exception as e:  # a scheme no MLflow dataset source knows: the run still has data_url
            log.info("no MLflow dataset source for %s (%s): split not logged as a dataset input", url, e)
            return
        mlflow.log_input(MetaDataset(source, name=f"{dataset}-{split}", digest=data.fingerprint), context=split)


def log_own_log() -> None:
    """This process's log file (the Hydra job's `<job>.log`, every file handler of the root logger) as the run's
    artifact `logs/<file>`, secrets masked: what the console showed through logging, kept with the run."""
    import mlflow

    for handler in logging.getLogger().handlers:
        path = getattr(handler, "baseFilename", None)
        if not isinstance(handler, logging.FileHandler) or not path:
            continue
        try:
            handler.flush()
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if text:
            try:
                mlflow.log_text(mask_text(text), f"logs/{Path(path).name}")
            except Exception as e:  # never the error that ends a run: the log is a convenience
                log.warning("could not save %s on the run: %s", path, e)


def _hydra_job_num() -> str:
    """This job's number in a Hydra sweep, "-" outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().job.num)
    except Exception:  # not in a Hydra job (ValueError), or no job number (MissingMandatoryValue)
        return "-"


def use_experiment_of(run_id: str, why: str) -> None:
    """Make the experiment of run `run_id` the active one (MLflow refuses to resume or nest a run across
    experiments), or fail with one line when the run is not in the configured store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .config import ConfigError

    try:
        found = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError(f"{why}, but run {run_id} is not in tracking.uri={mlflow.get_tracking_uri()}: point "
                          "tracking.uri at the store that holds it (for `mlflow run`: MLFLOW_TRACKING_URI)") from None
    experiment = mlflow.set_experiment(experiment_id=found.info.experiment_id)
    log.info("%s: recording into experiment '%s'", why, experiment.name)


def log_params(params: dict) -> None:
    import mlflow

    clean = {k: mask_text(str(v))[:PARAM_MAX] for k, v in mask_secrets(params).items()}
    items = sorted(clean.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
        mlflow.log_params(dict(items[i:i + 100]))


def log_config(cfg, overrides) -> None:
    """The resolved config as flat params (secrets masked) and as YAML, plus the command-line overrides."""
    import mlflow
    from omegaconf import OmegaConf

    log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    joined = mask_text(" ".join(overrides))[:PARAM_MAX] or "(none)"
    given = mlflow.active_run().data.params.get("overrides")  # `mlflow run -P overrides=...` logged it already
    mlflow.log_param("overrides" if given is None else "hydra_overrides", joined)  # params cannot change
    masked = OmegaConf.create(mask_nested(OmegaConf.to_container(cfg, resolve=True)))
    mlflow.log_text(OmegaConf.to_yaml(masked), "config/resolved.yaml")
    redact_hydra_output()


def redact_hydra_output() -> None:
    """Hydra writes the job's config and overrides as given to <output folder>/.hydra/*.yaml before medspark runs:
    a secret passed on the command line (privacy.phi_key=..., a password) is masked there too (mask_text)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        folder = Path(hc.runtime.output_dir) / str(hc.output_subdir)
    except Exception:  # not in a Hydra job, or no .hydra folder (hydra.output_subdir=null)
        return
    for f in folder.glob("*.yaml"):
        text = f.read_text()
        masked = mask_text(text)
        if masked != text:
            f.write_text(masked)


def log_data(data) -> None:
    """What the data stage did: counts, duplicates, where the Petastorm data is (also as the run's dataset inputs),
    and every rejected file."""
    import mlflow
    from .data.materialize import rejected_csv

    mlflow.log_metrics(data.summary())
    log_params({"data_url": data.url, "data_fingerprint": data.fingerprint, "classes": ",".join(data.classes),
                "task": data.task})
    mlflow.log_text(rejected_csv(data.rejected), "data/rejected.csv")
    log_inputs(data)
    mlflow.log_dict({"sizes": data.sizes, "per_class": data.per_class, "reused": data.reused, "seconds": data.seconds,
                     "duplicate_groups": data.duplicate_groups, "duplicate_files": data.duplicate_files,
                     "label_conflicts": data.label_conflicts, "moved_to_test": data.moved_to_test, "task": data.task,
                     "per_source": data.per_source, "split_stats": data.split_stats},
                    "data/splits.json")
    mlflow.log_metrics({f"data_n_{split}_source_{source}": n for split, by_source in data.per_source.items()
                        for source, n in by_source.items()})  # a merged dataset's sources (data/sources/merged.py)
    if data.reused:
        mlflow.set_tag("medspark.data_reused", "true")
        log.info("reused the materialized dataset at %s", data.url)


def log_listing(listing) -> None:
    """The files under dataset.root that are not inputs (outside the class folders, folders that are not classes,
    symlink loops, unreadable folders), with the reason each is not: `data/ignored.csv` and `data_ignored`. With
    data/rejected.csv, every file under the root is accounted for."""
    import mlflow
    from .data.materialize import rejected_csv

    from .data.phi import path_key, shown_rows

    mlflow.log_metric("data_ignored", len(listing.ignored))
    mlflow.log_text(rejected_csv(shown_rows(listing.ignored, path_key())), "data/ignored.csv")
    if any(r.source for r in listing.records):  # a merged dataset: what each source brought, what its map dropped
        from .data.sources.merged import counts_per_source, dropped_per_source

        mlflow.log_dict({"per_source": counts_per_source(listing), "dropped_unmapped": dropped_per_source(listing)},
                        "data/sources.json")


def log_training(result, live=None) -> None:
    """Per-epoch curves and what the backend reports about itself (workers, batch, its own metrics). `live`: the
    backends.keras_fit.LiveMetrics the fit ran under; what it logged during training is not logged again."""
    import mlflow

    log_history(result.history, result.epoch_seconds, first_epoch=getattr(result, "resumed_epochs", 0),
                skip=live.logged if live is not None else ())
    log_params({f"backend_{k}": v for k, v in result.params.items()} |
               {"workers": result.workers, "global_batch_size": result.global_batch_size})
    mlflow.log_metrics(result.metrics | {"epochs_run": len(result.epoch_seconds)})


def baseline_key(data_fingerprint: str, model_cfg: dict, epochs: int) -> str:
    """Runs with equal keys trained the same model on the same data for the same epochs: comparable speeds."""
    import hashlib

    blob = json.dumps({"data": data_fingerprint, "model": model_cfg, "epochs": int(epochs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def log_speedup(result, backend: str, key: str, measured=None) -> dict:
    """speedup_vs_single = this run's training images/s over the `single` baseline's, for the same key:
    measured in this run (train.measure_baseline=true), else the newest finished `single` run with the key
    in this experiment; parallel_efficiency = speedup / workers. Logs nothing when there is no baseline."""
    import mlflow

    mlflow.set_tag("medspark.baseline_key", key)
    if backend == "single":
        base, source = result.images_per_second, "self"
    elif measured is not None:
        base, source = measured.images_per_second, "measured in this run"
        mlflow.log_metrics({"baseline_train_seconds": measured.train_seconds,
                            "baseline_train_images_per_second": measured.images_per_second})
    else:
        run = mlflow.active_run()
        found = mlflow.search_runs(
            experiment_ids=[run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`medspark.baseline_key` = '{key}' and tags.`medspark.backend` = 'single' "
                          "and attributes.status = 'FINISHED'", output_format="list")
        if not found or "train_images_per_second" not in found[0].data.metrics:
            log.info("no `single` run with the same data, model and epochs in this experiment: no speedup logged "
                     "(run backend=single first, or pass train.measure_baseline=true)")
            return {}
        base, source = found[0].data.metrics["train_images_per_second"], found[0].info.run_id
    if not base:
        return {}
    speedup = result.images_per_second / base
    out = {"speedup_vs_single": speedup, "parallel_efficiency": speedup / max(1, result.workers)}
    mlflow.log_metrics(out)
    mlflow.set_tag("medspark.baseline", source)
    return out


def history_metric(key: str) -> str:
    """The MLflow metric name of a Keras history key (`learning_rate` -> `epoch_learning_rate`)."""
    return f"epoch_{key}" if key in ("learning_rate",) else key


def log_history(history: dict, epoch_seconds: list[float], first_epoch: int = 0, skip=()) -> None:
    """Per-epoch curves, step = epoch index (0-based, as Keras counts). A resumed training's history covers every
    epoch (those before the interruption come from its checkpoint); `epoch_seconds` only the epochs this run
    trained, from `first_epoch` on. `skip`: (metric, step) pairs already logged while training (LiveMetrics)."""
    import mlflow
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    metrics = [Metric(history_metric(k), float(v), now, step)
               for k, vals in history.items() for step, v in enumerate(vals)]
    metrics += [Metric("epoch_seconds", float(v), now, step) for step, v in enumerate(epoch_seconds, first_epoch)]
    skip = set(skip)
    metrics = [m for m in metrics if (m.key, m.step) not in skip]
    if not metrics:
        return
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_model(model, example, registered_name: str | None):
    """The Keras model with signature and input example; registered when a name is configured.
    (mlflow.keras.log_model fails on input examples with Keras 3.15 here; mlflow.tensorflow works.)"""
    import mlflow
    from mlflow.models import infer_signature

    model = portable(model)
    signature = infer_signature(example, model.predict(example, verbose=0))
    info = mlflow.tensorflow.log_model(model, name="model", signature=signature, input_example=example,
                                       registered_model_name=registered_name or None)
    return info


def portable(model):
    """The model as plain Keras can reload it: a model compiled with one of medspark's own losses (backends/losses.py)
    is logged as an uncompiled copy with the same weights (serving and prediction never need the optimizer)."""
    if type(getattr(model, "loss", None)).__module__.startswith("medspark"):
        import keras

        copy = model.__class__.from_config(model.get_config())  # clone_model, to_json would compile it too
        copy.set_weights(model.get_weights())
        return copy
    return model


CLASSIFIER_NAME = "classifier"  # the packaged model's name in the run, and the registry suffix


def classifier_registered_name(registered_name: str | None) -> str | None:
    """The packaged classifier registers beside the Keras model: `<tracking.registered_model>-classifier`."""
    return f"{registered_name}-{CLASSIFIER_NAME}" if registered_name else None


def log_classifier(model, preprocess, classes, example_images, registered_name: str | None, serving_cfg=None,
                   task: str | None = None, shipped: dict | None = None):
    """The model at work: the same Keras model packaged with the run's preprocessing and class names as a
    pyfunc (`medspark.serving`) that takes raw image files. A second logged model of the run, `classifier`,
    registered as `<registered_name>-classifier` when a name is configured; the Keras model stays `model`.
    serving_cfg: the `serving:` limits (a mapping), baked into the model; None = their defaults. task: the dataset's;
    shipped: what evaluation chose on the validation split for the classifier (evaluate.evaluate_split), e.g. the
    per-finding thresholds of a multilabel model."""
    from . import serving

    quiet_cloudpickle_warning()
    limits = serving.ServingLimits.from_mapping(serving_cfg or {})
    return serving.log_model(portable(model), preprocess, classes, example_images, name=CLASSIFIER_NAME,
                             registered_model_name=classifier_registered_name(registered_name), limits=limits,
                             task=task, **(shipped or {}))


CLOUDPICKLE_WARNING = "Passing a Python object as `python_model` causes it to be serialized using CloudPickle"


class _DropCloudPickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CLOUDPICKLE_WARNING)


def quiet_cloudpickle_warning() -> None:
    """MLflow warns on every pyfunc logged from a Python object that it is pickled with CloudPickle. The classifier's
    pickle is medspark.serving.ImageClassifier by reference, with no state, and its code ships beside it
    (code_paths): that one warning is dropped from the `mlflow.pyfunc` logger; every other warning stays."""
    logger = logging.getLogger("mlflow.pyfunc")
    if not any(isinstance(f, _DropCloudPickleWarning) for f in logger.filters):
        logger.addFilter(_DropCloudPickleWarning())


def model_uri(info, registered_name: str | None = None) -> str:
    """`models:/<name>/<version>` for a registered model (the name it was registered under, see
    registry.register_logged; else `registered_name`), else the logged model's own URI."""
    name = getattr(info, "registered_model_name", None) or registered_name
    if name and info.registered_model_version:
        return f"models:/{name}/{info.registered_model_version}"
    return info.model_uri


def log_models(model, data, cfg, shipped: dict | None = None):
    """Both models of a training run, with two test images as input example: `model` (Keras) and `classifier`
    (medspark.serving, with the dataset's task and what evaluation `shipped`, e.g. multilabel thresholds); the run tagged with its
    data definition, and both models registered under its name when this run registers (medspark.registry:
    tracking.registered_model, tracking.register). Returns their (model, classifier) infos."""
    from omegaconf import OmegaConf

    from . import registry
    from .data import loader
    from .data.preprocess import PreprocessConfig

    definition = registry.data_definition(data)
    registry.record_definition(definition, registry.base_name(cfg))
    example, _ = loader.read_arrays(data.split_url("test"), limit=2)
    info = log_model(model, example.astype("float32"), None)
    pre = PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess))
    serving_cfg = OmegaConf.to_container(cfg.serving) if cfg.get("serving") else None
    models = info, log_classifier(model, pre, data.classes, example, None, serving_cfg, data.task, shipped)
    registry.register_logged(models, cfg, definition)
    return models


SUMMARY_TEST = ("test_accuracy", "test_macro_f1", "test_roc_auc_ovr", "test_n")  # the summary's headline metrics


SUMMARY_TEST_MULTILABEL = ("test_mean_auc", "test_mean_ap", "test_macro_f1", "test_subset_accuracy",
                           "test_hamming_loss", "test_n")


def run_summary(cfg, run, models, metrics: dict, result, speed: dict, timings: dict, champion,
                objective: str) -> dict:
    """What a training run's summary.json records and the console shows: where the run and its two models
    (`models`: log_models' infos) are, the objective (`objective`: the metric train.objective resolved to),
    the headline test metrics, speed and wall times."""
    name = cfg.tracking.get("registered_model")
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "model_uri": model_uri(models[0], name),
            "classifier_uri": model_uri(models[1], classifier_registered_name(name)),
            "objective": {objective: float(metrics.get(objective, float("nan")))},
            "test": {k: round(v, 4) for k, v in metrics.items() if k in SUMMARY_TEST + SUMMARY_TEST_MULTILABEL},
            "training": {"backend": cfg.backend.name, "workers": result.workers,
                         "images_per_second": round(result.images_per_second, 1),
                         **{k: round(v, 3) for k, v in speed.items()}},
            "seconds": {k: round(v, 1) for k, v in timings.items() if k.endswith("seconds")},
            "champion": champion}


def print_summary(summary: dict, uri: str, json_path: str | Path | None = None, print_json: bool = False) -> None:
    """The end of a training run on the console: one short block (run, objective, test metrics, speed, models,
    champion, where the JSON is, how to open the UI). The full JSON is summary.json on the run and at `json_path`;
    it is printed too only with `print_json` (tracking.print_summary_json=true)."""
    print("\n".join(summary_lines(summary, uri, json_path)), flush=True)
    if print_json:
        print(json.dumps(summary, indent=2), flush=True)


def summary_lines(summary: dict, uri: str, json_path: str | Path | None = None) -> list[str]:
    """print_summary's block, one line per topic."""
    def num(v):
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else str(v)

    (objective, value), = summary["objective"].items()
    test = " ".join(f"{k.removeprefix('test_')}={int(v) if k.endswith('_n') else num(v)}"  # test_n: a count
                    for k, v in summary.get("test", {}).items())
    train = summary.get("training", {})
    speed = f"{train.get('backend')}, {train.get('workers')} worker(s), {train.get('images_per_second')} images/s"
    if "speedup_vs_single" in train:
        speed += f", speedup {train['speedup_vs_single']}x"
    seconds = summary.get("seconds", {})
    times = ", ".join(f"{k.removesuffix('_seconds')} {v:g} s" for k, v in seconds.items()
                      if k in ("preprocess_seconds", "materialize_seconds", "train_seconds", "evaluate_seconds"))
    champion = summary.get("champion") or {}
    crown = champion.get("decision", "")
    if champion.get("champion_uri"):
        crown = f"{crown}: {champion['champion_uri']} is version {champion.get('champion_version')}"
    if champion.get("reason"):
        crown += f" ({champion['reason']})"
    lines = [f"\n=== medspark run finished: {summary.get('run_name') or summary['run_id']} ===",
             f"objective:  {objective} = {num(value)}",
             f"test:       {test}",
             f"training:   {speed}" + (f"; {times}" if times else ""),
             f"model:      {summary['model_uri']}   classifier: {summary.get('classifier_uri', '')}",
             f"champion:   {crown or 'n/a'}",
             f"run id:     {summary['run_id']}" + (f"   summary: {json_path}" if json_path else ""),
             *([f"report:     {summary['report']}"] if summary.get("report") else []),
             f"MLflow UI:  {store_uri_for_ui(uri)}   (then open http://127.0.0.1:5000)"]
    return lines


def write_summary(summary: dict) -> Path | None:
    """summary.json in this Hydra job's output folder (outputs/<date>/<time>/, a sweep job's multirun/.../<n>/),
    beside the job's log; None outside a Hydra job (train() called from Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not in a Hydra job
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def store_uri_for_ui(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {mask_text(uri)}" if uri else "mlflow ui"  # printed: no password


def disable_autologging_noise() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
