"""Benchmark of `PFGMScheduler.step` against diffusers' EDM schedulers on the same inputs. A script, not a test.

    python benchmarks/bench_scheduler_step.py                      # (64, 3, 32, 32), 18 steps, 1 thread, CPU
    python benchmarks/bench_scheduler_step.py --threads 2 --json scheduler_step.json

Each pair below is one of our schedulers and its diffusers baseline, each set to `--steps` steps and stepped through a
whole run (one sampling loop) per repeat. Within a run the two are stepped alternately, call by call, on the same
inputs (a fixed `randn * init_noise_sigma` start and a fixed model output; `scale_model_input` is called untimed
before each step, as a pipeline does), and which of the two goes first alternates between repeats, so that load from
other processes hits both alike. Every call is timed with `time.perf_counter` (with a device synchronisation on
accelerators).

Reported per pair, as medians over `--repeats` runs with the spread (min-max of the per-run figure):
- per call: the median over the interior calls of a run (neither the first call, which maps the start onto the prior
  and checks it, nor the last, which checks the result once per run), and the ratio ours / baseline;
- per run: the mean call of a run, each call taken as its median over the runs (robust to a preempted call), and the
  ratio; this includes the once-per-run work;
- the first and the last call alone, for both.

Heun makes 2n - 1 calls for n steps; its per-call figure is compared with EDMEulerScheduler's per call. The CPU model,
the thread count and the 1-minute load average (before and after) are printed with the figures.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from machine import cpu_model

from pfgm_diffusers import PFGMScheduler

# glibc malloc returns freed buffers of this size (768 KiB) to the kernel and faults them back in on the next call;
# which scheduler of a pair pays for that depends on what the other one holds (Heun keeps two more tensors), which
# swamps the difference measured here. Fixed thresholds keep the heap, as in a long-running process (and on a GPU,
# whose caching allocator never returns memory between steps). `--system-malloc` measures without them.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "4294967295", "MALLOC_MMAP_THRESHOLD_": "33554432"}


def pairs(aug_dim):
    """(name, ours, baseline) factories."""
    return [
        ("euler D=inf", lambda: PFGMScheduler(aug_dim=None, solver="euler"), EDMEulerScheduler),
        (f"euler D={aug_dim}", lambda: PFGMScheduler(aug_dim=aug_dim, solver="euler"), EDMEulerScheduler),
        (f"heun D={aug_dim}", lambda: PFGMScheduler(aug_dim=aug_dim, solver="heun"), EDMEulerScheduler),
        (
            f"dpmpp_2m D={aug_dim}",
            lambda: PFGMScheduler(aug_dim=aug_dim, solver="dpmpp_2m"),
            EDMDPMSolverMultistepScheduler,
        ),
    ]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_pair(ours, baseline, sample, model_output, args, device):
    runs = {"ours": [], "baseline": []}
    for repeat in range(args.repeats + 1):  # the first repeat warms up and is dropped
        order = [("ours", ours), ("baseline", baseline)]
        if repeat % 2:
            order.reverse()
        # alternate call by call: step both runs side by side
        for scheduler in (ours, baseline):
            scheduler.set_timesteps(args.steps, device=device)
        per_call = {"ours": [], "baseline": []}
        for k in range(len(ours.timesteps)):
            for name, scheduler in order:
                if k >= len(scheduler.timesteps):
                    continue
                t = scheduler.timesteps[k]
                scheduler.scale_model_input(sample, t)
                synchronize(device)
                start = time.perf_counter()
                scheduler.step(model_output, t, sample)
                synchronize(device)
                per_call[name].append(time.perf_counter() - start)
        if repeat:
            for name in runs:
                runs[name].append(per_call[name])
    return summarize(runs)


def summarize(runs):
    """Per pair: each run's median interior call, the per-call-index medians over runs, and the ratios."""
    out = {}
    for name, per_run in runs.items():
        by_call = [statistics.median(times) for times in zip(*per_run, strict=True)]  # (calls,) medians over runs
        out[name] = {
            "call_s": [statistics.median(calls[1:-1]) for calls in per_run],
            "run_mean_call_s": sum(by_call) / len(by_call),
            "first_s": [calls[0] for calls in per_run],
            "last_s": [calls[-1] for calls in per_run],
            "calls_per_run": len(by_call),
        }
    out["ratio_call_s"] = [a / b for a, b in zip(out["ours"]["call_s"], out["baseline"]["call_s"], strict=True)]
    out["ratio_run_mean_call_s"] = out["ours"]["run_mean_call_s"] / out["baseline"]["run_mean_call_s"]
    return out


def spread(values):
    return statistics.median(values), min(values), max(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--steps", type=int, default=18, help="num_inference_steps")
    parser.add_argument("--aug_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--pairs", nargs="*", help="only the pairs whose name starts with one of these (e.g. euler)")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = parser.parse_args()
    if args.device == "cpu" and not args.system_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV}
        )  # glibc reads them at start

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, *args.shape)
    sample = (torch.randn(shape, generator=g) * EDMEulerScheduler().init_noise_sigma).to(device)
    model_output = torch.randn(shape, generator=g).to(device)

    results = {}
    for name, make_ours, make_baseline in pairs(args.aug_dim):  # (Heun: 2n - 1 calls against the baseline's n)
        if args.pairs and not any(name.startswith(prefix) for prefix in args.pairs):
            continue
        results[name] = measure_pair(make_ours(), make_baseline(), sample, model_output, args, device)
        results[name]["baseline"]["name"] = make_baseline.__name__
    machine = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_scheduler_step.py"] + sys.argv[1:]),
        "cpu": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "shape": list(shape),
        "steps": args.steps,
        "repeats": args.repeats,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }
    print(f"{machine['cpu']}, {machine['threads']} thread(s) of {machine['cpus']} CPUs, torch {machine['torch']}")
    print(f"malloc: {machine['malloc_env']}")
    print(f"sample {tuple(shape)}, {args.steps} steps, {args.repeats} runs per pair; 1-minute load average "
          f"{machine['load_average_start_end'][0]:.2f} -> {machine['load_average_start_end'][1]:.2f}")  # fmt: skip
    print(f"{'pair':<18} {'baseline':<32} {'calls':>5} {'ours/call (ms)':>15} {'base/call':>10} "
          f"{'ratio/call (min-max)':>22} {'ratio/run':>13}")  # fmt: skip
    for name, r in results.items():
        ours_call, base_call = statistics.median(r["ours"]["call_s"]), statistics.median(r["baseline"]["call_s"])
        rc, rc_lo, rc_hi = spread(r["ratio_call_s"])
        print(
            f"{name:<18} {r['baseline']['name']:<32} {r['ours']['calls_per_run']:>5} {ours_call * 1e3:>15.3f}"
            f" {base_call * 1e3:>10.3f} {rc:>8.3f} ({rc_lo:.3f}-{rc_hi:.3f}) {r['ratio_run_mean_call_s']:>13.3f}"
        )
    print("once-per-run work, median ms (min-max): first call (start check and map), last call (result check)")
    for name, r in results.items():
        cells = []
        for who in ("ours", "baseline"):
            for figure in ("first_s", "last_s"):
                m, lo, hi = spread(r[who][figure])
                cells.append(f"{who} {figure[:-2]} {m * 1e3:.3f} ({lo * 1e3:.3f}-{hi * 1e3:.3f})")
        print(f"{name:<18} " + ", ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
