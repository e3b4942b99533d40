"""Config plumbing: where the project lives, the `${medspark_root:}` resolver, and checks that fail early."""
from __future__ import annotations

import os
from pathlib import Path

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


def check(cfg: DictConfig) -> None:
    """Everything that can be checked before Spark or TensorFlow start."""
    from .data.preprocess import PreprocessConfig
    from .data.splits import check_fractions
    from .spark import master_url

    missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra")]
    if missing:
        hints = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)}. Pass them on the command line: {hints}")
    try:
        PreprocessConfig.from_mapping(OmegaConf.to_container(cfg.preprocess))
        check_fractions(float(cfg.split.val), float(cfg.split.test), has_test_split=False if
                        cfg.dataset.get("layout") != "split_folders" else True)
        master_url(cfg.cluster)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.train
    for key, ok, want in (("epochs", int(t.epochs) >= 1, "an integer >= 1"),
                          ("batch_size", int(t.batch_size) >= 1, "an integer >= 1"),
                          ("lr", float(t.lr) > 0, "a positive number")):
        if not ok:
            raise ConfigError(f"train.{key}={t[key]} must be {want}")
    if not str(t.objective).startswith("test_"):
        raise ConfigError(f"train.objective={t.objective} must be a test metric such as test_accuracy or test_macro_f1")
