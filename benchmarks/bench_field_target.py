"""Benchmark of the PFGM training target `poisson_field_target` (math.md §3, PFGM Algorithm 1). A script, not a test.

    python benchmarks/bench_field_target.py                     # B=128, L=2048, N=3072 on the CPU
    python benchmarks/bench_field_target.py --device cuda --json field_target.json

One run reports, for B perturbed points against L charges of N values each:

1. the time and peak memory of `poisson_field_target`;
2. the same for the two-product floor, the two plain float32 products that any matrix-product form of the target needs,
   (B, N) @ (N, L) and (B, L) @ (L, N), and the ratios target / floor (the core issue asks for at most 1.5x);
3. the same for the official explicit-difference form (`official_field_target` below: a (B, L, N+1) difference
   tensor and linear-space weights, unchunked, as in the official PFGM `losses.py`), and the ratios target / official;
4. accuracy: the largest row-relative error |v_i - v_ref_i| / |v_ref_i| (over the N+1 components of a row) against a
   float64 reference with exact differences and a log-space softmax, for `poisson_field_target`, the official form and
   a plain float32 expansion (|y|^2 + |x|^2 - 2 y.x in float32, then a log-space softmax), on
   (a) CIFAR-like data in [-1, 1] perturbed by `pfgm_perturb` (the timed inputs; z from 4e-4 to 80 at the defaults),
   (b) near-ties: queries almost equidistant from two close charges that sit on a large common offset, so that the
       norms (about 30) are large next to the distances (about 0.08); there the float32 expansion loses the tie.
   A last line checks the official reference values of math.md §3 (N = 2).

Time: the median over `--repeats` calls after one warm-up call. The floor and the target are timed alternately, call by
call, so that load from other processes hits both alike. The official form takes seconds per call on a CPU; it gets
`--official-repeats` calls after a warm-up on two rows.

Peak memory: what one call needs beyond its inputs (its outputs included), in MiB.
- CUDA: torch.cuda.max_memory_allocated() over the call minus torch.cuda.memory_allocated() before it.
- CPU: each variant runs in a fresh subprocess started with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every
  buffer of 64 KiB or more with its own mmap and unmaps it on free, so the resident set follows the live tensors and
  no allocator cache hides a reuse. The subprocess builds the inputs, makes one warm-up call (libraries loaded, thread
  pools started), resets the kernel's peak-RSS mark (`5 > /proc/self/clear_refs`, Linux >= 4.0), makes one call and
  reports VmHWM - VmRSS(before the call) from /proc/self/status. Resolution: a page; buffers under 64 KiB and pages of
  library code touched for the first time are included, which is noise of well under 1 MiB here.

If the official form would need more than 80% of the free memory (CPU: MemAvailable; CUDA: free device memory), it is
run on the first B' rows that fit and its time and memory are scaled by B / B' (both are linear in B); the table says
so. Its accuracy is then measured on those rows.
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

from pfgm_diffusers import pfgm_perturb, poisson_field_target

MIB = 2**20
# The official form keeps two (B, L, N+1) float32 tensors alive at once: (y - x) and its square, later (-diff) and
# coeff * diff.
OFFICIAL_LIVE_TENSORS = 2
# Queries in the near-tie case (b); the official form costs about as much per row there as in the timing run.
TIE_QUERIES = 32
# Bytes of float64 differences the reference builds per chunk of rows.
REFERENCE_CHUNK_BYTES = 256 * MIB


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


def timing_inputs(B, L, N, device):
    """The timed inputs, case (a): B points perturbed from the first B of L CIFAR-like charges (the small batch is the
    first rows of the large one, as in the official code), and a (B, L) weight matrix for the floor's second product.
    """
    generator = torch.Generator().manual_seed(0)
    data = cifar_like_data(L, N, generator)
    samples, z = pfgm_perturb(data[:B], generator=generator)  # (B, N), (B,)
    weights = torch.softmax(torch.randn(B, L, generator=generator), dim=1)
    return samples.to(device), z.to(device), data.to(device), weights.to(device)


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


def median_times(calls, repeats, device):
    """Median seconds per call of each callable, after a warm-up; the callables are timed alternately, call by call."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def variant_call(variant, inputs, rows=None):
    """A no-argument callable that runs `variant` on `inputs` (all rows, or the first `rows`)."""
    samples, z, data, weights = inputs
    if rows is not None:
        samples, z, weights = samples[:rows], z[:rows], weights[:rows]
    if variant == "target":
        return lambda: poisson_field_target(samples, z, data)
    if variant == "floor":
        return lambda: two_product_floor(samples, weights, data)
    if variant == "official":
        return lambda: official_field_target(samples, z, data)
    raise ValueError(f"unknown variant {variant!r}")


