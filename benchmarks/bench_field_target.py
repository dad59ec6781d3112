"""Benchmark of the PFGM training target `poisson_field_target` (math.md §3, PFGM Algorithm 1). A script, not a test.

    python benchmarks/bench_field_target.py --threads 1 --json field_target_1thread.json   # B=128, L=2048, N=3072
    python benchmarks/bench_field_target.py --threads 2 --json field_target_2threads.json
    python benchmarks/bench_field_target.py --device cuda

One run prints (and writes with --json):

1. The machine: CPU model (from /proc/cpuinfo), torch's thread count (`--threads`, default 1) and the OpenMP/MKL
   variables that are set, the 1-minute load average before the timings, after them and at the end. Other processes
   on the cores slow the calls unevenly; rerun when the load was above ~0.3 for the cores in use. With more threads
   than idle cores, OpenMP's default spin-waiting at every parallel op's barrier can cost a time slice per op: the
   target's few dozen (B, L) ops then take 10x longer while the floor's two products do not
   (OMP_WAIT_POLICY=PASSIVE avoids it).
2. Time, on two inputs of B perturbed points against L charges of N values:
   (a) CIFAR-like data in [-1, 1] perturbed by `pfgm_perturb` (the small batch is the first rows of the large one, as
       in the official code; z from 4e-4 to 80 at the defaults);
   (g) Gaussian data far from the queries: charges N(0, I_N) and independent queries N(0, I_N), ~sqrt(2N) = 78 from
       every charge, z log-uniform in [1e-2, 10]. The weights span hundreds of orders of magnitude: the case where
       float32 weights underflowed to denormal numbers, whose arithmetic is ~30-100x slower on x86.
   Each against the two-product floor: the two plain float32 products any matrix-product form of the target needs,
   (B, N) @ (N, L) and (B, L) @ (L, N). After a warm-up call of each, floor and target are called alternately
   `--repeats` times. Printed, for the wall clock and for the process's CPU time: the median time of each, the
   ratio of the medians, and the spread: the smallest and largest ratio of a target call to the floor call just
   before it. At one thread the CPU time barely moves with the load of other processes (it leaves out the time the
   process waits for a core), so its ratio is the figure to compare on a shared machine.
3. Peak memory of one call beyond its inputs (its outputs included), in MiB, for the floor, the target on both inputs
   and the official form.
   - CUDA: torch.cuda.max_memory_allocated() over the call minus torch.cuda.memory_allocated() before it.
   - CPU: each variant runs in a fresh subprocess started with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every
     buffer of 64 KiB or more with its own mmap and unmaps it on free, so the resident set follows the live tensors
     and no allocator cache hides a reuse. The subprocess builds the inputs, makes one warm-up call, resets the
     kernel's peak-RSS mark (`5 > /proc/self/clear_refs`, Linux >= 4.0), makes one call and reports
     VmHWM - VmRSS(before the call) from /proc/self/status. Resolution: a page; buffers under 64 KiB and library pages
     touched for the first time are included, noise of well under 1 MiB here.
4. The official explicit-difference form (`official_field_target` below: a (B, L, N+1) difference tensor and
   linear-space weights, unchunked, as in the official PFGM `losses.py`) on input (a): median of `--official-repeats`
   calls after a warm-up on two rows, and its peak memory. If two (B, L, N+1) float32 tensors need more than 80% of
   the free memory (CPU: MemAvailable; CUDA: free device memory), it runs on the first B' rows that fit and its time
   and memory are scaled by B / B' (both are linear in B); the output says so. `--no-official` skips it.
5. Accuracy: the largest row-relative error |v_i - v_ref_i| / |v_ref_i| (over the N+1 components of a row) against a
   float64 reference with exact differences and a log-space softmax, for `poisson_field_target`, the official form
   and a plain float32 expansion (|y|^2 + |x|^2 - 2 y.x in float32, then a log-space softmax), on (a) (the rows the
   official form ran on, split at z = 1), on the first `--accuracy-rows` rows of (g), and on
   (b) near-ties: queries almost equidistant from two close charges that sit on a large common offset, so that the
       norms (about 30) are large next to the distances (about 0.08); there the float32 expansion loses the tie;
   (c) near-duplicates: 64 charges 1e-3 apart per pixel around a centre, queries 0.01 from it, z = 1e-4; the
       expansion's rounding error is larger than the gaps between their squared distances.
   A last line checks the official reference values of math.md §3 (N = 2).
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

import torch
import torch.nn.functional as F
from machine import cpu_model

from pfgm_diffusers import pfgm_perturb, poisson_field_target

MIB = 2**20
# The official form keeps two (B, L, N+1) float32 tensors alive at once: (y - x) and its square, later (-diff) and
# coeff * diff.
OFFICIAL_LIVE_TENSORS = 2
# Bytes of float64 differences the reference builds per chunk of rows.
REFERENCE_CHUNK_BYTES = 256 * MIB
# Environment variables that change how the thread pools wait and split work; printed when set.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
# The two timed inputs.
INPUT_LABELS = {"cifar": "(a) CIFAR-like, pfgm_perturb", "gaussian": "(g) Gaussian, far from the queries"}


def official_field_target(samples, z, data, gamma=5.0):
    """The official PFGM target: explicit (B, L, N+1) differences, linear-space weights (min_j d_ij / d_ij)^(N+1)."""
    batch_size, N = samples.shape[0], samples[0].numel()
    y_vec = torch.cat([samples.reshape(batch_size, N), z[:, None]], dim=1)  # (B, N+1)
    x_vec = torch.cat([data.reshape(data.shape[0], N), data.new_zeros(data.shape[0], 1)], dim=1)  # (L, N+1)
    distance = ((y_vec[:, None] - x_vec) ** 2).sum(-1).sqrt()  # (B, L); builds two (B, L, N+1) tensors
    weights = (distance.min(dim=1, keepdim=True).values / (distance + 1e-7)) ** (N + 1)
    weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-7)
    diff = -(y_vec[:, None] - x_vec)  # (B, L, N+1) again
    g = (weights[:, :, None] * diff).sum(1)  # (B, N+1)
    g = g / (g.norm(dim=1, keepdim=True) + gamma) * math.sqrt(N)
    return g[:, :N].reshape(samples.shape), g[:, N]


def two_product_floor(samples, weights, data):
    """The two float32 products of the sizes the target needs: (B, N) @ (N, L) and (B, L) @ (L, N)."""
    return samples @ data.T, weights @ data


def float32_expansion_target(samples, z, data, gamma=5.0):
    """The target from the plain float32 expansion |y|^2 + |x|^2 - 2 y.x and a float32 log-space softmax."""
    batch_size, N = samples.shape[0], samples[0].numel()
    y, x = samples.reshape(batch_size, N), data.reshape(data.shape[0], N)
    dist_sq = (y.pow(2).sum(1)[:, None] + x.pow(2).sum(1)[None, :] - 2 * y @ x.T).clamp(min=0) + z[:, None] ** 2
    weights = torch.softmax(-(N + 1) / 2 * torch.log(dist_sq), dim=1)  # (B, L)
    g = torch.cat([weights @ x - y, -z[:, None]], dim=1)  # (B, N+1)
    g = g / (g.norm(dim=1, keepdim=True) + gamma) * math.sqrt(N)
    return g[:, :N].reshape(samples.shape), g[:, N]


def reference_field_target(samples, z, data, gamma=5.0):
    """float64 reference: exact differences x_j - y_i, log-space softmax; chunked over rows (only a reference)."""
    batch_size, N = samples.shape[0], samples[0].numel()
    y = samples.reshape(batch_size, N).double()
    x = data.reshape(data.shape[0], N).double()
    z = z.double()
    rows = max(1, REFERENCE_CHUNK_BYTES // (8 * x.numel()))
    g_x = []
    for start in range(0, batch_size, rows):
        diff = x[None] - y[start : start + rows, None]  # (rows, L, N), exact: float32 inputs, float64 differences
        dist_sq = diff.pow(2).sum(-1) + z[start : start + rows, None] ** 2  # (rows, L)
        weights = torch.softmax(-(N + 1) / 2 * torch.log(dist_sq), dim=1)
        g_x.append(torch.bmm(weights[:, None, :], diff)[:, 0])  # (rows, N)
    g = torch.cat([torch.cat(g_x), -z[:, None]], dim=1)  # (B, N+1)
    return g / (g.norm(dim=1, keepdim=True) + gamma) * math.sqrt(N)


def row_relative_error(target, reference):
    """|v_i - v_ref_i| / |v_ref_i| per row, over the N+1 components; `target` is a (target_x, target_z) pair."""
    target_x, target_z = target
    v = torch.cat([target_x.reshape(target_x.shape[0], -1), target_z.reshape(-1, 1)], dim=1).double()
    return (v - reference).norm(dim=1) / reference.norm(dim=1)


def cifar_like_data(L, N, generator):
    """(L, N) float32 in [-1, 1]: smooth random signals (linear interpolation of N/16 values) plus a little noise."""
    coarse = torch.rand(L, 1, max(2, N // 16), generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=N, mode="linear", align_corners=True)[:, 0]
    return (smooth + 0.1 * torch.randn(L, N, generator=generator)).clamp(-1, 1)


def cifar_inputs(B, L, N):
    """Input (a): B points perturbed from the first B of L CIFAR-like charges, as in the official code."""
    generator = torch.Generator().manual_seed(0)
    data = cifar_like_data(L, N, generator)
    samples, z = pfgm_perturb(data[:B], generator=generator)  # (B, N), (B,)
    return samples, z, data


def gaussian_inputs(B, L, N):
    """Input (g): L charges N(0, I_N), B independent queries N(0, I_N), z log-uniform in [1e-2, 10]."""
    generator = torch.Generator().manual_seed(2)
    data = torch.randn(L, N, generator=generator)
    samples = torch.randn(B, N, generator=generator)
    z = torch.exp(torch.empty(B).uniform_(math.log(1e-2), math.log(10.0), generator=generator))
    return samples, z, data


def timed_inputs(name, B, L, N, device):
    samples, z, data = {"cifar": cifar_inputs, "gaussian": gaussian_inputs}[name](B, L, N)
    return samples.to(device), z.to(device), data.to(device)


def floor_weights(B, L, device):
    """A (B, L) float32 weight matrix (rows summing to 1) for the floor's second product."""
    generator = torch.Generator().manual_seed(3)
    return torch.softmax(torch.randn(B, L, generator=generator), dim=1).to(device)


