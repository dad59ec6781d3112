"""Channel concatenation of the condition, for the losses and the samplers alike."""

import pytest
import torch
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMScheduler
from pfgm_diffusers.conditioning import ConditionedUNet, concat_condition, with_condition
from pfgm_diffusers.losses import pfgmpp_loss


def test_the_condition_is_appended_after_the_sample_channels():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    joined = concat_condition(x, y)
    assert joined.shape == (2, 4, 4, 4) and joined.dtype == torch.float32
    assert torch.equal(joined[:, :3], x) and torch.equal(joined[:, 3:], y.float())
    assert concat_condition(x, None) is x
    with pytest.raises(ValueError, match="must match the sample"):
        concat_condition(x, torch.randn(3, 1, 4, 4))


def test_a_loss_trains_a_conditioned_network_without_knowing_it():
    unet = tiny_unet(in_channels=4, out_channels=3)
    seen = []
    unet.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    loss = pfgmpp_loss(
        with_condition(unet, y), PFGMScheduler(aug_dim=128), x, generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert torch.isfinite(loss) and unet.conv_in.weight.grad[:, 3].abs().sum() > 0  # the condition's weights learn
    assert torch.equal(seen[0][:, 3:], y)  # the condition is never noised or scaled
    assert with_condition(unet, None) is unet


def test_a_conditioned_unet_takes_the_condition_as_a_keyword():
    unet = tiny_unet(in_channels=4, out_channels=3)
    x, y, t = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.2])
    conditioned = ConditionedUNet(unet)
    assert conditioned.dtype == unet.dtype and conditioned.config.in_channels == 4
    expected = unet(torch.cat([x, y], dim=1), t).sample
    assert torch.equal(conditioned(x, t, conditioning_image=y).sample, expected)
