"""The environments users get are the one we test: the lock satisfies pyproject's ranges, conda.yaml carries
exactly the lock's pins, and the security floor on pyarrow holds."""
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from conftest import REPO


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*(?:- )?([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_conda_env_matches_the_lock():
    lock = pins((REPO / "requirements.txt").read_text().splitlines())
    conda = pins((REPO / "conda.yaml").read_text().splitlines())
    assert conda == lock and len(lock) > 50


def test_lock_satisfies_pyproject_ranges_and_security_floor():
    lock = pins((REPO / "requirements.txt").read_text().splitlines())
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        assert name in lock, f"{name} missing from requirements.txt"
        assert dep.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} outside {dep.specifier}"
    major, minor, patch = map(int, lock["pyarrow"].split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1), "pyarrow < 14.0.1 has CVE-2023-47248"
