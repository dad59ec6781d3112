"""Classifier-free guidance for class-conditional models: a null class, `guidance_scale` in every mode, one call."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from tiny_models import tiny_unet

from pfgm_diffusers import PFGMPipeline, PFGMScheduler

OLD_CLASSES = os.path.join(os.path.dirname(__file__), "fixtures", "saved_v0_1", "pfgmpp_classes")
LABELS = torch.tensor([0, 1, 1])


class CallRecorder:
    """Records each UNet forward call's batch size and class labels, and its output."""

    def __init__(self, unet):
        self.calls, self.outputs = [], []
        unet.register_forward_pre_hook(self, with_kwargs=True)
        unet.register_forward_hook(lambda module, args, output: self.outputs.append(output.sample.clone()))

    def __call__(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs.get("class_labels")))

    def take(self):
        """The outputs recorded since the last call, as one tensor (clamped images can hide differences)."""
        outputs, self.outputs, self.calls = torch.cat(self.outputs), [], []
        return outputs


def pipelines(field=False):
    """The same tiny 2-class UNet (3 embeddings, the last one null) as a guidable pipeline and as one that knows no
    null class (the reference: its labels 0..2 are plain embeddings)."""
    scheduler = PFGMScheduler(prediction_type="poisson_field", aug_dim=1) if field else PFGMScheduler(aug_dim=16)
    unet = tiny_unet(out_channels=4 if field else 3, num_class_embeds=3)
    guided = PFGMPipeline(unet=unet, scheduler=scheduler, class_names=["cat", "dog"], null_class_label=2)
    plain = PFGMPipeline(unet=unet, scheduler=PFGMScheduler.from_config(scheduler.config))
    for pipe in (guided, plain):
        pipe.set_progress_bar_config(disable=True)
    return guided, plain


def latents():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


MODES = [("heun", False), ("euler", False), ("dpmpp_2m", False), ("rk45", False), ("heun", True), ("rk45", True)]


def sample(pipe, solver, labels, **kwargs):
    return pipe(
        class_labels=labels, latents=latents(), num_inference_steps=3, solver=solver, output_type="pt", **kwargs
    ).images


@pytest.mark.parametrize("solver, field", MODES)
def test_scale_one_is_the_conditional_model_and_zero_the_null_class_exactly(solver, field):
    guided, plain = pipelines(field)
    recorder = CallRecorder(guided.unet)  # the same UNet: it records both pipelines
    conditional = sample(plain, solver, LABELS), recorder.take()
    unconditional = sample(plain, solver, torch.full_like(LABELS, 2)), recorder.take()
    images = sample(guided, solver, LABELS, guidance_scale=1.0)
    assert all(batch == 3 for batch, _ in recorder.calls)  # no null branch was computed
    assert torch.equal(images, conditional[0]) and torch.equal(recorder.take(), conditional[1])
    images = sample(guided, solver, LABELS, guidance_scale=0)
    assert torch.equal(images, unconditional[0]) and torch.equal(recorder.take(), unconditional[1])
    assert not torch.equal(conditional[1], unconditional[1])  # the labels matter: the equalities say something


@pytest.mark.parametrize("solver, field", MODES)
def test_other_scales_run_both_branches_in_one_batched_call_per_evaluation(solver, field):
    guided, _ = pipelines(field)
    recorder = CallRecorder(guided.unet)
    output = guided(
        class_labels=LABELS, latents=latents(), num_inference_steps=3, solver=solver, output_type="pt",
        guidance_scale=3.0,
    )  # fmt: skip
    assert len(recorder.calls) == output.nfe  # one network call per evaluation
    for batch, labels in recorder.calls:
        assert batch == 6 and labels.tolist() == [0, 1, 1, 2, 2, 2]  # conditional and null branches together
    assert torch.isfinite(output.images).all()


def test_the_guided_denoiser_is_d_null_plus_w_times_the_difference():
    guided, _ = pipelines()
    x, sigma = 5 * latents(), 2.0
    d_cond = guided.denoise(x, sigma, LABELS)
    d_null = guided.denoise(x, sigma, torch.full_like(LABELS, 2), guidance_scale=1.0)
    assert torch.allclose(guided.denoise(x, sigma, LABELS, guidance_scale=2.5), d_null + 2.5 * (d_cond - d_null),
                          atol=1e-5)  # fmt: skip
    assert not torch.allclose(d_cond, d_null, atol=1e-3)


@pytest.mark.parametrize("solver", ["heun", "rk45"])
def test_invert_takes_the_guidance_scale(solver):
    guided, plain = pipelines()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=4, solver=solver)
    conditional = plain.invert(images, class_labels=LABELS, **kwargs)
    assert torch.equal(guided.invert(images, class_labels=LABELS, guidance_scale=1, **kwargs), conditional)
    null = plain.invert(images, class_labels=torch.full_like(LABELS, 2), **kwargs)
    assert torch.equal(guided.invert(images, class_labels=LABELS, guidance_scale=0, **kwargs), null)
    recorder = CallRecorder(guided.unet)
    strong = guided.invert(images, class_labels=LABELS, guidance_scale=3.0, **kwargs)
    assert recorder.calls and all(batch == 6 for batch, _ in recorder.calls)
    assert torch.isfinite(strong).all() and not torch.allclose(strong, null, atol=1e-3)


