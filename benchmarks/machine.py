"""What every benchmark prints beside its figures: the processor, the cores, torch and its threads, the load."""

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name and its logical CPUs, from /proc/cpuinfo (Linux), else `platform`."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown CPU'} ({os.cpu_count()} logical CPUs)"


def load_average() -> float:
    """The 1-minute load average: runnable processes competing for the cores (compare with the core count)."""
    return os.getloadavg()[0]


def describe() -> str:
    """One line: CPU, usable cores, torch version and threads, Python."""
    return (
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}"
    )
