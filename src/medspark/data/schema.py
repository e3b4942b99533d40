"""The one definition of a materialized split's columns (one row per accepted image), as plain data.

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
    image: bool = False  # shape: the preprocessed image's (h, w, c) when true, else a scalar ()


COLUMNS = (
    Column("image", np.uint8, "binary", None, image=True),  # fixed shape (static shapes for tf.data), .npy bytes
    Column("label", np.int32, "int32", "IntegerType"),
    Column("path", np.str_, "string", "StringType"),  # source file, for audits: names.to_text (from_text: the path)
    Column("sha1", np.str_, "string", "StringType"),  # content identity
    Column("split", np.str_, "string", "StringType"),
)


def image_schema(shape: tuple[int, int, int]) -> "Unischema":  # noqa: F821
    """The Petastorm Unischema of a split of `shape`-sized images."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql import types

    return Unischema("MedImage", [
        UnischemaField(c.name, c.dtype, shape if c.image else (),
                       NdarrayCodec() if c.spark is None else ScalarCodec(getattr(types, c.spark)()), False)
        for c in COLUMNS])


def arrow_schema():
    """The same columns as pyarrow writes them (non-nullable)."""
    import pyarrow as pa

    return pa.schema([(c.name, getattr(pa, c.arrow)(), False) for c in COLUMNS])
