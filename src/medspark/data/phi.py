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
"""
from __future__ import annotations

import hashlib
import hmac
import os

_DEFAULT_KEY = b"medspark-phi-v1"
ENV = "MEDSPARK_PHI_KEY"


def configure(key: str | None) -> None:
    """Use `key` (the config's privacy.phi_key) for every pseudonym of this process and of workers started later;
    None or "" leaves the environment's key (or the default) in place."""
    if key:
        os.environ[ENV] = str(key)


def pseudonym(value, kind: str = "patient", key: str | bytes | None = None) -> str:
    """A 16-hex-digit pseudonym for an identifier (`kind` keeps a patient id and, say, a study id apart)."""
    if key is None:
        key = os.environ.get(ENV, "")
    key = (key.encode() if isinstance(key, str) else key) or _DEFAULT_KEY
    text = str(value).strip()
    return hmac.new(key, f"{kind}\0{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
