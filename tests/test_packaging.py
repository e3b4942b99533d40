"""The environments users get are the one we test: the lock satisfies pyproject's ranges, conda.yaml carries
exactly the lock's pins, and the security floor on pyarrow holds."""
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*(?:- )?([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def lock_lines():
    return [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]


def test_conda_env_matches_the_lock():
    lock = pins((REPO / "requirements.txt").read_text().splitlines())
    conda = pins((REPO / "conda.yaml").read_text().splitlines())
    assert conda == lock and len(lock) > 50


def test_every_lock_line_is_an_exact_pin_and_conda_installs_exactly_those():
    """No line of the lock escapes the comparison above (a `>=` or an unpinned name would), and the conda env
    installs the lock's lines verbatim plus this checkout: nothing more, nothing unpinned."""
    import yaml

    lines = lock_lines()
    loose = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line)]
    assert not loose, f"requirements.txt lines that are not exact pins: {loose}"
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert len(names) == len(set(names)), "a package pinned twice"
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    deps = env["dependencies"]
    pip = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip) == 1 and sorted(pip[0]) == sorted(lines + ["-e ."])
    conda_pkgs = {d.split("=")[0]: d.split("=", 1)[1] if "=" in d else None for d in deps if isinstance(d, str)}
    assert conda_pkgs == {"python": "3.11", "openjdk": "17", "pip": None}
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains("3.11.0") and not SpecifierSet(requires).contains("3.12.0")


def test_sweep_plugins_are_locked():
    """hydra/launcher=parallel and hparams_search=... need their Hydra plugins in every environment."""
    lock = pins((REPO / "requirements.txt").read_text().splitlines())
    assert {"hydra-joblib-launcher", "hydra-optuna-sweeper", "optuna"} <= set(lock)
    assert lock["optuna"].startswith("2."), "hydra-optuna-sweeper needs optuna<3"


def test_lock_satisfies_pyproject_ranges_and_security_floor():
    lock = pins((REPO / "requirements.txt").read_text().splitlines())
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        assert name in lock, f"{name} missing from requirements.txt"
        assert dep.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} outside {dep.specifier}"
    major, minor, patch = map(int, lock["pyarrow"].split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1), "pyarrow < 14.0.1 has CVE-2023-47248"
