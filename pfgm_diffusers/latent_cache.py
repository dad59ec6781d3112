"""Latents encoded once: a folder of safetensors shards holding the VAE posterior's mean and std of every image.

Why safetensors shards and not a `datasets` Arrow dataset: each shard is one file written by one process and renamed
into place when complete, so a killed encoding loses only the shards being written, a resume skips every finished
one, and processes never share a writer; a shard is read by memory-map and row slices, without decoding or pickle.
An Arrow dataset is written by one writer whose partial state does not survive a kill.

Layout of a cache folder:

    manifest.json             what the cache was made from (its fingerprint), the shard size, and once every shard
                              exists `"complete": true` with the latents' statistics in the model's units
    shard-00000.safetensors   images [0, shard_size): "mean", "std" (n, C, h, w) float32 in the VAE's units; with
                              random flips also "mean_flipped", "std_flipped" (the mirrored images, encoded too)

A cache is reused only by a run with the same fingerprint (VAE config and weights, its dtype, the data, resolution,
crop, flips, channels); any other run is refused with the differences named.
"""

import hashlib
import json
import math
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import ImageTransform
from .vae import LatentScaling, encode_moments, latent_shape

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = 1
SHARD_SIZE = 1024
LATENT_SAMPLING = ("mean", "sample")
# A cache of at most this many bytes is read into memory once; a larger one is memory-mapped and sliced per batch.
MAX_IN_MEMORY_BYTES = 2 * 2**30
# sigma_max's rule measures pairwise distances on at most this many latents (a (n, n) distance matrix).
MAX_PAIRWISE = 2048


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------- fingerprint


