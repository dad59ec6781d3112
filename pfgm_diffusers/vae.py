"""The latent space of a pretrained `AutoencoderKL`: loading, the latent shape, the scaling convention, the precision
the VAE runs in, and encoding/decoding.

Latent PFGM++ trains the UNet on `to_model(z)`, where z is the VAE's latent, and decodes `vae.decode(to_vae(x))`; the
scaling follows diffusers' pipelines exactly (`LatentScaling`). Everything the PFGM++ math needs is unchanged: N is
the latent's size C_lat * (H / f) * (W / f) instead of the image's.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from .validation import check_integer, is_integer

VAE_CLASS_NAME = "AutoencoderKL"
VAE_CONFIG_NAME = "config.json"


# ---------------------------------------------------------------------- loading


def load_vae(
    pretrained_model_name_or_path: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> AutoencoderKL:
    """
    Load an `AutoencoderKL` from a folder or a Hub id, in float32 and eval mode.

    Args:
        pretrained_model_name_or_path (`str`):
            A folder written by `AutoencoderKL.save_pretrained` or a Hub id (e.g. `"stabilityai/sd-vae-ft-mse"`).
        subfolder (`str`, *optional*):
            The VAE's folder inside a pipeline repository, e.g. `"vae"` for `"stabilityai/stable-diffusion-2-1"`.
        revision (`str`, *optional*), cache_dir (`str`, *optional*), local_files_only (`bool`, defaults to `False`):
            Passed to `from_pretrained`.

    Returns:
        [`~diffusers.AutoencoderKL`]

    Raises:
        `ValueError`: for a folder without a VAE config (naming a `vae/` sub-folder when there is one), a model that
        is not an `AutoencoderKL`, or a source that cannot be read.
    """
    config = load_vae_config(pretrained_model_name_or_path, subfolder, revision, cache_dir, local_files_only)
    vae = AutoencoderKL.from_pretrained(
        pretrained_model_name_or_path,
        subfolder=subfolder,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        torch_dtype=torch.float32,
    )
    check_vae_config(vae.config, where=_where(pretrained_model_name_or_path, subfolder))
    assert vae.config.latent_channels == config["latent_channels"]
    return vae.eval().requires_grad_(False)


def load_vae_config(
    pretrained_model_name_or_path: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> dict:
    """The VAE's config (a dict), checked to be an `AutoencoderKL`'s; reads no weights. ValueError otherwise."""
    where = _where(pretrained_model_name_or_path, subfolder)
    if os.path.isdir(pretrained_model_name_or_path):
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if not os.path.isfile(os.path.join(folder, VAE_CONFIG_NAME)):
            raise ValueError(f"{where} holds no AutoencoderKL (no {VAE_CONFIG_NAME}){_folder_hint(folder, subfolder)}")
        with open(os.path.join(folder, VAE_CONFIG_NAME)) as f:
            config = json.load(f)
    else:
        try:
            config = dict(
                AutoencoderKL.load_config(
                    pretrained_model_name_or_path,
                    subfolder=subfolder,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        except (OSError, ValueError) as error:  # no such repo, no network, no config.json in it
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(
                f"cannot read an AutoencoderKL config from {where}: {reason}. Give a folder written by "
                "AutoencoderKL.save_pretrained or a Hub id such as 'stabilityai/sd-vae-ft-mse' (with "
                "--vae_subfolder vae for a pipeline repository)"
            ) from None
    check_vae_config(config, where)
    return config


def check_vae_config(config, where: str = "the VAE") -> None:
    """Refuse a config that is not an `AutoencoderKL`'s (another model class, or no latent channels)."""
    class_name = config.get("_class_name")
    if class_name is not None and class_name != VAE_CLASS_NAME:
        hint = " (a pipeline's model_index.json? pass its VAE sub-folder, e.g. --vae_subfolder vae)"
        raise ValueError(
            f"{where} is a {class_name}, not an {VAE_CLASS_NAME}: latent PFGM++ encodes with an AutoencoderKL "
            f"(e.g. 'stabilityai/sd-vae-ft-mse'){hint if class_name.endswith('Pipeline') else ''}"
        )
    if "latent_channels" not in config or "block_out_channels" not in config:
        raise ValueError(f"{where} is not an {VAE_CLASS_NAME} config: it has no latent_channels/block_out_channels")


def _where(path, subfolder):
    return repr(path) if subfolder is None else f"{path!r} (subfolder {subfolder!r})"


def _folder_hint(folder, subfolder):
    if subfolder is None and os.path.isfile(os.path.join(folder, "vae", VAE_CONFIG_NAME)):
        return "; it has a vae/ sub-folder: pass --vae_subfolder vae (vae_subfolder='vae')"
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return "; it is a pipeline folder: pass the sub-folder that holds its VAE (--vae_subfolder)"
    return ""


# ---------------------------------------------------------------------- the latent geometry


