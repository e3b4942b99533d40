"""Config plumbing: where the project lives, the `${medspark_root:}` resolver, and checks that fail early."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # src/medspark/config.py -> the checkout


def project_root() -> Path:
    """$MEDSPARK_HOME, else the checkout this package runs from (editable install), else the cwd."""
    if os.environ.get("MEDSPARK_HOME"):
        return Path(os.environ["MEDSPARK_HOME"]).expanduser().resolve()
    if (PACKAGE_ROOT / "conf" / "config.yaml").is_file():
        return PACKAGE_ROOT
    return Path.cwd()


def config_dir() -> str:
    return str(project_root() / "conf")


if not OmegaConf.has_resolver("medspark_root"):
    OmegaConf.register_new_resolver("medspark_root", lambda: str(project_root()))


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and what would."""


AUTO_OBJECTIVE = "auto"
OBJECTIVE_TAG = "medspark.objective"  # the metric a training run's objective resolved to (objective_metric)


def objective_metric(objective: str, task: str | None) -> str:
    """train.objective as the test metric it names, the one place `auto` is resolved: test_mean_auc for a
    multilabel dataset, test_accuracy for binary and multiclass (and when the task is unknown)."""
    if str(objective) != AUTO_OBJECTIVE:
        return str(objective)
    return "test_mean_auc" if task == "multilabel" else "test_accuracy"


def runs_objective(objective: str, runs) -> str:
    """train.objective for reading finished runs back (sweep summaries, `medspark compare`): `auto` is the metric
    most of the runs resolved it to (their OBJECTIVE_TAG; runs without it predate tasks: test_accuracy)."""
    if str(objective) != AUTO_OBJECTIVE:
        return str(objective)
    from collections import Counter

    seen = Counter(r.data.tags.get(OBJECTIVE_TAG) or objective_metric(objective, None) for r in runs)
    return seen.most_common(1)[0][0] if seen else objective_metric(objective, None)


def check(cfg: DictConfig) -> None:
    """Everything that can be checked before Spark or TensorFlow start."""
    from .data.preprocess import PreprocessConfig
    from .data.sources import has_test_split
    from .data.splits import check_fractions, check_label_conflicts
    from .spark import master_url

    missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra")]
    if missing:
        hints = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)}. Pass them on the command line: {hints}")
    try:
        PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess))
        check_fractions(float(cfg.split.val), float(cfg.split.test), has_test_split=has_test_split(cfg.dataset))
        check_label_conflicts(str(cfg.split.get("label_conflicts", "reject")))
        master_url(cfg.cluster)
        if cfg.get("serving") is not None:  # baked into the logged classifier at the end: checked now, not then
            from .serving import ServingLimits

            ServingLimits.from_mapping(OmegaConf.to_container(cfg.serving, resolve=True))
        check_evaluate(OmegaConf.to_container(cfg.evaluate, resolve=True) if cfg.get("evaluate") else {})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    TrainConfig.from_cfg(cfg.train)
    if cfg.get("privacy") is not None:
        _coerce(cfg.privacy.get("hash_paths", False), bool, "privacy.hash_paths")
    if str(cfg.train.objective) != AUTO_OBJECTIVE and not str(cfg.train.objective).startswith("test_"):
        raise ConfigError(f"train.objective={cfg.train.objective} must be `auto` or a test metric such as "
                          "test_accuracy, test_macro_f1 or test_mean_auc")
    check_data_url("paths.data_url", cfg.paths.data_url)
    if cfg.paths.get("checkpoint_url"):
        check_data_url("paths.checkpoint_url", cfg.paths.checkpoint_url)
    from .tracking import check_store

    check_store(cfg.tracking)


