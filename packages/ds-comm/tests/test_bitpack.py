"""Tier 1: sign packing is exact and matches numpy.packbits' bit order."""

import numpy as np
import pytest
import torch

from ds_comm import pack_signs, unpack_signs


@pytest.mark.parametrize("n", [8, 64, 1000 * 8])
def test_pack_matches_numpy_and_roundtrips(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x[::7] = 0.0  # zero counts as positive
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == n // 8
    expected = np.packbits((x >= 0).numpy())
    assert np.array_equal(packed.numpy(), expected)
    signs = unpack_signs(packed)
    assert torch.equal(signs, torch.where(x >= 0, 1.0, -1.0))


def test_pack_rejects_bad_sizes_and_dtypes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_signs(torch.ones(9))
    with pytest.raises(TypeError, match="uint8"):
        unpack_signs(torch.ones(2))
