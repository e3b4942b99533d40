"""Config plumbing: where the project lives, the `${medspark_root:}` resolver, and checks that fail early."""
from __future__ import annotations

import os
import sys
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


def exit_on_bad_overrides(argv=None) -> None:
    """check_overrides for a command's main(): one line on stderr and exit status 2, as for the other checks."""
    try:
        check_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"medspark: error: {e}", file=sys.stderr)
        sys.exit(2)
