"""Arrow list columns to and from numpy: embeddings, codes and SIDs travel as list columns in parquet.

An Arrow ``list`` array addresses its values with int32 offsets: past 2^31 - 1 values (a SID column of
~4*10^8 items) an offset computed in int32 wraps and pyarrow accepts it without error. List columns
are therefore built as chunked arrays whose chunks each hold fewer values than that, with offsets
computed in int64; the column keeps its plain ``list`` type, which Spark and every reader expect.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The most values one Arrow ``list`` array (int32 offsets) can address.
INT32_LIST_VALUES = 2**31 - 1


def index_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges ``[starts[r], starts[r] + lengths[r])``, as one int64 index array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    firsts = np.cumsum(lengths) - lengths  # where each range starts in the output
    return np.repeat(np.asarray(starts, dtype=np.int64) - firsts, lengths) + np.arange(lengths.sum(), dtype=np.int64)


def list_chunk_bounds(lengths: np.ndarray, max_values: int = INT32_LIST_VALUES) -> np.ndarray:
    """Row bounds ``[0, ..., n]`` that cut rows of ``lengths`` values into as few chunks as possible
    of at most ``max_values`` values each (offsets summed in int64, so they cannot wrap)."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    if len(ends) and int(np.max(lengths)) > max_values:
        raise ValueError(f"a list row of {int(np.max(lengths))} values exceeds the {max_values} one Arrow list array can address")
    bounds = [0]
    # One iteration per chunk (total values / max_values), not per row.
    while bounds[-1] < len(ends):
        start_value = ends[bounds[-1] - 1] if bounds[-1] else 0
        bounds.append(int(np.searchsorted(ends, start_value + max_values, side="right")))
    return np.asarray(bounds, dtype=np.int64)


def list_column(lengths: np.ndarray, values: np.ndarray, max_values: int = INT32_LIST_VALUES) -> pa.ChunkedArray:
    """The ``list`` column whose row i holds the next ``lengths[i]`` of the flat ``values``, in chunks
    of at most ``max_values`` values (module docstring)."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    bounds = list_chunk_bounds(lengths, max_values)
    chunks = [
        pa.ListArray.from_arrays(pa.array((starts[a : b + 1] - starts[a]).astype(np.int32)), pa.array(values[starts[a] : starts[b]]))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return pa.chunked_array(chunks, type=pa.list_(pa.from_numpy_dtype(values.dtype)))


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
