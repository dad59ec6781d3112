"""Settings of the sweep that the project runs itself: the evidence of docs/benchmarks.md (`EVIDENCE`, `make
evidence`), what of it fits a shared machine (`EVIDENCE_REDUCED`, `make evidence-reduced`) and its toy-sized machinery
check (`EVIDENCE_QUICK`, `make evidence-quick`)."""

from .models import UNET_CONFIG

# Chosen with pilots: every model gets the same UNet, batch, learning rate, EMA and steps. Time on 2 idle cores,
# estimated from costs measured there (60 ms per step per job, two jobs at once, ~7 s per trainer start, 0.31 ms per
# image and network call): training ~30 min for the six D, ~10 min more for the four STF models; sampling ~14 min,
# ~3 min more for Restart and its Heun at equal NFE.
EVIDENCE = {
    "data": {},  # the embedded digits
    "models": [
        ["pfgmpp", 8],
        ["pfgmpp", 64],
        ["pfgmpp", 128],
        ["pfgmpp", 2048],
        ["pfgmpp", None],
        ["poisson_field", None],
        # Stable Target Field at equal training steps (Xu, Tong, Jaakkola 2023): the D where the paper reports it
        ["pfgmpp", 128, "stf"],
        ["pfgmpp", None, "stf"],
    ],
    "seeds": [0, 1],
    "training": {
        "resolution": 8,
        "model_config": UNET_CONFIG,
        "batch_size": 64,
        # Pilots (D = 128 and 8, seed 0, 500 samples, confident share): with 2e-3, 0.82-0.83 at 2000 steps,
        # 0.85-0.86 at 3000, 0.90 at 4500, 0.89 at 6000; 1e-3 needed 6000 steps for 0.92 and 3e-3 stalled at 0.88
        "learning_rate": 2e-3,
        "lr_warmup_steps": 200,
        "ema_max_decay": 0.999,
        "segments": [500, 1000, 2000, 3000, 4000],
        # --target stf's reference batch: the official README's 1024 (the code's default 4096 exceeds the 1797 digits)
        "reference_batch_size": 1024,
        # The field model's perturbation reaches the prior's clipped radii at N = 64: sigma sqrt(N) (1 + tau)^M
        # = 0.08 * 1.03^356 ~ 3000 = upper_norm (math.md §3; CIFAR-10's M = 291 is for N = 3072)
        "field": {"M": 356, "upper_norm": 3000.0, "z_exp": 1.0},
    },
    "evaluation": {
        "metric": "digits",
        "num_images": 700,
        "curve_images": 400,
        "batch_size": 350,
        "sample_seed": 0,
        "num_bootstrap": 100,
        "reference_steps": 18,
        # Heun 5-35 calls, Euler, and every other scheduler solver (dpmpp_2m) up to 25 calls
        "steps": {"heun": [3, 4, 6, 9, 13, 18], "euler": [6, 12, 35], "other": [5, 7, 9, 12, 17, 25]},
        "noise_scales": [0.05, 0.1, 0.2],
        "quantization_bits": [5, 6, 7, 8, 9],
        # Restart (Xu et al. 2023) with the official PFGM++ CIFAR-10 block on the main Heun grids of 9 and 18 steps
        # (25 and 43 NFE), each against Heun at the same NFE (13 and 22 steps)
        "restart_steps": [9, 18],
        "restart_blocks": {"0": [3, 2, 0.14, 0.30]},
        "rk45_all": False,
        # RK45 with the official tolerances on a subset, within a budget of calls (pilot: the field models spent
        # more than 3000 calls on 8 images between z = 5 and 10 and did not finish)
        "rk45_images": 100,
        "rk45_batch_size": 100,
        "rk45_max_nfe": 1000,
    },
}
# The same machinery at toy sizes: three models, one seed, short training, few images.
EVIDENCE_QUICK = {
    **EVIDENCE,
    "models": [["pfgmpp", 8], ["pfgmpp", None], ["poisson_field", None], ["pfgmpp", None, "stf"]],
    "seeds": [0],
    "training": {**EVIDENCE["training"], "segments": [150, 300]},
    "evaluation": {
        **EVIDENCE["evaluation"],
        "num_images": 200,
        "curve_images": 100,
        "batch_size": 200,
        "num_bootstrap": 20,
        "steps": {"heun": [3, 6, 18], "euler": [6, 35], "other": [5, 9, 17]},
        "noise_scales": [0.2],
        "quantization_bits": [5, 8],
        "restart_steps": [18],
        "rk45_images": 50,
        "rk45_batch_size": 50,
    },
}
# What fitted a shared 2-core machine in about an hour (the run of docs/benchmarks.md of 2026-12-07): the D of the
# robustness claims and of the STF and Restart comparisons, two seeds, 1000 training steps, 400 images, Heun only; the
# STF models measured at the reference only (their comparison is the training curve).
EVIDENCE_REDUCED = {
    **EVIDENCE,
    "models": [
        ["pfgmpp", 8],
        ["pfgmpp", 128],
        ["pfgmpp", 2048],
        ["pfgmpp", None],
        ["pfgmpp", 128, "stf"],
        ["pfgmpp", None, "stf"],
    ],
    "training": {**EVIDENCE["training"], "segments": [500, 1000]},
    "evaluation": {
        **EVIDENCE["evaluation"],
        "num_images": 400,
        "curve_images": 200,
        "batch_size": 200,
        "steps": {"heun": [3, 6, 9, 13, 18], "other": []},
        "noise_scales": [0.1, 0.2],
        "quantization_bits": [5, 6, 8],
        "other_targets": "reference",
    },
}
PRESETS = {"evidence": EVIDENCE, "evidence-quick": EVIDENCE_QUICK, "evidence-reduced": EVIDENCE_REDUCED}