def cache_fingerprint(vae, dataset, resolution, num_channels, center_crop, random_flip, vae_dtype) -> dict:
    """What a cache is made from, as JSON: two runs may share a cache exactly when their fingerprints are equal."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(f"a {type(dataset).__name__} has no `_fingerprint`: the cache needs a `datasets.Dataset`")
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    return dict(
        format=CACHE_FORMAT,
        vae_config=json.loads(json.dumps(config, default=list)),
        vae_weights=weights_digest(vae),
        vae_dtype=str(vae_dtype).removeprefix("torch."),
        data=fingerprint,
        num_images=len(dataset),
        resolution=resolution,
        num_channels=num_channels,
        center_crop=bool(center_crop),
        random_flip=bool(random_flip),
    )


def weights_digest(model) -> str:
    """SHA-256 (16 hex digits) of a model's parameter and buffer names and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_differences(cached: dict, wanted: dict) -> list[str]:
    """Human-readable differences `key: cached -> wanted` (VAE config keys one by one)."""
    differences = []
    for key in sorted(set(cached) | set(wanted)):
        old, new = cached.get(key), wanted.get(key)
        if key == "vae_config" and isinstance(old, dict) and isinstance(new, dict):
            differences += [
                f"vae_config.{name}: {old.get(name)!r} -> {new.get(name)!r}"
                for name in sorted(set(old) | set(new))
                if old.get(name) != new.get(name)
            ]
        elif old != new:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def read_manifest(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_manifest(cache_dir: str, fingerprint: dict) -> dict | None:
    """The folder's manifest if it was made from `fingerprint` (None for a new cache); a ValueError naming every
    difference otherwise, and for a folder that holds something else."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        if os.path.isdir(cache_dir) and os.listdir(cache_dir):
            raise ValueError(
                f"latent cache folder {cache_dir!r} is not empty and has no {MANIFEST_NAME}: it is not a latent "
                "cache; give an empty or new folder"
            )
        return None
    differences = fingerprint_differences(manifest["fingerprint"], fingerprint)
    if differences:
        raise ValueError(
            f"the latent cache in {cache_dir!r} was made from other settings ({'; '.join(differences)}): give "
            "another cache folder, or delete this one to encode again"
        )
    return manifest


# ---------------------------------------------------------------------- writing


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    """Write a safetensors file under a temporary name, flush it to disk, then rename it into place: the final name
    only ever holds a complete file, whatever kills the process."""
    temporary = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, temporary, metadata=metadata)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _atomic_json(data: dict, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _random_crop_varies(image, resolution: int) -> bool:
    """Whether `ImageTransform`'s random crop of this image can differ between epochs (the image is not square
    after its shorter side is resized), so that one encoding cannot stand for it."""
    width, height = image.size
    scale = resolution / min(width, height)
    return (max(resolution, round(width * scale)), max(resolution, round(height * scale))) != (resolution, resolution)


def _encode_shard(vae, dataset, start, stop, transform, random_flip, center_crop, batch_size, progress):
    """The moments of images [start, stop): {"mean", "std"[, "mean_flipped", "std_flipped"]}, each (n, C, h, w)."""
    moments = {}
    for begin in range(start, stop, batch_size):
        images = dataset[begin : min(begin + batch_size, stop)]["image"]
        if not center_crop:
            for offset, image in enumerate(images):
                if _random_crop_varies(image, transform.resolution):
                    raise ValueError(
                        f"image {begin + offset} is {image.size[0]}x{image.size[1]}: its random crop to "
                        f"{transform.resolution}x{transform.resolution} changes every epoch and cannot be encoded "
                        "once; pass --center_crop (or crop the images square first)"
                    )
        pixels = torch.stack([transform(image) for image in images])  # (b, C_img, H, W) in [-1, 1]
        batches = {"": pixels, "_flipped": pixels.flip(-1)} if random_flip else {"": pixels}
        for suffix, batch in batches.items():
            mean, std = encode_moments(vae, batch)
            moments.setdefault("mean" + suffix, []).append(mean.cpu())
            moments.setdefault("std" + suffix, []).append(std.cpu())
        progress.update(len(images))
    return {name: torch.cat(parts).contiguous() for name, parts in moments.items()}


def build_latent_cache(
    cache_dir: str,
    vae,
    dataset,
    fingerprint: dict,
    accelerator=None,
    batch_size: int = 32,
    shard_size: int = SHARD_SIZE,
) -> "LatentCache":
    """
    Encode every image of `dataset` once into `cache_dir`, or reuse/resume the cache there; return it.

    The shards are split across the processes of `accelerator` (shard k on process k mod num_processes), each with
    a progress bar on the main process. Finished shards are kept: a run killed while encoding resumes with the
    shards that are missing. A cache made from another fingerprint is refused (ValueError naming the differences).

    Args:
        cache_dir (`str`): The cache folder (created if needed).
        vae ([`~diffusers.AutoencoderKL`]): The encoder, on the device and in the dtype it should run in.
        dataset (`datasets.Dataset`): With an `"image"` column of PIL images.
        fingerprint (`dict`): From `cache_fingerprint`; its resolution, channels, crop and flips drive the transform.
        accelerator (`accelerate.Accelerator`, *optional*): Splits the shards across its processes; None: one process.
        batch_size (`int`, defaults to 32): Images per VAE call.
        shard_size (`int`, defaults to 1024): Images per shard (a new cache only; a resume keeps the cache's).

    Returns:
        `LatentCache`
    """
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    is_main = rank == 0

    def wait():
        if accelerator is not None:
            accelerator.wait_for_everyone()

    manifest = check_manifest(cache_dir, fingerprint)  # every process checks: all fail alike, none waits forever
    if manifest is not None and manifest.get("complete"):
        return LatentCache(cache_dir)
    if manifest is None:
        manifest = dict(fingerprint=fingerprint, shard_size=shard_size, complete=False)
    wait()  # all have read the folder before the main process writes in it
    if is_main:
        os.makedirs(cache_dir, exist_ok=True)
        if read_manifest(cache_dir) is None:
            _atomic_json(manifest, os.path.join(cache_dir, MANIFEST_NAME))
    wait()

    shard_size, num_images = manifest["shard_size"], fingerprint["num_images"]
    mine = [k for k in range(math.ceil(num_images / shard_size)) if k % world == rank]
    todo = [k for k in mine if not os.path.isfile(os.path.join(cache_dir, shard_name(k)))]
    transform = ImageTransform(fingerprint["resolution"], fingerprint["num_channels"], center_crop=True)
    pending = sum(min(shard_size, num_images - k * shard_size) for k in todo)
    progress = tqdm(total=pending, desc=f"encoding latents ({world} process(es))", disable=not is_main, unit="img")
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, num_images)
        moments = _encode_shard(
            vae, dataset, start, stop, transform, fingerprint["random_flip"], fingerprint["center_crop"], batch_size,
            progress,
        )  # fmt: skip
        _atomic_save(moments, os.path.join(cache_dir, shard_name(k)), {"start": str(start), "stop": str(stop)})
    progress.close()
    wait()
    if is_main:
        manifest["statistics"] = latent_statistics(cache_dir, manifest)
        manifest["complete"] = True
        _atomic_json(manifest, os.path.join(cache_dir, MANIFEST_NAME))
    wait()
    return LatentCache(cache_dir)


# ---------------------------------------------------------------------- statistics


def latent_statistics(cache_dir: str, manifest: dict) -> dict:
    """The latents' statistics in the model's units (after `LatentScaling.to_model`), from every shard:

    - `rms`: sqrt(E[x^2]) over all values of the posterior means; `rms_sample`: sqrt(E[x^2] + E[s^2]), the same for
      draws x + s eps from the posterior (what `--latent_sampling sample` trains on). EDM's sigma_data is this
      second moment (its preconditioning assumes zero-mean data: c_in = 1 / sqrt(sigma^2 + sigma_data^2)).
    - `channel_mean`, `channel_std`: per latent channel, of the means.
    - `max_pairwise_distance`: the largest Euclidean distance between two latents (means) of at most MAX_PAIRWISE of
      them, sigma_max's rule (Song & Ermon 2020, "Improved techniques", Technique 1).
    - `N`: the latent's size C h w.
    """
    fingerprint = manifest["fingerprint"]
    scaling = LatentScaling.from_config(fingerprint["vae_config"])
    shape = latent_shape(fingerprint["vae_config"], fingerprint["resolution"])
    channels = shape[0]
    total, total_sq, variance, count = torch.zeros(channels, dtype=torch.float64), 0.0, 0.0, 0
    per_channel_sq = torch.zeros(channels, dtype=torch.float64)
    subset = []
    names = ("mean", "mean_flipped") if fingerprint["random_flip"] else ("mean",)
    num_shards = math.ceil(fingerprint["num_images"] / manifest["shard_size"])
    for k in range(num_shards):
        with safe_open(os.path.join(cache_dir, shard_name(k)), framework="pt") as shard:
            for name in names:
                x = scaling.to_model(shard.get_tensor(name)).double()  # (n, C, h, w)
                s = scaling.scale_std(shard.get_tensor(name.replace("mean", "std"))).double()
                total += x.sum((0, 2, 3))
                per_channel_sq += (x**2).sum((0, 2, 3))
                total_sq += float((x**2).sum())
                variance += float((s**2).sum())
                count += x.numel()
                subset.append(x.flatten(1))
    values_per_channel = count / channels
    channel_mean = total / values_per_channel
    channel_std = (per_channel_sq / values_per_channel - channel_mean**2).clamp_min(0).sqrt()
    points = torch.cat(subset)
    if len(points) > MAX_PAIRWISE:  # a fixed subset: the same figure for the same cache
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:MAX_PAIRWISE]]
    return dict(
        N=int(np.prod(shape)),
        num_latents=sum(len(part) for part in subset),
        rms=math.sqrt(total_sq / count),
        rms_sample=math.sqrt((total_sq + variance) / count),
        channel_mean=channel_mean.tolist(),
        channel_std=channel_std.tolist(),
        max_pairwise_distance=float(torch.cdist(points, points).max()),
    )


# ---------------------------------------------------------------------- reading


class LatentCache:
    """A complete latent cache folder: the moments of every image, in the model's units, by row."""

    def __init__(self, cache_dir: str):
        manifest = read_manifest(cache_dir)
        if manifest is None or not manifest.get("complete"):
            raise ValueError(f"{cache_dir!r} holds no complete latent cache: build it with build_latent_cache")
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self.statistics = manifest["statistics"]
        self.scaling = LatentScaling.from_config(self.fingerprint["vae_config"])
        self.latent_shape = latent_shape(self.fingerprint["vae_config"], self.fingerprint["resolution"])
        self.random_flip = self.fingerprint["random_flip"]
        self.shard_size = manifest["shard_size"]
        paths = [os.path.join(cache_dir, shard_name(k)) for k in range(math.ceil(len(self) / self.shard_size))]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"the latent cache {cache_dir!r} misses {missing[:3]}: delete the folder to encode again")
        self._names = ("mean", "std", "mean_flipped", "std_flipped") if self.random_flip else ("mean", "std")
        if sum(os.path.getsize(path) for path in paths) <= MAX_IN_MEMORY_BYTES:
            self._tensors = self._read_all(paths)  # {name: (num_images, C, h, w)} in the model's units
            self._shards = None
        else:
            self._tensors = None
            self._shards = [safe_open(path, framework="pt") for path in paths]

    def __len__(self) -> int:
        return self.fingerprint["num_images"]

    def _read_all(self, paths):
        parts = {name: [] for name in self._names}
        for path in paths:
            with safe_open(path, framework="pt") as shard:
                for name in self._names:
                    parts[name].append(shard.get_tensor(name))
        return {name: self._to_model(name, torch.cat(tensors)) for name, tensors in parts.items()}

    def _to_model(self, name, tensor):
        return self.scaling.to_model(tensor) if name.startswith("mean") else self.scaling.scale_std(tensor)

    def moments(self, indices, flipped=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and std (B, C, h, w) of images `indices` in the model's units; `flipped` (B,) bools
        pick the mirrored images' moments (a cache with flips only)."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if flipped is not None and not self.random_flip:
            raise ValueError("this latent cache holds no flipped images (built without --random_flip)")
        flipped = torch.zeros(len(indices), dtype=torch.bool) if flipped is None else torch.as_tensor(flipped)
        mean, std = (self._rows(name, indices) for name in ("mean", "std"))
        if flipped.any():
            mean[flipped] = self._rows("mean_flipped", indices[flipped])
            std[flipped] = self._rows("std_flipped", indices[flipped])
        return mean, std

    def _rows(self, name, indices):
        if self._tensors is not None:
            return self._tensors[name][indices]
        rows = []
        for index in indices.tolist():
            shard, row = divmod(index, self.shard_size)
            rows.append(self._shards[shard].get_slice(name)[row : row + 1])
        return self._to_model(name, torch.cat(rows))


class LatentDataset(torch.utils.data.Dataset):
    """Training examples from a `LatentCache`: the posterior mean (`sampling="mean"`) or a draw mean + std * eps from
    the posterior (`"sample"`, a new draw every epoch), and with a flip cache the mirrored image's latents half the
    time. Under the trainer's batch key `"pixel_values"` (model latents (C, h, w), not pixels), with `"label"` from
    `labels` when given.

    Each example's flip and draw come from a generator seeded by (seed, epoch, index): the same on every process,
    worker count and resume point, as `data.TrainingDataset`.
    """

    def __init__(self, cache: LatentCache, sampling: str = "mean", seed: int = 0, labels=None):
        if sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent sampling must be one of {LATENT_SAMPLING}, got {sampling!r}")
        if labels is not None and len(labels) != len(cache):
            raise ValueError(f"{len(labels)} labels for a latent cache of {len(cache)} images")
        self.cache = cache
        self.sampling = sampling
        self.seed = seed
        self.labels = None if labels is None else list(labels)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        if not self.cache.random_flip and self.sampling == "mean":  # nothing random: no generators to seed
            return self._examples(indices, self.cache.moments(indices)[0])
        generators = [
            torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            for i in indices
        ]
        flipped = None
        if self.cache.random_flip:
            flipped = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in generators])
        mean, std = self.cache.moments(indices, flipped)
        latents = mean
        if self.sampling == "sample":
            noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
            latents = mean + std * noise
        return self._examples(indices, latents)

    def _examples(self, indices, latents):
        examples = [{"pixel_values": latent} for latent in latents]
        if self.labels is not None:
            for example, index in zip(examples, indices, strict=True):
                example["label"] = self.labels[index]
        return examples


