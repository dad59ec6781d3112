"""The tiny UNet2DModel of the tests (diffusers-notes: about 12k parameters, a few ms per forward on a CPU)."""

import torch
from diffusers import UNet2DModel


def tiny_unet(
    in_channels=3, out_channels=None, sample_size=8, num_class_embeds=None, block_out_channels=(4, 8), seed=0
):
    """A randomly initialised two-level UNet2DModel, the same weights for the same arguments (seeded)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()
