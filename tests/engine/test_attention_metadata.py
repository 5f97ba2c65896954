"""The step inputs the attention backends read: block tables padded into one tensor, decodes bucketed by length."""

import torch

from workers.engine.attention.metadata import decode_buckets, pad_block_tables


def test_block_tables_are_padded_to_the_width_and_extra_rows_are_all_padding():
    tables = [[7, 3, 9], [], [4]]
    assert torch.equal(pad_block_tables(tables, 4, fill=99, rows=5), torch.tensor(
        [[7, 3, 9, 99], [99, 99, 99, 99], [4, 99, 99, 99], [99, 99, 99, 99], [99, 99, 99, 99]]))
    assert pad_block_tables([], 0, fill=0).shape == (0, 0)


def test_decodes_are_bucketed_into_runs_of_equal_count_each_padded_to_its_longest():
    assert decode_buckets([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [(0, 3, 3), (3, 6, 6), (6, 9, 9)]
    assert decode_buckets([5]) == [(0, 1, 5)]
    assert decode_buckets([]) == []
