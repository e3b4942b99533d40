"""Protected health information never leaves the source that reads it: identifiers become pseudonyms.

A patient id (a CSV column, a pattern over a file name, a DICOM tag) is needed to keep a patient's images in one
split, never its value: `pseudonym` is a keyed hash, stable for one key (so splits are reproducible), that cannot
be reversed by hashing candidate ids without the key. The key is the config's `privacy.phi_key` (default: the
environment's MEDSPARK_PHI_KEY, else a fixed project salt); set it to a secret of your own when ids are guessable
(NIH's are small integers). Its name contains `key`, so every place the config is written masks it
(tracking.mask_secrets: MLflow params, config/resolved.yaml, overrides; tracking.redact_hydra_output: the Hydra
output folder). `configure` sets it on the driver and in the environment that Python workers started afterwards
inherit (a local Spark session started after it: its executors); a function shipped to executors that needs a
pseudonym takes the key as an argument (`pseudonym(value, kind, key)`) rather than trusting their environment.

File paths are kept as given unless `privacy.hash_paths` is true: then every path medspark writes (the Parquet `path`
column; data/rejected.csv and data/ignored.csv, with the path inside each reason; log lines; a label CSV's image
names in its rejections; predictions and the Grad-CAM gallery name images by content hash either way) is `shown_path`'s
`file-<16 hex>.<suffix>`, a keyed hash of the whole path: for exports whose folders or file names carry a patient's
name or id. The same file gets the same name for one key; `shown_path(path, path_key())` with that key finds it.
"""
from __future__ import annotations

import hashlib
import hmac
import os

_DEFAULT_KEY = b"medspark-phi-v1"
ENV = "MEDSPARK_PHI_KEY"
PATHS_ENV = "MEDSPARK_HASH_PATHS"  # "1": privacy.hash_paths is on in this process
_SUFFIXES = (".nii.gz", ".dcm", ".dicom", ".ima", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def configure(key: str | None, hash_paths: bool = False) -> None:
    """Use `key` (the config's privacy.phi_key) for every pseudonym of this process and of workers started later;
    None or "" leaves the environment's key (or the default) in place. hash_paths: privacy.hash_paths."""
    if key:
        os.environ[ENV] = str(key)
    if hash_paths:
        os.environ[PATHS_ENV] = "1"
    else:
        os.environ.pop(PATHS_ENV, None)


def _key(key: str | bytes | None) -> bytes:
    if key is None:
        key = os.environ.get(ENV, "")
    return (key.encode() if isinstance(key, str) else key) or _DEFAULT_KEY


def path_key() -> bytes | None:
    """The key paths are hidden with when privacy.hash_paths is on (resolved here, on the driver, and handed to Spark
    tasks as an argument); None: paths are kept."""
    return _key(None) if os.environ.get(PATHS_ENV) == "1" else None


class CsvRow(str):
    """Where a rejected entry is when it is a label CSV's row, not a file ("labels.csv:row 12"): shown as it is."""

    @classmethod
    def of(cls, table: str, number: int) -> "CsvRow":
        return cls(f"{table}:row {number}")


def shown_path(path: str, key: bytes | None) -> str:
    """`path` as medspark writes it: itself when key is None, else `file-<16 hex>`, the keyed hash of the whole path,
    plus its suffix when that is a known image suffix (`.dcm`, `.nii.gz`, `.png`: a name part is never kept). A
    CsvRow is not a path: it stays."""
    if key is None or isinstance(path, CsvRow):
        return path
    digest = hmac.new(key, f"path\0{path}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
    name = os.path.basename(str(path)).lower()
    suffix = next((s for s in _SUFFIXES if name.endswith(s) and len(name) > len(s)), "")
    return f"file-{digest}{suffix}"


def shown_rows(rows, key: bytes | None) -> list[tuple[str, str]]:
    """(path, reason) rows (rejected or ignored files) as medspark writes them: the path, and the path inside its
    reason (an OSError names its file), hidden when key is not None."""
    if key is None:
        return list(rows)
    return [(shown_path(p, key), str(why).replace(str(p), shown_path(p, key))) for p, why in rows]


def pseudonym(value, kind: str = "patient", key: str | bytes | None = None) -> str:
    """A 16-hex-digit pseudonym for an identifier (`kind` keeps a patient id and, say, a study id apart)."""
    text = str(value).strip()
    return hmac.new(_key(key), f"{kind}\0{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