def _proc_status_kib(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def cpu_peak_memory_child(args):
    """Runs in the subprocess of `peak_memory` on the CPU: prints the peak extra resident bytes of one call."""
    inputs = timing_inputs(args.B, args.L, args.N, torch.device("cpu"))
    rows = args.rows if args.rows < args.B else None
    # The official form is warmed up on two rows (same kernels; a full call takes seconds), the others in full.
    variant_call(args.memory_child, inputs, 2 if args.memory_child == "official" else rows)()
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak-RSS mark VmHWM drops to the current RSS
    variant_call(args.memory_child, inputs, rows)()
    print(json.dumps({"peak_bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(variant, inputs, args, device, rows=None):
    """Peak bytes one call of `variant` needs beyond its inputs (see the module docstring for the method)."""
    if device.type == "cuda":
        call = variant_call(variant, inputs, rows)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    command = [sys.executable, os.path.abspath(__file__), "--B", str(args.B), "--L", str(args.L), "--N", str(args.N)]
    command += ["--memory-child", variant, "--rows", str(args.B if rows is None else rows)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def max_errors(case, samples, z, data, outputs, groups=None):
    """Max row-relative errors of each output against the float64 reference, per group of rows.

    `outputs` maps a name to a (target_x, target_z) pair; `groups` maps a label to a boolean row mask (default: all).
    """
    reference = reference_field_target(samples.cpu(), z.cpu(), data.cpu())
    errors = {name: row_relative_error(tuple(t.cpu() for t in out), reference) for name, out in outputs.items()}
    z = z.cpu()
    rows = []
    for label, mask in (groups or {case: torch.ones_like(z, dtype=torch.bool)}).items():
        if mask.any():
            worst = {name: error[mask].max().item() for name, error in errors.items()}
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


def measure(args, device):
    """All the figures of one run, as a JSON-ready dict."""
    B, L, N = args.B, args.L, args.N
    load_start = os.getloadavg()[0]
    inputs = timing_inputs(B, L, N, device)
    samples, z, data, _ = inputs
    times = median_times({name: variant_call(name, inputs) for name in ("floor", "target")}, args.repeats, device)
    memory = {name: peak_memory(name, inputs, args, device) for name in ("floor", "target")}

    # The official form: all B rows if two (B, L, N+1) tensors fit, else the first b_official rows, scaled to B.
    b_official = official_batch(B, L, N, device)
    official = variant_call("official", inputs, b_official)
    variant_call("official", inputs, 2)()  # warm-up
    official_times = []
    for _ in range(args.official_repeats):
        synchronize(device)
        start = time.perf_counter()
        official_out = official()
        synchronize(device)
        official_times.append(time.perf_counter() - start)
    times["official"] = statistics.median(official_times) * B / b_official
    memory["official"] = peak_memory("official", inputs, args, device, b_official) * B / b_official
    official_analytic = OFFICIAL_LIVE_TENSORS * B * L * (N + 1) * 4

    # Accuracy, (a): the timed inputs (the rows the official form ran on), split at z = 1; (b): near-ties.
    rows = slice(0, b_official)
    outputs = {
        "target": poisson_field_target(samples[rows], z[rows], data),
        "official": official_out,
        "float32_expansion": float32_expansion_target(samples[rows], z[rows], data),
    }
    case = "(a) CIFAR-like, pfgm_perturb"
    groups = {f"{case}, z < 1": z[rows].cpu() < 1, f"{case}, z >= 1": z[rows].cpu() >= 1}
    accuracy = max_errors(case, samples[rows], z[rows], data, outputs, groups)
    tie_samples, tie_z, tie_data = (t.to(device) for t in near_tie_inputs(min(B, TIE_QUERIES), L, N))
    outputs = {
        "target": poisson_field_target(tie_samples, tie_z, tie_data),
        "official": official_field_target(tie_samples, tie_z, tie_data),
        "float32_expansion": float32_expansion_target(tie_samples, tie_z, tie_data),
    }
    accuracy += max_errors("(b) near-tie, |offset| ~ 30", tie_samples, tie_z, tie_data, outputs)

    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_field_target.py"] + sys.argv[1:]),
        "torch": torch.__version__,
        "device": device.type,
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "sizes": {"B": B, "L": L, "N": N},
        "repeats": args.repeats,
        "official_repeats": args.official_repeats,
        "official_rows": b_official,
        "time_s": times,
        "peak_memory_bytes": memory,
        "official_analytic_peak_bytes": official_analytic,
        "accuracy_max_row_relative_error": accuracy,
        "official_values_max_abs_deviation": official_values_error(),
    }


def print_report(results):
    """The readable table of `measure`'s results."""
    B, times, memory = results["sizes"]["B"], results["time_s"], results["peak_memory_bytes"]
    print(f"command: {results['command']}")
    print(
        f"torch {results['torch']}, {results['device']}, {results['threads']}; B={B} L={results['sizes']['L']} "
        f"N={results['sizes']['N']}"
    )
    print(
        f"load average (1 min) at start and end: {results['load_average_start_end'][0]:.2f}, "
        f"{results['load_average_start_end'][1]:.2f} on {results['cpus']} CPUs"
    )
    print(
        f"time: median of {results['repeats']} calls after a warm-up (floor and target alternately); official form: "
        f"median of {results['official_repeats']} calls"
    )
    if results["official_rows"] < B:
        print(
            f"official form: two (B, L, N+1) float32 tensors do not fit in 80% of the free memory; it ran on the "
            f"first {results['official_rows']} rows, its time and memory are scaled by {B}/{results['official_rows']}"
        )
    print(f"\n{'variant':34s} {'time ms':>10s} {'x floor':>9s} {'peak MiB':>10s} {'x floor':>9s}")
    labels = {
        "floor": "two products (floor)",
        "target": "poisson_field_target",
        "official": "official (B, L, N+1) form",
    }
    for name, label in labels.items():
        t, m = times[name], memory[name]
        memory_ratio = f"{m / memory['floor']:9.1f}" if memory["floor"] > 0 else f"{'n/a':>9s}"
        print(f"{label:34s} {t * 1e3:10.1f} {t / times['floor']:9.2f} {m / MIB:10.1f} {memory_ratio}")
    print(
        f"official form, analytic peak (two B*L*(N+1) float32 tensors): "
        f"{results['official_analytic_peak_bytes'] / MIB:.0f} MiB"
    )
    print(
        f"poisson_field_target / official form: time {times['target'] / times['official']:.4f}, "
        f"memory {memory['target'] / memory['official']:.4f}"
    )
    print(
        "\naccuracy: max over rows of |v - v_ref| / |v_ref|, v_ref in float64 (exact differences, log-space softmax)"
    )
    print(f"{'case':38s} {'rows':>5s} {'poisson_field_target':>21s} {'official fp32':>14s} {'fp32 expansion':>15s}")
    for row in results["accuracy_max_row_relative_error"]:
        print(
            f"{row['case']:38s} {row['rows']:5d} {row['target']:21.2e} {row['official']:14.2e} "
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
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the target and the floor")
    parser.add_argument("--official-repeats", type=int, default=3, help="timed calls of the official form")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        return cpu_peak_memory_child(args)
    results = measure(args, torch.device(args.device))
    print_report(results)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