def near_tie_inputs(B, L, N):
    """Case (b): B queries almost equidistant from two charges 0.157 apart, all on a common offset of norm about 30.

    The other L - 2 charges are about 2.8 away and carry no weight. Query i sits at the midpoint of the pair, moved by
    t_i along their difference so that the log-ratio of the two weights, about 4 (N+1) t_i, spans [-3, 3]; z_i is
    log-uniform in [1e-3, 5e-2], below the distance to the pair (0.078).
    """
    generator = torch.Generator().manual_seed(1)
    offset = 0.5 + 0.4 * (torch.rand(N, generator=generator) * 2 - 1)  # (N,), |offset| ~ 30
    data = (offset + 0.05 * torch.randn(L, N, generator=generator)).clamp(-1, 1)
    data[:2] = offset + 0.002 * torch.randn(2, N, generator=generator)
    midpoint, delta = (data[0] + data[1]) / 2, data[0] - data[1]
    t = (torch.rand(B, generator=generator) * 2 - 1) * 3 / (4 * (N + 1))
    samples = midpoint + t[:, None] * delta  # (B, N), float32: the reference sees these rounded values
    z = torch.exp(torch.empty(B).uniform_(math.log(1e-3), math.log(5e-2), generator=generator))
    return samples, z, data


def near_duplicate_inputs(B, L, N):
    """Case (c): 64 charges 1e-3 apart per pixel around a centre, the rest uniform in [-1, 1]^N; B queries 0.01 from
    the centre, z = 1e-4. The expansion's rounding error (~eps |x|^2 ~ 1e-4) exceeds the gaps between the duplicates'
    squared distances (~3e-3 +- 1e-4), so it cannot tell which of them is the nearest: all must be exact."""
    generator = torch.Generator().manual_seed(4)
    centre = torch.rand(N, generator=generator) * 2 - 1
    data = torch.rand(L, N, generator=generator) * 2 - 1
    data[:64] = centre + 1e-3 * torch.randn(64, N, generator=generator)
    direction = torch.randn(B, N, generator=generator)
    samples = centre + 0.01 * direction / direction.norm(dim=1, keepdim=True)
    return samples, torch.full((B,), 1e-4), data


