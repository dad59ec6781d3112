"""pfgm_diffusers.latent_cache: images encoded once, resumable after a kill, reused or refused by fingerprint."""

import json
import os

import pytest
import torch
from tiny_vae import CountingEncodes, image_dataset, tiny_vae

from pfgm_diffusers import latent_cache
from pfgm_diffusers.data import ImageTransform
from pfgm_diffusers.latent_cache import (
    LatentCache,
    LatentDataset,
    build_latent_cache,
    cache_fingerprint,
    shard_name,
)
from pfgm_diffusers.vae import LatentScaling, encode_moments


def fingerprint(vae, dataset, resolution=8, center_crop=False, random_flip=False):
    return cache_fingerprint(vae, dataset, resolution, 3, center_crop, random_flip, torch.float32)


def build(folder, vae, dataset, shard_size=4, **settings):
    return build_latent_cache(str(folder), vae, dataset, fingerprint(vae, dataset, **settings), shard_size=shard_size)


def test_the_cache_holds_the_vae_moments_in_model_units(tmp_path):
    vae, dataset = tiny_vae(scaling_factor=0.5, shift_factor=0.25), image_dataset(10)
    cache = build(tmp_path, vae, dataset)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] + [shard_name(k) for k in range(3)]
    pixels = torch.stack([ImageTransform(8, 3, center_crop=True)(image) for image in dataset["image"]])
    mean, std = encode_moments(vae, pixels)
    cached_mean, cached_std = cache.moments(range(10))
    torch.testing.assert_close(cached_mean, (mean - 0.25) * 0.5)
    torch.testing.assert_close(cached_std, std * 0.5)
    statistics = cache.statistics
    assert statistics["N"] == 4 * 4 * 4 and statistics["num_latents"] == 10
    x = (mean - 0.25) * 0.5
    assert statistics["rms"] == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
    assert statistics["rms_sample"] == pytest.approx(float((x.pow(2) + (std * 0.5).pow(2)).mean().sqrt()), rel=1e-5)
    assert statistics["max_pairwise_distance"] == pytest.approx(float(torch.cdist(x.flatten(1), x.flatten(1)).max()))


def test_each_image_is_encoded_once_across_two_epochs_and_a_resume(tmp_path):
    vae, dataset = tiny_vae(), image_dataset(10)
    counter = CountingEncodes(vae)
    cache = build(tmp_path, vae, dataset)
    latents = LatentDataset(cache, "mean", seed=0)
    epochs = []
    for epoch in range(2):
        latents.set_epoch(epoch)
        epochs.append(torch.stack([example["pixel_values"] for example in latents.__getitems__(list(range(10)))]))
    torch.testing.assert_close(epochs[0], epochs[1])  # the posterior mean: the same latents every epoch
    again = build(tmp_path, vae, dataset)  # a later run (a resume) with the same settings
    torch.testing.assert_close(again.moments(range(10))[0], cache.moments(range(10))[0])
    assert counter.images == 10


