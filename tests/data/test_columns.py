"""List columns are built in chunks whose int32 offsets cannot wrap (sa2crq.data.columns)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sa2crq.data.columns import INT32_LIST_VALUES, index_ranges, list_chunk_bounds, list_column, list_matrix


def test_chunk_bounds_past_two_to_the_31_values_are_exact():
    # Three rows of 2^30 values: 3 * 2^30 values in all, past what int32 offsets address. Summed in
    # int32 the second end would wrap to -2^31 and the cut would land in the wrong place.
    lengths = np.full(3, 2**30, dtype=np.int32)
    assert list_chunk_bounds(lengths).tolist() == [0, 1, 2, 3]
    # Rows that fit together share a chunk: 2^30 - 1 + 2^30 = 2^31 - 1 values, the most one chunk holds.
    assert list_chunk_bounds(np.array([2**30 - 1, 2**30, 5], dtype=np.int32)).tolist() == [0, 2, 3]
    assert list_chunk_bounds(np.array([1, 2, 3])).tolist() == [0, 3]
    assert list_chunk_bounds(np.array([], dtype=np.int64)).tolist() == [0]
    with pytest.raises(ValueError, match="exceeds"):
        list_chunk_bounds(np.array([INT32_LIST_VALUES + 1]))


def test_list_column_chunks_keep_every_row_and_the_plain_list_type():
    lengths = np.array([2, 0, 3, 1, 4, 2])
    values = np.arange(lengths.sum(), dtype=np.int32)
    column = list_column(lengths, values, max_values=5)
    assert column.type == pa.list_(pa.int32())
    assert [len(chunk.flatten()) for chunk in column.chunks] == [5, 5, 2]
    rows = np.split(values, np.cumsum(lengths)[:-1])
    assert column.to_pylist() == [row.tolist() for row in rows]
    assert list_column(lengths, values).num_chunks == 1
    assert list_column(np.array([], dtype=np.int64), values[:0]).to_pylist() == []


def test_list_matrix_reads_a_chunked_column():
    column = list_column(np.full(4, 3), np.arange(12, dtype=np.int32), max_values=6)
    assert column.num_chunks == 2
    np.testing.assert_array_equal(list_matrix(column), np.arange(12).reshape(4, 3))


def test_index_ranges_concatenate_the_ranges_in_order():
    starts, lengths = np.array([5, 0, 9, 2]), np.array([3, 0, 1, 2])
    assert index_ranges(starts, lengths).tolist() == [5, 6, 7, 9, 2, 3]
    assert index_ranges(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == []
