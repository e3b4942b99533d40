"""The `medspark` command: training with Hydra overrides by default, plus a few subcommands; what every command
does first (its own --help, quiet native start-up logs) and last (one line per error a user can fix).

    medspark [overrides]                   train (python -m medspark.train)
    medspark compare [options]             table of an experiment's runs (medspark.compare)
    medspark predict model=... input=...   predictions CSV from a logged/registered model (medspark.predict)
    medspark explain <input> model=...     Grad-CAM overlays + predictions CSV (medspark.explain)
    medspark --help                        the subcommands, config groups and options, where the docs are
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

SUBCOMMANDS = {"compare": "medspark.compare", "predict": "medspark.predict", "explain": "medspark.explain"}
DOCS = ("README.md", "docs/layout.md", "docs/mlflow.md", "docs/sweeps.md", "docs/backends.md", "docs/datasets.md")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_native_logs()
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        sys.exit(module.main(argv[1:]))
    from .train import main as train_main

    train_main()  # --help, checks group options and keys (one line for backend=nope), then Hydra reads sys.argv


# ---------------------------------------------------------------- --help

def help_text() -> str:
    """`medspark --help`: usage, subcommands, every config group with its options (the first comment line of
    conf/<group>/<option>.yaml; * = the default), how to see every key, where the docs are."""
    from .config import config_dir, group_options, option_groups, project_root

    width = shutil.get_terminal_size((120, 24)).columns
    lines = ["medspark: train medical image classifiers on Spark (PySpark + Petastorm + Keras + MLflow), configured",
             "with Hydra overrides (conf/config.yaml and the groups below).", "",
             "usage:",
             "  medspark [group=option ...] [key=value ...]   train one model (the same as python -m medspark.train)",
             "  medspark -m key=a,b [group=x,y ...]          a sweep: one MLflow parent run, one child run per job",
             "  medspark --cfg job                           print the composed config, resolved (--unresolved: as "
             "written)",
             "  medspark --hydra-help                        Hydra's own options (--multirun, --config-dir, ...)", "",
             "subcommands:"]
    for name, module in SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {_doc_line(module)}   (medspark {name} --help)")
    defaults = _group_defaults()
    lines += ["", "config groups (group=option, * = default):"]
    for group in option_groups():
        lines.append(f"  {group}")
        for option in group_options(group):
            mark = "*" if defaults.get(group) == option else " "
            text = f"    {mark}{option:<27} {option_description(Path(config_dir()) / group / f'{option}.yaml')}"
            lines.append(text if len(text) <= width else text[:width - 3] + "...")
    lines += ["", "settings: any key of the composed config, e.g. train.epochs=20 train.lr=3e-4 "
              "preprocess.image_size=96",
              "  (medspark --cfg job lists them with their values; a misspelled key is one line with a suggestion)",
              "", f"docs: {', '.join(DOCS)} in {project_root()}"]
    return "\n".join(lines) + "\n"


def option_description(path: Path) -> str:
    """The first comment line of a config option's YAML (Hydra's `# @package` directive skipped)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            if line:
                break
            continue
        comment = line.lstrip("#").strip()
        if comment and not comment.startswith("@package"):
            return comment
    return ""


def _doc_line(module: str) -> str:
    """The first line of a subcommand module's docstring, without its leading `medspark x`: label."""
    doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
    return re.sub(r"^`[^`]*`:\s*", "", doc[0]) if doc else ""


def _group_defaults() -> dict[str, str]:
    from omegaconf import OmegaConf

    from .config import config_dir

    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                out[str(group).removeprefix("optional ")] = option
    return out


def exit_on_help(argv: list[str]) -> None:
    """`--help`/`-h` prints help_text and exits 0 (Hydra's stock page stays behind --hydra-help)."""
    if any(a in ("--help", "-h") for a in argv):
        print(help_text(), end="")
        sys.exit(0)