def test_a_cache_from_another_vae_or_resolution_is_refused_naming_the_difference(tmp_path):
    dataset = image_dataset(6, size=(16, 16))
    build(tmp_path, tiny_vae(), dataset)
    with pytest.raises(ValueError, match=r"vae_weights: '[0-9a-f]+' -> '[0-9a-f]+'"):
        build(tmp_path, tiny_vae(seed=1), dataset)
    with pytest.raises(ValueError, match=r"vae_config.scaling_factor: 0.18215 -> 0.5"):
        build(tmp_path, tiny_vae(scaling_factor=0.5), dataset)
    with pytest.raises(ValueError, match=r"resolution: 8 -> 16"):
        build(tmp_path, tiny_vae(), dataset, resolution=16)
    with pytest.raises(ValueError, match=r"data: '\w+' -> '\w+'"):
        build(tmp_path, tiny_vae(), image_dataset(6, size=(16, 16), seed=1))
    with pytest.raises(ValueError, match=r"random_flip: False -> True"):
        build(tmp_path, tiny_vae(), dataset, random_flip=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        build(tmp_path / "other", tiny_vae(), dataset)


def test_a_killed_shard_write_leaves_no_shard_and_the_resume_encodes_only_what_is_missing(tmp_path, monkeypatch):
    dataset = image_dataset(10)
    reference = build(tmp_path / "reference", tiny_vae(), dataset).moments(range(10))
    real_save = latent_cache.save_file
    saved = []

    def killed_while_writing(tensors, path, metadata=None):
        if len(saved) == 1:  # the second shard: half its bytes reach the disk, then the process dies
            real_save(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise KeyboardInterrupt
        saved.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(latent_cache, "save_file", killed_while_writing)
    vae = tiny_vae()
    counter = CountingEncodes(vae)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cache", vae, dataset)
    files = sorted(os.listdir(tmp_path / "cache"))
    assert shard_name(0) in files and shard_name(1) not in files  # the torn shard never got its final name
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="no complete latent cache"):
        LatentCache(str(tmp_path / "cache"))
    monkeypatch.setattr(latent_cache, "save_file", real_save)
    cache = build(tmp_path / "cache", vae, dataset)
    assert counter.images == 4 + 4 + 6  # shard 0, the killed shard 1, then shards 1 and 2 on the resume
    for cached, expected in zip(cache.moments(range(10)), reference, strict=True):
        torch.testing.assert_close(cached, expected)


def test_random_flips_are_both_cached_and_drawn_per_epoch(tmp_path):
    vae, dataset = tiny_vae(), image_dataset(8)
    counter = CountingEncodes(vae)
    cache = build(tmp_path, vae, dataset, random_flip=True)
    assert counter.images == 16  # each image and its mirror, once
    pixels = torch.stack([ImageTransform(8, 3, center_crop=True)(image) for image in dataset["image"]])
    scaling = LatentScaling.from_config(vae.config)
    flipped_mean = scaling.to_model(encode_moments(vae, pixels.flip(-1))[0])
    torch.testing.assert_close(cache.moments(range(8), torch.ones(8, dtype=torch.bool))[0], flipped_mean)
    latents = LatentDataset(cache, "mean", seed=0)
    plain, mirrored = cache.moments(range(8))[0], flipped_mean
    chosen = []
    for epoch in range(6):
        latents.set_epoch(epoch)
        batch = torch.stack([example["pixel_values"] for example in latents.__getitems__(list(range(8)))])
        is_flipped = [torch.equal(batch[i], mirrored[i]) for i in range(8)]
        assert all(is_flipped[i] or torch.equal(batch[i], plain[i]) for i in range(8))
        chosen += is_flipped
    assert 0.25 < sum(chosen) / len(chosen) < 0.75
    with pytest.raises(ValueError, match="holds no flipped images"):
        build(tmp_path / "plain", tiny_vae(), dataset).moments([0], [True])


def test_random_crops_that_would_vary_are_refused(tmp_path):
    dataset = image_dataset(4, size=(12, 8))
    with pytest.raises(ValueError, match="image 0 is 12x8: its random crop.*--center_crop"):
        build(tmp_path / "random", tiny_vae(), dataset)
    cache = build(tmp_path / "center", tiny_vae(), dataset, center_crop=True)
    assert cache.moments([0])[0].shape == (1, 4, 4, 4)


def test_posterior_draws_change_with_the_epoch_only(tmp_path):
    cache = build(tmp_path, tiny_vae(), image_dataset(6))
    latents = LatentDataset(cache, "sample", seed=3)

    def epoch_batch(epoch, indices):
        latents.set_epoch(epoch)
        return torch.stack([example["pixel_values"] for example in latents.__getitems__(indices)])

    first = epoch_batch(0, [0, 1, 2])
    torch.testing.assert_close(epoch_batch(0, [2, 1, 0]).flip(0), first)  # per image, not per position
    assert not torch.allclose(epoch_batch(1, [0, 1, 2]), first)
    mean, std = cache.moments([0, 1, 2])
    z = (first - mean) / std  # the draws are standard normal around the posterior mean
    assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3
    with pytest.raises(ValueError, match="latent sampling must be one of"):
        LatentDataset(cache, "mode")


def test_labels_ride_along(tmp_path):
    dataset = image_dataset(6, labels=True)
    cache = build(tmp_path, tiny_vae(), dataset)
    examples = LatentDataset(cache, labels=dataset["label"]).__getitems__([4, 5])
    assert [example["label"] for example in examples] == [1, 2]
    with pytest.raises(ValueError, match="3 labels for a latent cache of 6 images"):
        LatentDataset(cache, labels=[0, 1, 2])


def test_a_memory_mapped_cache_reads_the_same_rows(tmp_path, monkeypatch):
    cache = build(tmp_path, tiny_vae(), image_dataset(10), random_flip=True)
    monkeypatch.setattr(latent_cache, "MAX_IN_MEMORY_BYTES", 0)
    mapped = LatentCache(str(tmp_path))
    assert mapped._tensors is None
    indices, flips = [9, 0, 5, 4], torch.tensor([True, False, True, False])
    for a, b in zip(mapped.moments(indices, flips), cache.moments(indices, flips), strict=True):
        torch.testing.assert_close(a, b)


def test_default_aug_dim_keeps_cifar10s_d_over_n():
    from pfgm_diffusers.latent_cache import default_aug_dim

    assert default_aug_dim(3072) == 128  # CIFAR-10's best D for its N
    assert default_aug_dim(4 * 32 * 32) == 128  # Stable Diffusion's VAE at 256 px: N = 4096
    assert default_aug_dim(4 * 64 * 64) == 512  # ... at 512 px
    assert default_aug_dim(2 * 4 * 4) == 64 and default_aug_dim(10**7) == 2048  # the paper's range


def test_training_defaults_come_from_the_statistics():
    from pfgm_diffusers.latent_cache import training_defaults

    statistics = dict(N=64, num_latents=10, rms=0.8, rms_sample=0.9, max_pairwise_distance=23.4)
    defaults = training_defaults(statistics, "mean")
    assert defaults["sigma_data"][0] == 0.8 and defaults["sigma_max"][0] == 30 and defaults["aug_dim"][0] == 64
    assert training_defaults(statistics, "sample")["sigma_data"][0] == 0.9
    assert training_defaults({**statistics, "max_pairwise_distance": 0.123}, "mean")["sigma_max"][0] == 0.2
