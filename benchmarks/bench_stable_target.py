"""Benchmark of the Stable Target Field target `stable_target` (issue 19). A script, not a test.

    python benchmarks/bench_stable_target.py --threads 1 --json stable_target.json   # B=128, L=4096, N=3072, D=128

One run prints (and writes with --json):

1. The machine line of every benchmark (benchmarks/machine.py) and the 1-minute load before and after the timings.
2. Time: B perturbed CIFAR-like images (the first B of the L reference images, perturbed with the PFGM++ kernel at
   per-sample sigma drawn as in training, ln sigma ~ N(-1.2, 1.2^2)) against the reference batch of L (the official
   default --rbatch 4096). Alternate calls of the two-product floor ((B, N) @ (N, L) and (B, L) @ (L, N) in float32,
   what any matrix-product form needs) and of `stable_target`, after a warm-up: the medians per clock (wall, process
   CPU), their ratio and the min-max of each target call's ratio to the floor call before it (as
   bench_field_target.py does; at one thread the CPU-time ratio barely moves with other processes' load).
3. Peak memory of one call beyond its inputs, floor and target, each in a fresh subprocess (the method of
   bench_field_target.py: glibc mmaps every buffer >= 64 KiB, VmHWM after `clear_refs`), and of the official form
   (`Newbeeer/pfgmpp` `training/loss.py`, `EDMLoss.pfgmpp_target`: (B, L, N+1) float64 differences, linear-space
   weights (min_j d_j / (d_j + 1e-7))^(N+D), the reference repeated to (B, L, N+1); for D = infinity `stf_scores`,
   the same in float32 with (B, L, N) tensors and a max-shifted softmax) on the first `--official-rows` rows that
   fit in 80% of the available memory, its time and memory scaled to B rows (both are linear in B); and the
   analytic peak of its two live (B, L, N+1) tensors.
4. Accuracy: the largest |target - reference| over the elements, against a float64 direct form (exact differences,
   log-space softmax), for `stable_target` and the official form, on the timed input.
5. Training variance at fixed sigma, on the embedded digits (1797 images, N = 64): batches of B clean images x_i,
   y_i = x_i + kernel noise at sigma, the reference batch = the batch + L - B other images drawn at random (as the
   trainer builds it). For the plain target x_i and the STF target, the mean squared deviation per dimension from the
   exact posterior mean over the whole dataset, E |T - D*(y, sigma)|^2 / N, averaged over `--variance-rounds`
   batches: for the plain target it is the posterior's trace of covariance (the STF paper's measure of the target's
   variance, its Fig. 2); for STF, its variance plus its squared bias. Printed per sigma, with the ratio.
"""

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from bench_field_target import _proc_status_kib, alternate_times, cifar_like_data, floor_weights, two_product_floor
from machine import describe, load_average

from pfgm_diffusers import ideal_denoiser, sample_kernel_noise, stable_target
from pfgm_diffusers.data import DIGITS_PATH

MIB = 2**20
# The official form keeps two (B, L, N+1) tensors alive at once: the differences and their square, later the repeated
# reference and its weighted copy; float64 for finite D, float32 for D = infinity.
OFFICIAL_LIVE_TENSORS = 2
REFERENCE_CHUNK_BYTES = 256 * MIB


def official_bytes(D):
    return 4 if D is None else 8


def official_stable_target(perturbed, sigma, reference, D):
    """The official STF target: for finite D `EDMLoss.pfgmpp_target`, explicit (B, L, N+1) float64 differences and
    linear-space weights; for D = infinity `EDMLoss.stf_scores`, (B, L, N) float32 differences, a max-shifted
    softmax."""
    B, N = perturbed.shape[0], perturbed[0].numel()
    if D is None:
        y, x = perturbed.reshape(B, N), reference.reshape(reference.shape[0], N)
        logits = -((y[:, None] - x) ** 2).sum(-1) / (2 * sigma.float()[:, None] ** 2)  # (B, L) from (B, L, N)
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return (weights[:, :, None] * x.unsqueeze(0).repeat(B, 1, 1)).sum(1).reshape(perturbed.shape)
    r = sigma.double() * math.sqrt(D)
    y = torch.cat([perturbed.reshape(B, N), r[:, None].float()], dim=1).double()  # (B, N+1)
    x = torch.cat([reference.reshape(reference.shape[0], N), reference.new_zeros(reference.shape[0], 1)], 1).double()
    distance = ((y[:, None] - x) ** 2).sum(-1).sqrt()  # (B, L) from two (B, L, N+1) tensors
    weights = (distance.min(dim=1, keepdim=True).values / (distance + 1e-7)) ** (N + D)
    weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-7)
    target = x.unsqueeze(0).repeat(B, 1, 1)  # (B, L, N+1)
    return (weights[:, :, None] * target).sum(1)[:, :N].float().reshape(perturbed.shape)