def resolve_cfg_by_default(argv: list[str]) -> list[str]:
    """`--cfg job` (`-c job`, `--cfg all`) prints the config resolved (Hydra's --resolve) unless `--unresolved`
    asks for it as written (the `${...}` interpolations). `--cfg hydra` stays as written (it cannot resolve
    outside a job)."""
    if "--unresolved" in argv:
        return [a for a in argv if a != "--unresolved"]
    shown = [b for a, b in zip(argv, argv[1:]) if a in ("--cfg", "-c")] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--cfg=")]
    if shown and all(s in ("job", "all") for s in shown) and "--resolve" not in argv:  # hydra's own node: as is
        return [*argv, "--resolve"]
    return argv


# ---------------------------------------------------------------- TensorFlow's native start-up noise

# Lines TensorFlow's C++ side prints on import whatever the machine (duplicate CUDA plugin registration in the
# pip wheel, absl's banner, oneDNN and CPU-instruction notes): never actionable.
IMPORT_NOISE = re.compile(r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
                          r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
                          r"cpu_feature_guard\.cc|To enable the following instructions:|rebuild TensorFlow with the "
                          r"appropriate compiler flags|TF-TRT Warning: Could not find TensorRT")
NO_GPU_NOISE = re.compile(r"Could not find cuda drivers on your machine|failed call to cuInit")  # CPU-only machines
_tensorflow_imported = False


def has_gpu() -> bool:
    """An NVIDIA GPU this process may use: the driver's device node or nvidia-smi, unless CUDA_VISIBLE_DEVICES
    hides every device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()
            or shutil.which("nvidia-smi") is not None)


def quiet_native_logs() -> None:
    """On a machine without a GPU, TensorFlow's C++ INFO and WARNING lines off (TF_CPP_MIN_LOG_LEVEL=2: errors
    still print), for this process and the Spark executors it starts (they inherit it; medspark.spark passes it
    on to a cluster's). A value already set wins; a GPU machine keeps TensorFlow's default. Off a terminal,
    MLflow's artifact progress bars off too."""
    if not has_gpu():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not sys.stderr.isatty():  # MLflow's download bars are carriage-return junk in a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def import_tensorflow() -> None:
    """Import TensorFlow and look for GPUs once, with the C++ start-up lines it writes to stderr filtered
    (native_noise_filtered). Spark executors' Python workers get the same filter from medspark.quiet_daemon."""
    global _tensorflow_imported
    if _tensorflow_imported:
        return
    _tensorflow_imported = True
    quiet_native_logs()
    with native_noise_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # CUDA initializes here, inside the filter


@contextmanager
def native_noise_filtered():
    """File descriptor 2 captured while the block runs (TensorFlow's C++ code writes there, below Python), then
    written back without the IMPORT_NOISE lines, and without the missing CUDA driver lines (cuInit) where no GPU
    is present. Every other line (a real error) is written back to stderr."""
    import tempfile

    gpu = has_gpu()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = native_lines_worth_showing(captured.read().decode(errors="replace"), gpu)
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def native_lines_worth_showing(text: str, gpu: bool) -> list[str]:
    """The lines of TensorFlow's start-up output that are not known noise (IMPORT_NOISE; NO_GPU_NOISE too when
    the machine has no GPU, where a missing CUDA driver is expected)."""
    noise = [IMPORT_NOISE] + ([] if gpu else [NO_GPU_NOISE])
    return [line for line in text.splitlines() if line.strip() and not any(p.search(line) for p in noise)]


# ---------------------------------------------------------------- errors

def log_to_files(level: int, message: str) -> None:
    """A `medspark` log record for the log files only (the Hydra job's `<job>.log`), not the console."""
    record = logging.getLogger("medspark").makeRecord("medspark", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextmanager
def command_errors(stopped_hint: str = ""):
    """What a command's main does with the errors a user can fix: a bad config or dataset is one line on stderr
    (once: the log file gets it too, the console's log handler does not) and exit status 2; a SIGTERM (the run
    already ended KILLED) is one line and exit status 143."""
    from .config import ConfigError
    from .data.sources import DatasetError
    from .interrupts import EXIT_CODE as TERMINATED_EXIT, Terminated

    try:
        yield
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        log_to_files(logging.ERROR, str(e))  # the job's log file has it; the console shows it once, on stderr
        print(f"medspark: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated as e:
        print(f"medspark: stopped: {e}; the MLflow run ended KILLED.{stopped_hint}", file=sys.stderr)
        sys.exit(TERMINATED_EXIT)