def vae_scale_factor(config) -> int:
    """The VAE's spatial downsampling factor f = 2^(len(block_out_channels) - 1), diffusers' `vae_scale_factor`."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def latent_shape(config, resolution: int) -> tuple[int, int, int]:
    """(latent_channels, resolution / f, resolution / f) of images `resolution` pixels square; a ValueError when the
    resolution is not divisible by f (the decoder would return another size)."""
    factor = vae_scale_factor(config)
    if not is_integer(resolution) or resolution < 1 or resolution % factor:
        below = resolution // factor * factor if is_integer(resolution) else 0
        nearest = f"{below} or {below + factor}" if below > 0 else str(factor)
        raise ValueError(
            f"resolution {resolution!r} is not a positive multiple of {factor}, the VAE's downsampling factor "
            f"(2^(len(block_out_channels) - 1), block_out_channels={list(config['block_out_channels'])}): use e.g. "
            f"{nearest}"
        )
    return (int(config["latent_channels"]), resolution // factor, resolution // factor)


# ---------------------------------------------------------------------- the scaling convention


@dataclass(frozen=True)
class LatentScaling:
    """The map between the VAE's latents z and the diffusion model's latents x, as diffusers pipelines apply it:

    - `x = (z - shift) * scaling_factor` (Stable Diffusion 1/2: shift 0; SD3 and Flux: the config's `shift_factor`);
    - with per-channel `latents_mean` and `latents_std` in the config (some SDXL VAEs):
      `x = (z - latents_mean) * scaling_factor / latents_std`.

    Decoding inverts it: `z = x / scaling_factor + shift` (resp. `x * latents_std / scaling_factor + latents_mean`).
    """

    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config) -> "LatentScaling":
        scaling_factor = config.get("scaling_factor")
        if scaling_factor is None or not math.isfinite(scaling_factor) or scaling_factor <= 0:
            raise ValueError(f"the VAE's scaling_factor must be a finite number > 0, got {scaling_factor!r}")
        shift, mean, std = config.get("shift_factor"), config.get("latents_mean"), config.get("latents_std")
        if (mean is None) != (std is None):
            raise ValueError("the VAE config has only one of latents_mean and latents_std: give both or neither")
        if mean is not None and shift not in (None, 0):
            raise ValueError(f"the VAE config has both shift_factor={shift} and latents_mean: one shift only")
        if mean is not None and not (len(mean) == len(std) == config["latent_channels"]):
            raise ValueError(f"latents_mean/latents_std need {config['latent_channels']} values (latent_channels)")
        return cls(
            scaling_factor=float(scaling_factor),
            shift_factor=0.0 if shift is None else float(shift),
            latents_mean=None if mean is None else tuple(float(value) for value in mean),
            latents_std=None if std is None else tuple(float(value) for value in std),
        )

    def _shift_and_scale(self, like: torch.Tensor):
        """The shift and the multiplier of `to_model`, broadcastable to (B, C, h, w) latents like `like`."""
        if self.latents_mean is None:
            return self.shift_factor, self.scaling_factor
        mean = torch.tensor(self.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, self.scaling_factor / std

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (B, C, h, w) -> the diffusion model's."""
        shift, scale = self._shift_and_scale(z)
        return (z - shift) * scale

    def to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents (B, C, h, w) -> the VAE's, ready for `vae.decode`."""
        shift, scale = self._shift_and_scale(x)
        return x / scale + shift

    def scale_std(self, std: torch.Tensor) -> torch.Tensor:
        """A standard deviation of z (B, C, h, w) in the model's units (the map is affine: only the multiplier)."""
        return std * self._shift_and_scale(std)[1]


# ---------------------------------------------------------------------- precision


def vae_dtype(config, mixed_precision: str | None) -> torch.dtype:
    """The dtype the VAE runs in under `mixed_precision` ("no", "fp16", "bf16" or None).

    float16 only where the config says `force_upcast` is False: the Stable Diffusion VAEs' decoder (and encoder, at
    high resolution) produce activations beyond float16's largest value 65504, which become inf and then NaN images
    (the SDXL VAE's known failure; `madebyollin/sdxl-vae-fp16-fix` was fine-tuned to stay in range and sets
    `force_upcast: false`). diffusers' pipelines upcast for the same reason. bfloat16 has float32's exponent range,
    so it is used as asked.
    """
    if mixed_precision in (None, "no"):
        return torch.float32
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        return torch.float32 if config.get("force_upcast", True) else torch.float16
    raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")


# ---------------------------------------------------------------------- encoding and decoding


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std (B, C, h, w) of the VAE's posterior for images (B, C_img, H, W) in [-1, 1], float32, in the
    VAE's own units (before `LatentScaling.to_model`)."""
    distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return distribution.mean.float(), distribution.std.float()


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKL, latents: torch.Tensor, scaling: LatentScaling, decode_batch_size: int | None = None
) -> torch.Tensor:
    """Model latents (B, C, h, w) -> images (B, C_img, H, W) in [-1, 1] (not clipped), float32; `decode_batch_size`
    images at a time (decoding is the memory peak of sampling), all at once for None."""
    if decode_batch_size is not None:
        check_integer("decode_batch_size", decode_batch_size)
    z = scaling.to_vae(latents.float())
    step = z.shape[0] if decode_batch_size is None else decode_batch_size
    images = [vae.decode(chunk.to(vae.device, vae.dtype)).sample.float() for chunk in z.split(max(step, 1))]
    return torch.cat(images)


def check_vae(vae, num_latent_channels: int) -> None:
    """Refuse a `vae` that is not an `AutoencoderKL` or whose latent channels differ from the UNet's input
    channels (`num_latent_channels`)."""
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"vae must be a diffusers AutoencoderKL, got a {type(vae).__name__}: load one with "
            "AutoencoderKL.from_pretrained (e.g. 'stabilityai/sd-vae-ft-mse') or pfgm_diffusers.vae.load_vae"
        )
    if vae.config.latent_channels != num_latent_channels:
        raise ValueError(
            f"the VAE has latent_channels={vae.config.latent_channels} but the UNet takes {num_latent_channels} input "
            "channels: a latent model's UNet has the VAE's latent channels (in_channels, and out_channels for "
            "PFGM++)"
        )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, C_img, H, W) in [-1, 1] -> the model's latents (B, C, h, w) (the posterior mean, scaled), float32."""
    return LatentScaling.from_config(vae.config).to_model(encode_moments(vae, pixels)[0])