def check_evaluate(options) -> None:
    """The `evaluate:` keys, each checked by the part that uses it after training (a typo must not cost a whole
    training run): bootstrap (medspark.uncertainty), operating_point (medspark.operating_points), calibration,
    temperature and tta (medspark.calibration), gradcam (medspark.explain), volume_aggregation (medspark.evaluate_volumes).
    ValueError naming the key."""
    from .calibration import Options
    from .evaluate_volumes import check_aggregation
    from .explain import options as gradcam_options
    from .operating_points import parse_rule
    from .uncertainty import check_options

    options = options or {}
    check_options(options.get("bootstrap"))
    parse_rule(options.get("operating_point", "auto"))
    Options.from_mapping(options)
    gradcam_options(options)
    check_aggregation(options.get("volume_aggregation", "mean"))


# Where materialized data can live: what Petastorm and Spark both open here. file and hdfs are built in; the
# object stores need their fsspec package on the driver and executors (and Hadoop's connector jar for Spark).
DATA_SCHEMES = {"file": None, "hdfs": None, "viewfs": None, "s3": "s3fs", "s3a": "s3fs", "s3n": "s3fs",
                "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "abfss": "adlfs"}


def check_data_url(key: str, url) -> None:
    """A data URL whose scheme nothing here can open is one line now, not a Java stack trace after Spark starts."""
    import importlib.util

    url = str(url)
    if "://" not in url:
        return  # a plain path: file://
    scheme = url.split("://", 1)[0].lower()
    if scheme not in DATA_SCHEMES:
        raise ConfigError(f"{key}={url}: scheme {scheme}:// is not supported for datasets; use a path, file://, "
                          f"hdfs://, s3a://, gs:// or abfss://")
    package = DATA_SCHEMES[scheme]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}={url} needs the Python package {package} (pip install {package}, on the driver "
                          f"and the executors), which is not installed")


# ---------------------------------------------------------------- typed schemas (defaults live in conf/, not here)

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("none", "plateau", "cosine")
CLASS_WEIGHTS = (None, "balanced")
ES_MODES = ("auto", "min", "max")


@dataclass(frozen=True)
class Augment:
    """Training-batch augmentation (`train.augment`): never applied to val/test."""
    flip: bool  # left-right flips
    rotation: float  # max rotation as a fraction of a full turn
    brightness: float  # max brightness shift as a fraction of the pixel range
    contrast: float  # max contrast change factor (0 = off)
    zoom: float = 0.0  # max zoom in or out as a fraction of the side (in: a random crop resized back; 0 = off)
    translate: float = 0.0  # max shift as a fraction of the side, each axis (0 = off)

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotation or self.brightness or self.contrast or self.zoom or self.translate)


@dataclass(frozen=True)
class EarlyStopping:
    monitor: str  # a Keras log key: val_loss, val_accuracy, ...
    patience: int  # 0 = off
    mode: str = "auto"  # auto: max for accuracy-like keys, min otherwise (schedule.improves is the one rule)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` group, typed and validated once (`from_cfg`); backends read it, never the raw config."""
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    lr_schedule: str
    early_stopping: EarlyStopping
    augment: Augment
    shuffle_buffer: int
    class_weight: str | None
    verbose: int
    objective: str
    measure_baseline: bool
    resume: bool
    mixed_precision: bool = False  # keras_fit.fit trains under the mixed_float16 policy (docs/gpu.md)
    warmup_epochs: int = 0  # linear warm-up of the rate over the first epochs, then the schedule
    label_smoothing: float = 0.0  # targets (1 - e) on the class, e / K spread over all (single-label and multilabel)
    ema: float = 0.0  # keep an exponential moving average of the weights (per step, this momentum); 0 = off
    snapshots: int = 0  # >= 2: cosine restarts, the weights at each cycle's end kept, their soft vote is the model
    mixup: float = 0.0  # > 0: training batches are mixed pairs, weight ~ Beta(mixup, mixup), targets mixed alike

    @classmethod
    def from_cfg(cls, train) -> "TrainConfig":
        """From the `train` config (DictConfig or dict): every key checked, one ConfigError line per mistake."""
        raw = OmegaConf.to_container(train, resolve=True) if isinstance(train, DictConfig) else dict(train)
        return _typed(cls, raw, "train")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"train.optimizer": OPTIMIZERS, "train.lr_schedule": LR_SCHEDULES, "train.class_weight": CLASS_WEIGHTS,
            "train.early_stopping.mode": ES_MODES}
