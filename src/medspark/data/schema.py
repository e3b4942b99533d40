"""The Petastorm Unischema of a materialized split: one row per accepted image."""
from __future__ import annotations

import numpy as np
from petastorm.codecs import NdarrayCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import IntegerType, StringType


def image_schema(shape: tuple[int, int, int]) -> Unischema:
    """Fixed-shape uint8 images (static shapes for tf.data), integer labels, and provenance."""
    return Unischema("MedImage", [
        UnischemaField("image", np.uint8, shape, NdarrayCodec(), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("path", np.str_, (), ScalarCodec(StringType()), False),  # source file, for audits
        UnischemaField("sha1", np.str_, (), ScalarCodec(StringType()), False),  # content identity
        UnischemaField("split", np.str_, (), ScalarCodec(StringType()), False),
    ])
