"""Protected health information never leaves the source that reads it: identifiers become pseudonyms.

A patient id (a CSV column, a pattern over a file name, a DICOM tag) is needed to keep a patient's images in one
split, never its value: `pseudonym` is a keyed hash, stable for one key (so splits are reproducible), that cannot
be reversed by hashing candidate ids without the key. The key defaults to a fixed project salt; set
MEDSPARK_PHI_KEY on the driver to a secret of your own when ids are guessable (NIH's are small integers).
"""
from __future__ import annotations

import hashlib
import hmac
import os

_DEFAULT_KEY = b"medspark-phi-v1"


def pseudonym(value, kind: str = "patient") -> str:
    """A 16-hex-digit pseudonym for an identifier (`kind` keeps a patient id and, say, a study id apart)."""
    key = os.environ.get("MEDSPARK_PHI_KEY", "").encode() or _DEFAULT_KEY
    text = str(value).strip()
    return hmac.new(key, f"{kind}\0{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
