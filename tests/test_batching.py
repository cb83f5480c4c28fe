"""The shared pad helper against hand-worked tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuseserve.batching import pad_ids, pad_rows


def test_token_rows_pad_on_the_right_with_a_mask():
    ids, mask = pad_ids([np.array([5, 6, 7]), [8], np.array([], dtype=np.int64)], pad_id=2)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2], [2, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_two_dimensional_rows_pad_both_dimensions_to_a_given_length():
    # fused ids: row 0 is [2 positions, 2 ids], row 1 is [1 position, 3 ids]; L = 3, W = 3
    rows = [np.array([[1, 2], [3, 4]], dtype=np.int32), np.array([[5, 6, 7]], dtype=np.int32)]
    out = pad_rows(rows, -1, length=3)
    assert out.shape == (2, 3, 3) and out.dtype == torch.long
    assert out.tolist() == [
        [[1, 2, -1], [3, 4, -1], [-1, -1, -1]],
        [[5, 6, 7], [-1, -1, -1], [-1, -1, -1]],
    ]
    probs = pad_rows([np.array([0.5, 0.25], dtype=np.float32)], 0.0, torch.float32, length=4)
    assert probs.dtype == torch.float32 and probs.tolist() == [[0.5, 0.25, 0.0, 0.0]]


def test_bad_rows_and_lengths_name_the_field():
    with pytest.raises(ValueError, match="rows"):
        pad_rows([], 0)
    with pytest.raises(ValueError, match="rows"):
        pad_rows([np.zeros(2), np.zeros((2, 2))], 0)
    with pytest.raises(ValueError, match="length"):
        pad_rows([np.zeros(3)], 0, length=2)
