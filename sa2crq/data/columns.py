"""Arrow list columns as numpy matrices: embeddings and codes travel as list columns in parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def list_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``(rows, width)`` matrix of a list or fixed-size-list column whose rows all have one
    length (Spark writes fixed-size lists back as plain lists). Null rows are not allowed."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if values.null_count:
        raise ValueError(f"{values.null_count} rows have no value where every row needs a vector")
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
    else:
        lengths = np.unique(pc.list_value_length(values).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise ValueError(f"list rows must all have one length, got lengths {lengths.tolist()}")
        width = int(lengths[0]) if len(lengths) else 0
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), width)