def test_saved_null_class_survives_a_round_trip_and_random_labels_never_draw_it(tmp_path):
    guided, _ = pipelines()
    guided.save_pretrained(tmp_path)
    loaded = PFGMPipeline.from_pretrained(tmp_path)
    assert loaded.config.null_class_label == 2 and loaded.num_classes == 2
    labels = loaded.prepare_class_labels(None, 400, torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == {0, 1}
    assert loaded.prepare_class_labels("dog", 1).tolist() == [1]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*null class 2"):
        loaded.prepare_class_labels(2, 1)


def test_old_class_conditional_folders_load_and_refuse_guidance_clearly():
    pipe = PFGMPipeline.from_pretrained(OLD_CLASSES)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.null_class_label is None
    assert pipe.num_classes == pipe.unet.config.num_class_embeds
    pipe(class_labels=0, num_inference_steps=2, guidance_scale=1.0)  # still samples
    with pytest.raises(ValueError, match="null class.*--class_dropout_prob.*guidance_scale=1"):
        pipe(class_labels=0, num_inference_steps=2, guidance_scale=2.0)


def test_bad_guidance_input():
    guided, _ = pipelines()
    unconditional = PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(aug_dim=16))
    with pytest.raises(ValueError, match="needs a conditional model"):
        unconditional(num_inference_steps=2, guidance_scale=0.0)
    for bad in ("2", None, True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            guided(class_labels=LABELS, batch_size=3, num_inference_steps=2, guidance_scale=bad)
    with pytest.raises(ValueError, match="log_likelihood has no guidance_scale=2.0"):
        guided.log_likelihood(torch.rand(3, 3, 8, 8), class_labels=LABELS, guidance_scale=2.0)
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="null_class_label must be the last class embedding, 2"):
            PFGMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=PFGMScheduler(), null_class_label=bad)
    with pytest.raises(ValueError, match="needs a class-conditional UNet"):
        PFGMPipeline(unet=tiny_unet(), scheduler=PFGMScheduler(), null_class_label=0)
    with pytest.raises(ValueError, match="Got 3 class_names"):
        PFGMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=PFGMScheduler(), class_names=["a", "b", "c"],
                     null_class_label=2)  # fmt: skip


def load_script(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", name + ".py")
    spec = importlib.util.spec_from_file_location(name + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_script_guides_and_refuses_a_model_without_a_null_class(tmp_path, capsys):
    guided, plain = pipelines()
    guided.save_pretrained(tmp_path / "guided")
    argv = ["--model", str(tmp_path / "guided"), "--num_images", "2", "--num_inference_steps", "3", "--seed", "5"]
    images, _ = load_script("sample").main(argv + ["--output", str(tmp_path / "g.png"), "--class_labels", "dog",
                                                   "--guidance_scale", "0"])  # fmt: skip
    expected = plain(class_labels=2, num_inference_steps=3, generator=torch.Generator().manual_seed(6)).images[0]
    assert np.array_equal(np.asarray(images[1]), np.asarray(expected))  # w = 0: the null class's image

    plain.save_pretrained(tmp_path / "old")
    with pytest.raises(SystemExit, match="--guidance_scale: .*null class.*--class_dropout_prob"):
        load_script("sample").main(["--model", str(tmp_path / "old"), "--output", str(tmp_path / "o.png"),
                                    "--guidance_scale", "2"])  # fmt: skip
    assert not (tmp_path / "o.png").exists()


def test_evaluate_script_passes_the_guidance_scale_and_refuses_before_measuring(tmp_path, monkeypatch):
    script = load_script("evaluate")
    guided, plain = pipelines()
    args = script.parse_args(["--model", "unused", "--guidance_scale", "0", "--num_inference_steps", "3"])
    args.device = "cpu"
    images, _ = script.generate(guided, [torch.Generator().manual_seed(0)], args)
    expected = guided(num_inference_steps=3, generator=[torch.Generator().manual_seed(0)], output_type="np",
                      guidance_scale=0).images  # fmt: skip
    assert np.array_equal(images, expected)
    args.guidance_scale = 1.0
    assert not np.array_equal(script.generate(guided, [torch.Generator().manual_seed(0)], args)[0], expected)
    plain.save_pretrained(tmp_path / "old")
    monkeypatch.setattr(script, "build_metric", lambda *a: pytest.fail("the metric was set up before the refusal"))
    with pytest.raises(SystemExit, match="evaluate.py: --guidance_scale: .*null class"):
        script.main(["--model", str(tmp_path / "old"), "--guidance_scale", "3"])
