"""PSNR and SSIM against closed forms and a direct per-window implementation of Wang et al. (2004), eq. 13."""

import math

import numpy as np
import pytest
import torch

from pfgm_diffusers.image_metrics import RestorationMetrics, digit_classifier, psnr, ssim


def test_psnr_of_a_known_mean_squared_error():
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0.1, 0.01, 0.5]).reshape(3, 1, 1, 1)
    expected = 10 * torch.log10(1 / offsets.reshape(3).double() ** 2)
    assert torch.allclose(psnr(x + offsets, x), expected, atol=1e-9)
    # data_range scales the peak: [-1, 1] images with the same error are 20 log10(2) dB higher
    assert torch.allclose(psnr(x + offsets, x, data_range=2.0), expected + 20 * math.log10(2), atol=1e-9)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_of_identical_images_is_one_and_of_constants_the_luminance_term():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    # Two constant images a, b: no structure (variances 0), so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01**2
    value = ssim(torch.full((1, 1, 9, 9), a), torch.full((1, 1, 9, 9), b))
    assert value.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


def _direct_ssim(x, y, win=7, data_range=1.0):
    """Per window, per channel, as written in the paper with sample (N - 1) statistics; numpy float64."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                a, b = x[c, i : i + win, j : j + win].ravel(), y[c, i : i + win, j : j + win].ravel()
                mu_a, mu_b = a.mean(), b.mean()
                var_a, var_b = a.var(ddof=1), b.var(ddof=1)
                cov = ((a - mu_a) * (b - mu_b)).sum() / (a.size - 1)
                values.append(
                    (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
    return float(np.mean(values))


def test_ssim_matches_a_direct_implementation_per_window():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 10, 9, generator=generator)
    y = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    got = ssim(x, y)
    for index in range(2):
        assert got[index].item() == pytest.approx(_direct_ssim(x[index].double().numpy(), y[index].double().numpy()))
    assert (got < 0.99).all()
    # numpy (B, H, W, C) arrays, as the pipelines' output_type="np" gives, are read as such
    assert torch.allclose(ssim(x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()), got)


def test_bad_input_is_refused():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, torch.rand(1, 1, 8, 7))
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))
    with pytest.raises(ValueError, match="odd integer"):
        ssim(x, x, win_size=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(x[0], x[0])


def test_restoration_metrics_accumulate_batches_beside_the_degraded_inputs():
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    clean = torch.rand(6, 1, 8, 8, generator=generator) * 0.6
    clean[:, 0, 0, 0] = labels / 10  # a stand-in classifier reads the label from the first pixel
    restored = clean.clone()
    restored[..., 1:, :] += 0.05
    degraded = clean + 0.3

    def classify(images):
        return (images[:, 0, 0, 0] * 10).round().long()

    metrics = RestorationMetrics(classify=classify)
    metrics.update(restored[:4], clean[:4], degraded[:4], labels[:4])
    metrics.update(restored[4:], clean[4:], degraded[4:], labels[4:])
    result = metrics.compute()
    assert result["num_images"] == 6
    assert result["psnr"] == pytest.approx(psnr(restored, clean).mean().item())
    assert result["ssim"] == pytest.approx(ssim(restored, clean).mean().item())
    assert result["degraded_psnr"] == pytest.approx(20 * math.log10(1 / 0.3))
    assert (result["accuracy"], result["degraded_accuracy"]) == (1.0, 0.0)
    assert result["psnr_sem"] == pytest.approx(psnr(restored, clean).std().item() / 6**0.5)
    with pytest.raises(ValueError, match="before any update"):
        RestorationMetrics().compute()
    with pytest.raises(ValueError, match="no `classify`"):
        RestorationMetrics().update(restored, clean, labels=labels)


def test_the_digit_classifier_labels_held_out_8px_digits():
    from pfgm_diffusers.evaluation import digits_split, load_digits_images

    _, heldout = digits_split()
    images, labels = load_digits_images(heldout[:200])  # (200, 1, 16, 16) in [0, 1]
    eight = torch.nn.functional.avg_pool2d(images, 2)  # the trainer's 8x8 digits
    accuracy = (digit_classifier()(eight) == labels).float().mean().item()
    assert accuracy > 0.9
    assert (digit_classifier()(torch.rand(200, 1, 8, 8)) == labels).float().mean() < 0.3