_MINIMUM = {"train.epochs": 1, "train.batch_size": 1, "train.shuffle_buffer": 0, "train.weight_decay": 0,
            "train.early_stopping.patience": 0, "train.augment.rotation": 0, "train.augment.brightness": 0,
            "train.augment.contrast": 0, "train.augment.zoom": 0, "train.augment.translate": 0, "train.verbose": 0,
            "train.warmup_epochs": 0, "train.label_smoothing": 0, "train.ema": 0, "train.snapshots": 0, "train.mixup": 0}


def _typed(cls, raw, key: str):
    """A dataclass from a mapping: unknown or missing keys, wrong types, bad choices and ranges are one line."""
    import difflib
    import typing

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a mapping of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            near = difflib.get_close_matches(str(k), fields, n=1)
            raise ConfigError(f"{key}.{k} is not a setting of {key}" + (f"; did you mean {key}.{near[0]}?" if near
                                                                         else f"; valid: {', '.join(fields)}"))
    hints = typing.get_type_hints(cls)
    out = {}
    for name, f in fields.items():
        full = f"{key}.{name}"
        if name not in raw:
            if f.default is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{full} is missing; set it in conf/config.yaml or on the command line ({full}=...)")
        value, kind = raw[name], hints[name]
        if dataclasses.is_dataclass(kind):
            out[name] = _typed(kind, value, full)
            continue
        out[name] = value = _coerce(value, kind, full)
        if full in _CHOICES and value not in _CHOICES[full]:
            valid = ", ".join("null" if c is None else c for c in _CHOICES[full])
            raise ConfigError(f"{full}={value} must be one of {valid}")
        if full in _MINIMUM and value < _MINIMUM[full]:
            raise ConfigError(f"{full}={value} must be >= {_MINIMUM[full]}")
    if key == "train" and not out["lr"] > 0:
        raise ConfigError(f"train.lr={out['lr']} must be a positive number")
    for name in ("label_smoothing", "ema") if key == "train" else ():
        if not out.get(name, 0.0) < 1:
            raise ConfigError(f"train.{name}={out[name]} must be in [0, 1)")
    if key == "train" and out.get("snapshots", 0) >= 2:
        n, span = out["snapshots"], out["epochs"] - out.get("warmup_epochs", 0)
        if out["lr_schedule"] != "cosine":
            raise ConfigError(f"train.snapshots={n} restarts the cosine schedule: set train.lr_schedule=cosine "
                              f"(it is {out['lr_schedule']})")
        if out["early_stopping"].patience:
            raise ConfigError(f"train.snapshots={n} keeps every cycle's last weights: set "
                              "train.early_stopping.patience=0 (early stopping would cut the cycles short)")
        if out.get("ema", 0.0):
            raise ConfigError(f"train.snapshots={n} and train.ema={out['ema']}: the snapshots are the cycles' own "
                              "weights, the moving average would blur them; set one of them to 0")
        if span < n:
            raise ConfigError(f"train.snapshots={n} needs at least one epoch per cycle: train.epochs - "
                              f"train.warmup_epochs is {span}")
    return cls(**out)


def _coerce(value, kind, key: str):
    """bool / int / float / str (optionally None) from YAML or the command line; anything else is a ConfigError."""
    import typing

    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} must be set (got null)")
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r} must be {want}")


NOT_OPTION_GROUPS = ("hydra", "local")  # conf/ folders that are not user-facing choice groups


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/ (sorted, without the extension)."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def option_groups() -> list[str]:
    return sorted(p.name for p in Path(config_dir()).iterdir() if p.is_dir() and p.name not in NOT_OPTION_GROUPS)