def direct_target(perturbed, sigma, reference, D):
    """float64 reference: exact differences, log-space softmax, chunked over rows."""
    y = perturbed.reshape(perturbed.shape[0], -1).double()
    x = reference.reshape(reference.shape[0], -1).double()
    N, rows = y.shape[1], max(1, REFERENCE_CHUNK_BYTES // (8 * x.numel()))
    out = []
    for start in range(0, y.shape[0], rows):
        s = sigma[start : start + rows].double()[:, None]
        dist_sq = (y[start : start + rows, None] - x[None]).pow(2).sum(-1)  # (rows, L)
        log_w = -dist_sq / (2 * s**2) if D is None else -(N + D) / 2 * torch.log(dist_sq + s**2 * D)
        out.append(torch.softmax(log_w, 1) @ x)
    return torch.cat(out).reshape(perturbed.shape)


def timed_inputs(B, L, N, D):
    """B images perturbed from the first B of L CIFAR-like reference images, sigma drawn as in training."""
    generator = torch.Generator().manual_seed(0)
    reference = cifar_like_data(L, N, generator)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=generator))
    return reference[:B] + sample_kernel_noise((B, N), sigma, D, generator), sigma, reference


def variant_call(variant, perturbed, sigma, reference, D, rows=None):
    """A no-argument callable running `variant` on the inputs (all rows, or the first `rows`)."""
    if rows is not None:
        perturbed, sigma = perturbed[:rows], sigma[:rows]
    if variant == "target":
        return lambda: stable_target(perturbed, sigma, reference, D)
    if variant == "floor":
        weights = floor_weights(perturbed.shape[0], reference.shape[0], perturbed.device)
        return lambda: two_product_floor(perturbed, weights, reference)
    if variant == "official":
        return lambda: official_stable_target(perturbed, sigma, reference, D)
    raise ValueError(f"unknown variant {variant!r}")


