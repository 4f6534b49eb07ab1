"""Masked-image pretraining: the block mask and the loss on hidden voxels only."""

import pytest
import torch

from nnunetv2_em.trainers.masked_pretraining import block_mask, masked_mse


@pytest.mark.parametrize("spatial", [(20, 13), (9, 16, 17)])
def test_block_mask_hides_whole_cells_at_the_ratio(spatial):
    generator = torch.Generator().manual_seed(0)
    hidden = block_mask((64, 2, *spatial), block=4, ratio=0.6, generator=generator)
    assert hidden.shape == (64, 1, *spatial) and hidden.dtype == torch.bool
    assert 0.5 < hidden.float().mean() < 0.7
    cell = hidden[(slice(None), slice(None), *[slice(0, 4)] * len(spatial))]  # one cell: all hidden or all shown
    assert bool(((cell.flatten(1).all(1)) | (~cell.flatten(1).any(1))).all())
    assert hidden.flatten(1).any(1).all()  # at least one cell per sample
    with pytest.raises(ValueError, match="ratio"):
        block_mask((1, 1, 4, 4), block=2, ratio=1.0)


def test_masked_mse_reads_only_hidden_voxels():
    image = torch.zeros(1, 2, 4, 4)
    hidden = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    hidden[..., :2, :] = True
    reconstruction = image.clone()
    reconstruction[..., 2:, :] = 5.0  # wrong only where visible: no loss
    assert masked_mse(reconstruction, image, hidden).item() == 0.0
    reconstruction[..., 0, 0] = 2.0  # one hidden voxel off by 2 in both channels: 2 * 4 / (2 channels * 8 voxels)
    assert masked_mse(reconstruction, image, hidden).item() == pytest.approx(0.5)
