"""data2vec 2.0's inverse block masks against fairseq's `compute_block_mask_2d` semantics
(methods.md §3.7 and §3.12 test 6)."""

import pytest
import torch

from ssl.data.inverse_block_mask import (
    InverseBlockMasker,
    inverse_block_counts,
    inverse_block_mask,
    visible_first_ids,
)


def test_official_counts_vit_b_and_vit_l() -> None:
    """14 x 14: 0.8 / length 3 / adjust 0.07 -> 5 centres, 157 masked in every row;
    0.75 / 0.1 -> 7 centres, 147 masked."""
    assert inverse_block_counts(196, 0.8, 3, 0.07) == (5, 39)
    assert inverse_block_counts(196, 0.75, 3, 0.1) == (7, 49)
    g = torch.Generator().manual_seed(0)
    base = inverse_block_mask(16, (14, 14), 0.8, 3, 0.07, g)
    assert base.dtype == torch.bool and base.shape == (16, 196)
    assert (base.sum(1) == 157).all()
    large = inverse_block_mask(16, (14, 14), 0.75, 3, 0.1, g)
    assert (large.sum(1) == 147).all()


def test_small_grid_counts_follow_the_same_truncation() -> None:
    """7 x 7 (Fashion-MNIST at patch 4): int(49 * 0.27 / 9) = 1 centre, int(49 * 0.2) = 9 visible;
    5 x 5: 1 - 0.8 is 0.19999999999999996 in floats, so int(25 * keep) = 4 (fairseq's value too)."""
    assert inverse_block_counts(49, 0.8, 3, 0.07) == (1, 9)
    assert inverse_block_counts(25, 0.8, 3, 0.07) == (0, 4)
    mask = inverse_block_mask(64, (5, 5), generator=torch.Generator().manual_seed(1))
    assert (mask.sum(1) == 21).all()  # no centre: 4 random visible tokens


def test_an_interior_centre_leaves_exactly_its_3x3_block_visible() -> None:
    """On 7 x 7 the one block is 9 tokens, the target count: an interior centre needs no fix-up,
    so the visible set is exactly the square around the centre drawn first from the generator."""
    batch = 256
    mask = inverse_block_mask(batch, (7, 7), generator=torch.Generator().manual_seed(3))
    centres = torch.randint(0, 49, (batch, 1), generator=torch.Generator().manual_seed(3))[:, 0]
    interior = 0
    for row, centre in zip(mask, centres.tolist()):
        r, c = divmod(centre, 7)
        if 0 < r < 6 and 0 < c < 6:
            interior += 1
            expected = torch.ones(7, 7, dtype=torch.bool)
            expected[r - 1 : r + 2, c - 1 : c + 2] = False
            assert torch.equal(row.view(7, 7), expected)
        else:  # clamped block (4 or 6 tokens) + random single tokens up to 9
            assert (~row).sum() == 9
            square = torch.zeros(7, 7, dtype=torch.bool)
            square[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
            assert (~row.view(7, 7) & square).sum() == square.sum()  # the clamped block stays visible
    assert interior > 100  # 25 of 49 centres are interior


def test_visible_tokens_form_blocks_on_the_vit_b_grid() -> None:
    """The visible set is a union of 3 x 3 squares, trimmed or topped up by single tokens: most
    visible tokens have a visible 4-neighbour (a uniform random 39 of 196 would have ~60%)."""
    mask = inverse_block_mask(64, (14, 14), generator=torch.Generator().manual_seed(0))
    visible = (~mask).view(-1, 1, 14, 14).float()
    kernel = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    neighbours = torch.nn.functional.conv2d(visible, kernel, padding=1)
    with_neighbour = ((neighbours > 0) & (visible > 0)).sum() / visible.sum()
    assert with_neighbour > 0.9


def test_ids_put_visible_tokens_first_in_raster_order() -> None:
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    ids_shuffle, ids_restore = visible_first_ids(mask)
    assert ids_shuffle.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(4).expand(2, 4))


def test_masker_keys_copies_and_seeding() -> None:
    masker = InverseBlockMasker((14, 14), "d2v", mask_prob=0.8, mask_length=3, mask_prob_adjust=0.07,
                                copies=4)
    assert masker.visible == 39
    out = masker(3, torch.Generator().manual_seed(5))
    assert set(out) == set(masker.keys) and out[masker.mask_key].shape == (12, 196)
    again = masker(3, torch.Generator().manual_seed(5))
    assert all(torch.equal(out[k], again[k]) for k in masker.keys)
    first = out[masker.ids_shuffle_key][:, :39]
    assert not torch.gather(out[masker.mask_key], 1, first).any()  # the first 39 ids are the visible ones
    assert len({tuple(r.tolist()) for r in out[masker.mask_key]}) == 12  # copies differ


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="visible"):
        inverse_block_mask(2, (2, 2))  # int(4 * 0.2) = 0 visible
    with pytest.raises(ValueError, match="mask_length"):
        inverse_block_mask(2, (14, 14), mask_length=1)
