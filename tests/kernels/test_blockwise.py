"""How the torch path cuts attention into blocks and when it keeps their scores."""
import pytest
import torch

from parallax.kernels.torch_path import blockwise
from parallax.kernels.torch_path.dense import mask_bias
from parallax.kernels.reference import end_aligned_positions, visible_keys


@pytest.mark.parametrize("T, S, causal, window", [
    (13, 13, True, None), (13, 13, True, 4), (5, 12, True, None), (9, 4, True, None),
    (7, 11, False, None), (8, 8, False, 3), (6, 0, True, None),
])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_row_blocks_tile_the_rows_and_cover_every_visible_key(T, S, causal, window, rows):
    visible = visible_keys(*end_aligned_positions(T, S), causal=causal, window_size=window)
    covered = torch.zeros(T, S, dtype=torch.bool)
    row_count = torch.zeros(T, dtype=torch.long)
    for r, k in blockwise.row_blocks(T, S, rows, causal, window):
        assert 0 < len(r) <= rows and len(k) > 0
        covered[r.start:r.stop, k.start:k.stop] = True
        row_count[r.start:r.stop] += 1
    assert not (visible & ~covered).any()  # no visible key is skipped
    assert torch.equal(row_count, visible.any(-1).long())  # each row with a key in one block, the rest in none


def test_training_shapes_keep_scores_and_long_sequences_recompute():
    """B=32, T=128, 4 heads (train.py's default) keeps p and w for the backward;
    T=8192 keeps nothing of size [T, S]."""
    blocks, keep = blockwise.plan(32, 128, 128, 4, True, None, 4)
    assert keep and len(blocks) >= 1
    blocks, keep = blockwise.plan(1, 8192, 8192, 2, True, None, 4)
    assert not keep and len(blocks) > 1
    limit = max(blockwise.SCORE_BLOCK_ELEMENTS, 2 * blockwise.MIN_BLOCK_ROWS * 8192)
    assert all(2 * len(r) * len(k) <= limit for r, k in blocks)  # [B * HQ, rows, keys] score blocks


@pytest.mark.parametrize("T, S, causal, window", [
    (13, 13, True, None), (13, 13, True, 4), (13, 13, True, 1), (5, 12, True, 3), (9, 4, True, None),
    (7, 11, False, None), (8, 8, False, 3), (8, 8, False, 20),
])
def test_mask_bias_of_each_block_is_the_mask(T, S, causal, window):
    """The bias covers the keys some rows of a block see and others do not;
    every other key of the block is seen by every row."""
    visible = visible_keys(*end_aligned_positions(T, S), causal=causal, window_size=window)
    for r, k in blockwise.row_blocks(T, S, 4, causal, window):
        block = torch.ones(len(r), len(k), dtype=torch.bool)
        for band in mask_bias(r, k, S - T, causal, window, torch.float64, "cpu"):
            assert band.bias.shape[1] < len(r) * (1 + (causal and window is not None))
            block[:, band.cols] = band.bias == 0
        assert torch.equal(block, visible[r.start:r.stop, k.start:k.stop])