def check_overrides(argv) -> None:
    """Command-line choices of a config group that do not exist (backend=nope, -m model=small_cnn,vgg), as one
    line naming the group and its options, before Hydra composes (its own report is a dozen lines)."""
    if any(a.startswith(("--config-dir", "--config-path", "-cd", "-cp")) or "hydra.searchpath" in a for a in argv):
        return  # options may come from another search path: let Hydra decide
    words = [a for a in argv if "=" in a and not a.startswith("-")]
    if not words:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        parsed = OverridesParser.create().parse_overrides(words)
    except Exception:  # a syntax error: Hydra reports it with its own pointer into the text
        return
    groups = set(option_groups())
    for o in parsed:
        if o.key_or_group not in groups or o.is_delete():
            continue
        if o.is_sweep_override():
            if not isinstance(o.value(), ChoiceSweep):
                continue  # glob(...), range(...): Hydra expands them against what exists
            values = list(o.sweep_string_iterator())
        else:
            values = [o.value()]
        for v in values:
            if v is None or str(v) == "null":
                continue
            if not (Path(config_dir()) / o.key_or_group / f"{v}.yaml").is_file():
                raise ConfigError(f"{o.key_or_group}={v} is not an option of the {o.key_or_group} group; valid: "
                                  f"{', '.join(group_options(o.key_or_group))}")


def check_keys(argv) -> None:
    """Command-line settings whose key the composed config does not have (train.epoch=2, preprocess.size=64), as
    one line with the nearest key ("did you mean train.epochs?"), before Hydra composes (its own report is
    "Key 'epoch' is not in struct"). `+key=` (adding a key) is left to Hydra, as is anything it cannot compose."""
    import difflib

    if any(a.startswith(("--config-dir", "--config-path", "-cd", "-cp")) or "hydra.searchpath" in a for a in argv):
        return
    words = [a for a in argv if "=" in a and not a.startswith("-")]
    if not words:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(words)
    except Exception:
        return
    groups = set(option_groups())
    keys = [o for o in parsed if o.key_or_group not in groups and "/" not in o.key_or_group and not o.is_delete()
            and not o.is_add() and not o.is_force_add() and not o.key_or_group.startswith("hydra.")]
    if not keys:
        return
    choices = []
    for o in parsed:
        if (o.key_or_group in groups or "/" in o.key_or_group) and not o.is_delete():
            value = next(iter(o.sweep_string_iterator()), None) if o.is_sweep_override() else o.get_value_string()
            if value is not None:
                choices.append(f"{o.get_key_element()}={value}")
    try:
        cfg = compose_project_config([c for c in choices if not c.startswith("hydra/")])
    except Exception:  # a composition error Hydra reports better (or an option only another search path has)
        return
    known = None
    swept = {o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group in groups}
    for o in keys:
        key = o.key_or_group
        if key.split(".", 1)[0] in swept:  # a key of a swept group may belong to another of its options
            continue
        if _has_key(cfg, key):
            continue
        if known is None:
            from .tracking import flatten

            known = list(flatten(OmegaConf.to_container(cfg, resolve=False)))
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else "medspark --cfg job lists the settings"
        raise ConfigError(f"{key} is not a setting; {hint} (to add a new key: +{key}=...)")


_ABSENT = object()


def _has_key(cfg, key: str) -> bool:
    """`key` is a node of `cfg`, set or not (`???`, `null`)."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True) is not _ABSENT
    except MissingMandatoryValue:
        return True
    except Exception:  # an interpolation that cannot resolve here: the key is there
        return True


def exit_on_bad_overrides(argv=None) -> None:
    """check_overrides and check_keys for a command's main(): one line on stderr and exit status 2, as for the
    other checks."""
    try:
        check_overrides(sys.argv[1:] if argv is None else argv)
        check_keys(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"medspark: error: {e}", file=sys.stderr)
        sys.exit(2)


def compose_project_config(overrides=(), *, return_hydra_config: bool = False) -> DictConfig:
    """The project's config as the `medspark` command composes it (conf/, conf/local, `overrides`), for code that
    runs outside a Hydra app: compare, predict, tests, notebooks (with the `hydra` node when asked, as a sweep's
    callbacks see it). Hydra's global state is cleared before and after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
