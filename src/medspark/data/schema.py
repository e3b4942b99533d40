"""The one definition of a materialized split's columns (one row per image: a 2D file, or one frame or slice of a
multi-frame DICOM file or a NIfTI volume, which share path, sha1, label, split and patient), as plain data.

The Petastorm Unischema (driver, loader) and the pyarrow schema (the Spark tasks that write the Parquet files)
are both derived from COLUMNS; each imports its library only when asked, so data/tasks.py stays import-light.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Column:
    name: str
    dtype: type  # numpy type of a decoded value
    arrow: str  # pyarrow type (a pyarrow function name), as Parquet stores the column
    spark: str | None  # pyspark.sql.types class of a scalar (Petastorm ScalarCodec); None: an array (NdarrayCodec)
    shape: str = ""  # an array's shape: "image" = the preprocessed (h, w, c), "classes" = (K,); "" = a scalar ()


COLUMNS = (  # the order of a row as data/tasks.py writes it
    Column("image", np.uint8, "binary", None, shape="image"),  # fixed shape (static shapes for tf.data), .npy bytes
    Column("label", np.int32, "int32", "IntegerType"),  # class index, or the findings' bitmask (data/targets.py)
    Column("targets", np.uint8, "binary", None, shape="classes"),  # one-hot class / multi-hot findings (.npy)
    Column("path", np.str_, "string", "StringType"),  # source file, for audits: names.to_text (from_text: the path)
    Column("frame", np.int32, "int32", "IntegerType"),  # frame (DICOM) or slice (NIfTI) index in its file; 0 for 2D
    Column("sha1", np.str_, "string", "StringType"),  # content identity of the file (all its frames share it)
    Column("split", np.str_, "string", "StringType"),
    Column("patient", np.str_, "string", "StringType"),  # pseudonym (data/phi.py), "" when unknown: never a raw id
    Column("source", np.str_, "string", "StringType"),  # the source of a merged dataset, "" for a single source
)


def image_schema(shape: tuple[int, int, int], num_classes: int) -> "Unischema":  # noqa: F821
    """The Petastorm Unischema of a split of `shape`-sized images labelled over `num_classes` classes."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql import types

    shapes = {"image": tuple(shape), "classes": (int(num_classes),), "": ()}
    return Unischema("MedImage", [
        UnischemaField(c.name, c.dtype, shapes[c.shape],
                       NdarrayCodec() if c.spark is None else ScalarCodec(getattr(types, c.spark)()), False)
        for c in COLUMNS])


def arrow_schema():
    """The same columns as pyarrow writes them (non-nullable)."""
    import pyarrow as pa

    return pa.schema([(c.name, getattr(pa, c.arrow)(), False) for c in COLUMNS])