# ---------------------------------------------------------------------- training defaults from the statistics

# D/N of the reported best PFGM++ settings: CIFAR-10 D = 128 at N = 3072 (1/24; D = 2048, 2/3, is as good) and
# FFHQ 64x64 D = 128 at N = 12288 (1/96) (math.md §2, PFGM++ Tables 1-2). Smaller D/N is more robust, larger D/N
# more rigid (PFGM++ Section 4: the kernel's norm concentrates as D grows against N).
AUG_DIM_PER_N = 1 / 24
MIN_AUG_DIM, MAX_AUG_DIM = 64, 2048


def default_aug_dim(N: int) -> int:
    """D for data of size N: the power of two nearest to N / 24 (CIFAR-10's best D/N), within [64, 2048], the range
    the PFGM++ paper found best. A heuristic that keeps D/N where it was measured, not a derived optimum."""
    exponent = round(math.log2(max(N * AUG_DIM_PER_N, 1)))
    return int(min(max(2**exponent, MIN_AUG_DIM), MAX_AUG_DIM))


def training_defaults(statistics: dict, latent_sampling: str = "mean") -> dict:
    """The defaults for latent data and where each comes from, as `{name: (value, source)}`:

    - `sigma_data`: the latents' root mean square (EDM's sigma_data is the data's second moment; 0.5 for images in
      [-1, 1]); with `latent_sampling="sample"` the posterior's variance is included.
    - `aug_dim`: `default_aug_dim(N)` for the latent's N.
    - `sigma_max`: the largest distance between two training latents (Song & Ermon 2020, Technique 1: sigma_max
      about the data's diameter; EDM's 80 for CIFAR-10 in [-1, 1] follows it), rounded up to one significant digit
      above. The PFGM++ prior then has r_max = sigma_max sqrt(D) (the alignment r = sigma sqrt(D), math.md §2).
    """
    if latent_sampling not in LATENT_SAMPLING:
        raise ValueError(f"latent sampling must be one of {LATENT_SAMPLING}, got {latent_sampling!r}")
    sigma_data = statistics["rms_sample" if latent_sampling == "sample" else "rms"]
    distance = statistics["max_pairwise_distance"]
    magnitude = 10 ** math.floor(math.log10(distance)) if distance > 0 else 1.0
    sigma_max = math.ceil(distance / magnitude) * magnitude
    N = statistics["N"]
    return dict(
        sigma_data=(round(sigma_data, 4), f"root mean square of the {statistics['num_latents']} cached latents"),
        aug_dim=(default_aug_dim(N), f"power of two nearest to N / 24 for N = {N} (CIFAR-10's D = 128 at N = 3072)"),
        sigma_max=(sigma_max, f"largest distance between two cached latents ({distance:.4g}), rounded up"),
    )