def memory_child(args):
    """In the subprocess of `peak_memory`: prints the peak resident bytes of one call beyond its inputs."""
    inputs = timed_inputs(args.B, args.L, args.N, args.D)
    variant_call(args.memory_child, *inputs, args.D, min(args.rows, 2))()  # warm-up on two rows
    call = variant_call(args.memory_child, *inputs, args.D, args.rows)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak-RSS mark VmHWM drops to the current RSS
    call()
    print(json.dumps({"peak_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(variant, args, rows):
    command = [sys.executable, os.path.abspath(__file__), "--B", str(args.B), "--L", str(args.L), "--N", str(args.N)]
    command += ["--aug_dim", args.aug_dim, "--threads", str(args.threads), "--memory-child", variant]
    command += ["--rows", str(rows)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def official_rows(B, L, N, D):
    """The rows the official form can run at once: B, or fewer where its live tensors do not fit in 80% of RAM."""
    free = int(re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read()).group(1)) * 1024
    return max(1, min(B, int(0.8 * free) // (OFFICIAL_LIVE_TENSORS * official_bytes(D) * L * (N + 1))))


def time_and_memory(args):
    """Sections 2-4: timings, peak memory and accuracy on the timed input."""
    B, L, N, D = args.B, args.L, args.N, args.D
    inputs = timed_inputs(B, L, N, D)
    times = alternate_times(
        {v: variant_call(v, *inputs, D) for v in ("floor", "target")}, args.repeats, torch.device("cpu")
    )
    timing = {}
    for clock in ("wall", "cpu"):
        floor, target = times["floor"][clock], times["target"][clock]
        ratios = [t / f for f, t in zip(floor, target, strict=True)]
        timing[clock] = {
            "floor_s": statistics.median(floor),
            "target_s": statistics.median(target),
            "ratio_of_medians": statistics.median(target) / statistics.median(floor),
            "ratio_min_max": [min(ratios), max(ratios)],
        }
    memory = {v: peak_memory(v, args, B) for v in ("floor", "target")}
    expected = direct_target(*inputs, D)
    errors = {"target": (variant_call("target", *inputs, D)().double() - expected).abs().max().item()}
    official = {}
    if not args.no_official:
        rows = min(official_rows(B, L, N, D), args.official_rows)
        call = variant_call("official", *inputs, D, rows)
        output, wall, cpu = call(), [], []
        for _ in range(args.official_repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        official = {
            "rows": rows,
            "time_s": {"wall": statistics.median(wall) * B / rows, "cpu": statistics.median(cpu) * B / rows},
            "peak_memory_bytes": peak_memory("official", args, rows) * B / rows,
            "analytic_peak_bytes": OFFICIAL_LIVE_TENSORS * official_bytes(D) * B * L * (N + 1),
        }
        errors["official"] = (output.double() - expected[:rows]).abs().max().item()
    return {"timing": timing, "peak_memory_bytes": memory, "official": official, "max_abs_error": errors}


def training_variance(args):
    """Section 5: E |T - D*(y, sigma)|^2 / N of the plain and the STF target on the digits, per sigma."""
    images = torch.from_numpy(np.load(DIGITS_PATH)["images"]).float().div(127.5).sub(1).reshape(-1, 64)  # (1797, 64)
    generator = torch.Generator().manual_seed(5)
    rows = []
    for sigma in args.sigmas:
        plain, stf = 0.0, 0.0
        for _ in range(args.variance_rounds):
            order = torch.randperm(images.shape[0], generator=generator)
            reference = images[order[: args.variance_L]]  # the batch first, then L - B others
            clean = reference[: args.variance_B]
            perturbed = clean + sample_kernel_noise(clean.shape, sigma, args.D, generator)
            exact = ideal_denoiser(perturbed.double(), sigma, images.double(), args.D)  # (B, 64)
            target = stable_target(perturbed, sigma, reference, args.D).double()
            plain += (clean.double() - exact).pow(2).mean().item() / args.variance_rounds
            stf += (target - exact).pow(2).mean().item() / args.variance_rounds
        rows.append({"sigma": sigma, "plain": plain, "stf": stf, "ratio": stf / plain if plain > 0 else None})
    return rows


def print_report(results, args):
    print(f"command: {results['command']}")
    print(f"machine: {results['machine']}")
    print(f"1-minute load average: {results['load'][0]:.2f} before, {results['load'][1]:.2f} after the timings")
    print(
        f"B={args.B} L={args.L} N={args.N} D={'inf' if args.D is None else args.D}; floor = the two float32 products"
    )
    print(f"{'clock':>5s} {'floor ms':>9s} {'target ms':>10s} {'ratio':>6s} {'spread':>12s}")
    for clock, t in results["timing"].items():
        low, high = t["ratio_min_max"]
        print(
            f"{clock:>5s} {t['floor_s'] * 1e3:9.1f} {t['target_s'] * 1e3:10.1f} {t['ratio_of_medians']:6.2f} "
            f"{low:5.2f}-{high:<6.2f}"
        )
    memory = results["peak_memory_bytes"]
    print("peak memory beyond the inputs (MiB): " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in memory.items()))
    official = results["official"]
    if official:
        times = ", ".join(
            f"{clock} {official['time_s'][clock]:.1f} s ({official['time_s'][clock] / t['target_s']:.0f}x)"
            for clock, t in results["timing"].items()
        )
        form = "(B, L, N) float32" if args.D is None else "(B, L, N+1) float64"
        print(f"official {form} form: ran on {official['rows']} rows, scaled to {args.B}: {times}")
        print(
            f"  peak memory {official['peak_memory_bytes'] / MIB:.0f} MiB "
            f"({official['peak_memory_bytes'] / memory['target']:.0f}x stable_target's; analytic peak of two "
            f"such tensors {official['analytic_peak_bytes'] / MIB:.0f} MiB)"
        )
    print(
        "max |target - float64 direct form|: " + ", ".join(f"{k} {v:.1e}" for k, v in results["max_abs_error"].items())
    )
    print(
        f"\ntraining variance on the digits (N=64), B={args.variance_B}, reference L={args.variance_L}, "
        f"{args.variance_rounds} batches per sigma: E|T - D*|^2 / N"
    )
    print(f"{'sigma':>7s} {'plain':>10s} {'STF':>10s} {'STF/plain':>10s}")
    for row in results["variance"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['sigma']:7.3f} {row['plain']:10.3e} {row['stf']:10.3e} {ratio:>10s}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=128, help="perturbed images (the training batch)")
    parser.add_argument("--L", type=int, default=4096, help="the reference batch (official default --rbatch 4096)")
    parser.add_argument("--N", type=int, default=3072, help="values per image (3x32x32 for CIFAR-10)")
    parser.add_argument("--aug_dim", default="128", help="D, or 'inf' for EDM")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=11, help="alternate timed calls of the floor and the target")
    parser.add_argument("--no-official", action="store_true", help="skip the official form")
    parser.add_argument("--official-rows", type=int, default=8, help="at most this many rows of the official form")
    parser.add_argument("--official-repeats", type=int, default=3, help="timed calls of the official form")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0])
    parser.add_argument("--variance-B", type=int, default=128, help="training batch of the variance figure")
    parser.add_argument("--variance-L", type=int, default=512, help="reference batch of the variance figure")
    parser.add_argument("--variance-rounds", type=int, default=8, help="batches per sigma")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.D = None if args.aug_dim == "inf" else int(args.aug_dim)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return memory_child(args)
    load_before = load_average()
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_stable_target.py"] + sys.argv[1:]),
        "machine": describe(),
    }
    results |= time_and_memory(args)
    results["load"] = [load_before, load_average()]
    results["variance"] = training_variance(args)
    print_report(results, args)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
