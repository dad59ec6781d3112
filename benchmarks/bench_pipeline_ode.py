"""What the adaptive solvers cost besides the network (issue 11): scipy's RK45 steps a float64 copy of the state on
the host, so each evaluation moves the state device -> host -> device and scipy does its vector arithmetic.

For `pipe(solver="rk45")` and `pipe.log_likelihood` on randomly initialised UNets (the tiny test UNet, 8x8x3, and the
digits UNet of pfgm_diffusers/training/configs/unet_digits.json, 16x16x1, 1.1M parameters), per network evaluation:
- network: time inside `unet.forward` (and, for the likelihood, inside `torch.autograd.grad`, the backward pass);
- outside: the rest of the wall time (scipy's RK45, the host copies, preconditioning, the prior map), the figure an
  in-torch solver could remove at most.
Runs alternate between the cases; each figure is the median over `--repeats` runs, with min-max.

    python benchmarks/bench_pipeline_ode.py                    # a few minutes on 2 CPU cores
    python benchmarks/bench_pipeline_ode.py --repeats 1 --cases tiny-2
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from machine import describe  # noqa: E402

from pfgm_diffusers import PFGMPipeline, PFGMScheduler  # noqa: E402


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def digits_unet():
    with open(os.path.join(REPO, "pfgm_diffusers", "training", "configs", "unet_digits.json")) as file:
        config = {key: value for key, value in json.load(file).items() if not key.startswith("_")}
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **config)


CASES = {
    "tiny-2": (tiny_unet, 2),
    "tiny-64": (tiny_unet, 64),
    "digits-16": (digits_unet, 16),
    "digits-64": (digits_unet, 64),
}


class Stopwatch:
    """Accumulates the time spent inside the wrapped callables."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def measure(pipe, batch_size, task):
    """(seconds per evaluation outside the network, inside it, nfe) of one run."""
    watch = Stopwatch()
    forward, grad = pipe.unet.forward, torch.autograd.grad
    pipe.unet.forward, torch.autograd.grad = watch.wrap(forward), watch.wrap(grad)
    try:
        start = time.perf_counter()
        if task == "sample":
            nfe = pipe(batch_size=batch_size, solver="rk45", generator=torch.Generator().manual_seed(0)).nfe
        else:
            size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
            images = torch.rand(batch_size, channels, size, size, generator=torch.Generator().manual_seed(0))
            nfe = pipe.log_likelihood(images, generator=torch.Generator().manual_seed(1), rtol=1e-4, atol=1e-4).nfe
        total = time.perf_counter() - start
    finally:
        pipe.unet.forward, torch.autograd.grad = forward, grad
    return (total - watch.seconds) / nfe, watch.seconds / nfe, nfe


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"load average before: {os.getloadavg()}")
    pipes = {}
    for name in args.cases:
        make_unet, batch_size = CASES[name]
        pipes[name] = (PFGMPipeline(unet=make_unet().eval(), scheduler=PFGMScheduler(aug_dim=128)), batch_size)
        pipes[name][0].set_progress_bar_config(disable=True)
    results = {(name, task): [] for name in args.cases for task in ("sample", "likelihood")}
    for _ in range(args.repeats):  # alternate the cases within each repeat
        for (name, task), runs in results.items():
            pipe, batch_size = pipes[name]
            runs.append(measure(pipe, batch_size, task))
    print("| case | task | NFE | outside the network per evaluation | network per evaluation | outside / network |")
    print("|---|---|---|---|---|---|")
    for (name, task), runs in results.items():
        outside, inside = [run[0] * 1e3 for run in runs], [run[1] * 1e3 for run in runs]
        ratio = [o / i for o, i in zip(outside, inside, strict=True)]
        print(
            f"| {name} | {task} | {runs[0][2]} | {statistics.median(outside):.3f} ms ({min(outside):.3f}-"
            f"{max(outside):.3f}) | {statistics.median(inside):.2f} ms ({min(inside):.2f}-{max(inside):.2f}) | "
            f"{100 * statistics.median(ratio):.1f}% ({100 * min(ratio):.1f}-{100 * max(ratio):.1f}) |"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