def official_batch(B, L, N, device):
    """The number of rows the official form can run at once: B, or fewer where 2 (B, L, N+1) tensors do not fit."""
    row_bytes = OFFICIAL_LIVE_TENSORS * L * (N + 1) * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = int(re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read()).group(1)) * 1024
    return max(1, min(B, int(0.8 * free) // row_bytes))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_times(calls, repeats, device):
    """Wall-clock and process CPU seconds of each call of each callable: one warm-up call each, then `repeats` rounds
    calling them in turn. Returns {name: {"wall": [...], "cpu": [...]}}."""
    for call in calls.values():
        call()
    times = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def variant_call(variant, samples, z, data, rows=None):
    """A no-argument callable that runs `variant` on the inputs (all rows, or the first `rows`)."""
    if rows is not None:
        samples, z = samples[:rows], z[:rows]
    if variant == "target":
        return lambda: poisson_field_target(samples, z, data)
    if variant == "floor":
        weights = floor_weights(samples.shape[0], data.shape[0], samples.device)
        return lambda: two_product_floor(samples, weights, data)
    if variant == "official":
        return lambda: official_field_target(samples, z, data)
    raise ValueError(f"unknown variant {variant!r}")


def _proc_status_kib(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def cpu_peak_memory_child(args):
    """Runs in the subprocess of `peak_memory` on the CPU: prints the peak extra resident bytes of one call."""
    torch.set_num_threads(args.threads)
    samples, z, data = timed_inputs(args.memory_input, args.B, args.L, args.N, torch.device("cpu"))
    rows = args.rows if args.rows < args.B else None
    # The official form is warmed up on two rows (same kernels; a full call takes seconds), the others in full.
    variant_call(args.memory_child, samples, z, data, 2 if args.memory_child == "official" else rows)()
    call = variant_call(args.memory_child, samples, z, data, rows)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak-RSS mark VmHWM drops to the current RSS
    call()
    print(json.dumps({"peak_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(variant, input_name, args, device, rows=None):
    """Peak bytes one call of `variant` needs beyond its inputs (see the module docstring for the method)."""
    if device.type == "cuda":
        call = variant_call(variant, *timed_inputs(input_name, args.B, args.L, args.N, device), rows)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    command = [sys.executable, os.path.abspath(__file__), "--B", str(args.B), "--L", str(args.L), "--N", str(args.N)]
    command += ["--threads", str(args.threads), "--memory-child", variant, "--memory-input", input_name]
    command += ["--rows", str(args.B if rows is None else rows)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def max_errors(case, samples, z, data, outputs, groups=None):
    """Max row-relative errors of each output against the float64 reference, per group of rows.

    `outputs` maps a name to a (target_x, target_z) pair; `groups` maps a label to a boolean row mask (default: all).
    """
    reference = reference_field_target(samples.cpu(), z.cpu(), data.cpu())
    errors = {
        name: row_relative_error(tuple(t.cpu() for t in out), reference)
        for name, out in outputs.items()
        if out is not None
    }
    z = z.cpu()
    rows = []
    for label, mask in (groups or {case: torch.ones_like(z, dtype=torch.bool)}).items():
        if mask.any():
            worst = {name: errors[name][mask].max().item() if name in errors else None for name in outputs}
            z_range = [z[mask].min().item(), z[mask].max().item()]
            rows.append({"case": label, "rows": int(mask.sum()), "z_range": z_range} | worst)
    return rows


def official_values_error():
    """Largest absolute deviation of `poisson_field_target` from the official reference values of math.md §3 (N=2)."""
    data = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    cases = [  # (query (x1, x2, z), gamma, official target (v1, v2, v_z)), rounded to 6 decimals
        ((0.3, 0.2, 0.5), 5.0, (0.021620, 0.041608, -0.127808)),
        ((0.3, 0.2, 0.5), 0.0, (0.224586, 0.432231, -1.327682)),
        ((0.0, 0.0, 1.0), 5.0, (0.0, 0.077865, -0.233596)),
    ]
    worst = 0.0
    for query, gamma, expected in cases:
        target_x, target_z = poisson_field_target(torch.tensor([query[:2]]), torch.tensor([query[2]]), data, gamma)
        got = torch.cat([target_x[0], target_z]).double()
        worst = max(worst, (got - torch.tensor(expected, dtype=torch.float64)).abs().max().item())
    return worst


def time_floor_and_target(input_name, args, device):
    """Alternate floor and target calls on one input: per clock, the medians, the ratio of the medians and the
    min-max of the ratio of each target call to the floor call before it."""
    samples, z, data = timed_inputs(input_name, args.B, args.L, args.N, device)
    calls = {name: variant_call(name, samples, z, data) for name in ("floor", "target")}
    times = alternate_times(calls, args.repeats, device)
    result = {}
    for clock in ("wall", "cpu"):
        floor, target = times["floor"][clock], times["target"][clock]
        ratios = [t / f for f, t in zip(floor, target, strict=True)]
        medians = {"floor": statistics.median(floor), "target": statistics.median(target)}
        result[clock] = {
            "median_s": medians,
            "ratio_of_medians": medians["target"] / medians["floor"],
            "ratio_min_max": [min(ratios), max(ratios)],
            "times_s": {"floor": floor, "target": target},
        }
    return result


def time_official(args, device):
    """The official form on input (a): (median seconds, scaled to B rows; the rows it ran on; its output)."""
    samples, z, data = timed_inputs("cifar", args.B, args.L, args.N, device)
    rows = official_batch(args.B, args.L, args.N, device)
    variant_call("official", samples, z, data, 2)()  # warm-up
    call = variant_call("official", samples, z, data, rows)
    official_times = []
    for _ in range(args.official_repeats):
        synchronize(device)
        start = time.perf_counter()
        output = call()
        synchronize(device)
        official_times.append(time.perf_counter() - start)
    return statistics.median(official_times) * args.B / rows, rows, output


def accuracy_rows(args, device, official_rows, official_output):
    """The accuracy table: cases (a), (g), (b), (c) as in the module docstring."""
    B, L, N = args.B, args.L, args.N
    with_official = official_output is not None
    samples, z, data = timed_inputs("cifar", B, L, N, device)
    rows = slice(0, official_rows if with_official else B)
    outputs = {
        "target": poisson_field_target(samples[rows], z[rows], data),
        "official": official_output,
        "float32_expansion": float32_expansion_target(samples[rows], z[rows], data),
    }
    case = INPUT_LABELS["cifar"]
    groups = {f"{case}, z < 1": z[rows].cpu() < 1, f"{case}, z >= 1": z[rows].cpu() >= 1}
    table = max_errors(case, samples[rows], z[rows], data, outputs, groups)
    count = min(B, args.accuracy_rows)
    samples, z, data = timed_inputs("gaussian", B, L, N, device)
    other_cases = {
        INPUT_LABELS["gaussian"]: (samples[:count], z[:count], data),
        "(b) near-tie, |offset| ~ 30": tuple(t.to(device) for t in near_tie_inputs(count, L, N)),
        "(c) near-duplicates, 64 charges": tuple(t.to(device) for t in near_duplicate_inputs(count, L, N)),
    }
    for case, (samples, z, data) in other_cases.items():
        outputs = {
            "target": poisson_field_target(samples, z, data),
            "official": official_field_target(samples, z, data) if with_official else None,
            "float32_expansion": float32_expansion_target(samples, z, data),
        }
        table += max_errors(case, samples, z, data, outputs)
    return table


def measure(args, device):
    """All the figures of one run, as a JSON-ready dict."""
    B, L, N = args.B, args.L, args.N
    load = {"before": os.getloadavg()[0]}
    timing = {name: time_floor_and_target(name, args, device) for name in INPUT_LABELS}
    load["after_timing"] = os.getloadavg()[0]
    memory = {"floor": peak_memory("floor", "cifar", args, device)}
    memory |= {f"target_{name}": peak_memory("target", name, args, device) for name in INPUT_LABELS}
    official = {}
    if not args.no_official:
        seconds, rows, output = time_official(args, device)
        official = {
            "time_s": seconds,
            "rows": rows,
            "peak_memory_bytes": peak_memory("official", "cifar", args, device, rows) * B / rows,
            "analytic_peak_bytes": OFFICIAL_LIVE_TENSORS * B * L * (N + 1) * 4,
        }
    accuracy = accuracy_rows(args, device, official.get("rows", B), output if official else None)
    load["end"] = os.getloadavg()[0]
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_field_target.py"] + sys.argv[1:]),
        "cpu": cpu_model(),
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "environment": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
        "torch": torch.__version__,
        "load_average_1min": load,
        "sizes": {"B": B, "L": L, "N": N},
        "repeats": args.repeats,
        "timing": timing,
        "peak_memory_bytes": memory,
        "official": official,
        "accuracy_max_row_relative_error": accuracy,
        "official_values_max_abs_deviation": official_values_error(),
    }


def print_report(results):
    """The readable table of `measure`'s results."""
    B, L, N = (results["sizes"][k] for k in "BLN")
    load = results["load_average_1min"]
    print(f"command: {results['command']}")
    environment = " ".join(f"{k}={v}" for k, v in results["environment"].items()) or "no OMP_*/MKL_* variables set"
    print(
        f"CPU: {results['cpu']}; device: {results['device']}; torch {results['torch']}, {results['threads']} threads "
        f"({environment})"
    )
    print(
        f"1-minute load average: {load['before']:.2f} before the timings, {load['after_timing']:.2f} after them, "
        f"{load['end']:.2f} at the end (rerun if above ~0.3: other processes then compete for the cores)"
    )
    print(f"B={B} L={L} N={N}; floor = the two float32 products (B, N) @ (N, L) and (B, L) @ (L, N)")
    print(
        f"\ntime: {results['repeats']} alternate floor/target calls after a warm-up; medians, their ratio, and the "
        "min-max of the ratio of each target call to the floor call before it"
    )
    print(f"{'input':38s} {'clock':>5s} {'floor ms':>9s} {'target ms':>10s} {'ratio':>6s} {'spread':>12s}")
    for name, label in INPUT_LABELS.items():
        for clock in ("wall", "cpu"):
            t = results["timing"][name][clock]
            low, high = t["ratio_min_max"]
            print(
                f"{label if clock == 'wall' else '':38s} {clock:>5s} {t['median_s']['floor'] * 1e3:9.1f} "
                f"{t['median_s']['target'] * 1e3:10.1f} {t['ratio_of_medians']:6.2f} {low:5.2f}-{high:<6.2f}"
            )
    print(
        "wall: elapsed time, what training waits for. cpu: this process's CPU time (all its threads); at 1 thread it "
        "barely moves with other processes' load, at more threads it adds up the threads' time."
    )
    memory = results["peak_memory_bytes"]
    print("\npeak memory beyond the inputs (MiB): " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in memory.items()))
    official = results["official"]
    if official:
        if official["rows"] < B:
            print(
                f"official form: two (B, L, N+1) float32 tensors do not fit in 80% of the free memory; it ran on the "
                f"first {official['rows']} rows, its time and memory are scaled by {B}/{official['rows']}"
            )
        target = results["timing"]["cifar"]["wall"]["median_s"]["target"]
        print(
            f"official (B, L, N+1) form on (a): {official['time_s'] * 1e3:.1f} ms "
            f"({official['time_s'] / target:.0f}x poisson_field_target), "
            f"{official['peak_memory_bytes'] / MIB:.1f} MiB "
            f"({official['peak_memory_bytes'] / memory['target_cifar']:.0f}x; analytic peak, two B*L*(N+1) float32 "
            f"tensors: {official['analytic_peak_bytes'] / MIB:.0f} MiB)"
        )
    print(
        "\naccuracy: max over rows of |v - v_ref| / |v_ref|, v_ref in float64 (exact differences, log-space softmax)"
    )
    print(f"{'case':42s} {'rows':>5s} {'poisson_field_target':>21s} {'official fp32':>14s} {'fp32 expansion':>15s}")
    for row in results["accuracy_max_row_relative_error"]:
        official_error = f"{row['official']:14.2e}" if row["official"] is not None else f"{'-':>14s}"
        print(
            f"{row['case']:42s} {row['rows']:5d} {row['target']:21.2e} {official_error} "
            f"{row['float32_expansion']:15.2e}   z in [{row['z_range'][0]:.1e}, {row['z_range'][1]:.1e}]"
        )
    print(
        f"math.md §3 official values (N=2): largest deviation of poisson_field_target "
        f"{results['official_values_max_abs_deviation']:.1e} (values given to 6 decimals)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=128, help="perturbed points (the small batch)")
    parser.add_argument("--L", type=int, default=2048, help="charges (the large batch)")
    parser.add_argument("--N", type=int, default=3072, help="values per point (3x32x32 = 3072 for CIFAR-10)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the CPU")
    parser.add_argument("--repeats", type=int, default=15, help="alternate timed calls of the floor and the target")
    parser.add_argument("--official-repeats", type=int, default=3, help="timed calls of the official form")
    parser.add_argument("--no-official", action="store_true", help="skip the official form (seconds per call)")
    parser.add_argument("--accuracy-rows", type=int, default=32, help="rows of cases (g), (b), (c) checked")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-input", default="cifar", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return cpu_peak_memory_child(args)
    results = measure(args, torch.device(args.device))
    print_report(results)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
