"""A tiny AutoencoderKL for the tests (no download): two levels (downsampling factor 2), a few thousand parameters."""

import datasets
import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def tiny_vae(in_channels=3, latent_channels=4, levels=2, seed=0, **config):
    """A randomly initialised AutoencoderKL with factor 2^(levels - 1), the same weights for the same arguments."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(4, 8, 8)[:levels],
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


def image_dataset(num_images=10, size=(8, 8), mode="RGB", seed=0, labels=False):
    """A `datasets.Dataset` of random PIL images (and labels 0..2 with `labels`)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    images = [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8), mode=mode)
        for _ in range(num_images)
    ]
    data, features = {"image": images}, {"image": datasets.Image()}
    if labels:
        data["label"], features["label"] = [i % 3 for i in range(num_images)], datasets.ClassLabel(num_classes=3)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


class CountingEncodes:
    """Counts the images a VAE encodes (wraps its `encode`)."""

    def __init__(self, vae):
        self.images = 0
        encode = vae.encode

        def counting(x, *args, **kwargs):
            self.images += x.shape[0]
            return encode(x, *args, **kwargs)

        vae.encode = counting
