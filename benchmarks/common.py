"""What the speed and memory benchmarks share: interleaved timing, memory, the machine's state.

Timing: variants are run interleaved (A B C A B C ..., each round starting at the next variant so that
none always runs first), after warm-up calls, so that a change in the machine's load hits all of them
alike. A variant's time is the median of its rounds and its spread the interquartile range; its ratio to a
reference is the median over rounds of the paired ratio (the variant's time over the reference's in the
same round), which cancels load drifts slower than a round.

Memory: peak resident memory (RSS) of the process over a call minus its RSS just before. Linux only: the
peak is reset by writing 5 to ``/proc/self/clear_refs``. For one layer's activations, small next to what
the allocator keeps, run the measuring process with :data:`EXACT_RSS_ENV`: glibc then maps every
allocation of 64 KiB or more on its own and unmaps it on free, so RSS follows the live tensors.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

REPO = Path(__file__).resolve().parents[1]
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cache_root() -> Path:
    """Where the benchmarks write their random checkpoints: the stages' cache (``paths.cache_dir`` of
    conf/paths/default.yaml: $ANYMS_CACHE, else ~/.cache/anyms), read from that file so there is one rule."""
    from omegaconf import OmegaConf

    root = Path(OmegaConf.load(REPO / "conf" / "paths" / "default.yaml").cache_dir)
    return root if root.is_absolute() else REPO / root


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Seconds per call of each variant, one entry per round (same order across variants)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, variant: str) -> float:
        return statistics.median(self.seconds[variant])

    def spread(self, variant: str) -> float:
        """Interquartile range (0 with fewer than 2 rounds)."""
        values = self.seconds[variant]
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q3 - q1

    def ratio(self, variant: str, reference: str) -> float:
        """Median over rounds of ``t_variant / t_reference`` in the same round."""
        pairs = zip(self.seconds[variant], self.seconds[reference])
        return statistics.median(a / b for a, b in pairs)


def interleaved(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> Timings:
    """Times each call ``rounds`` times, interleaved, after ``warmup`` untimed calls of each. ``sync``
    waits for the device (``torch.cuda.synchronize`` on CUDA) before the clock is read."""
    sync = sync or (lambda: None)
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    timings = Timings({name: [] for name in names})
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            sync()
            start = time.perf_counter()
            calls[name]()
            sync()
            timings.seconds[name].append(time.perf_counter() - start)
    return timings


def device_sync(device: str) -> Callable[[], None] | None:
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else None


# ------------------------------------------------------------------------------------------- memory


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Sets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def return_freed_memory_at_once() -> None:
    """From now on glibc maps each allocation of 64 KiB or more on its own and unmaps it when freed (as
    :data:`EXACT_RSS_ENV` does from a process's start), and what is already free is given back: RSS then
    follows the live tensors. Slower allocation: for measuring memory, not time. No-op without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 65536)
    libc.malloc_trim(0)


def memory_supported() -> bool:
    try:
        rss_bytes()
        reset_peak_rss()
        return True
    except OSError:
        return False


def peak_increase(call: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory over ``call()`` minus the memory just before it, in bytes: RSS on the CPU, allocated
    memory on CUDA."""
    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        reset_peak_rss()
        before = rss_bytes()
        result = call()
        peak = peak_rss_bytes()
    del result
    return max(peak - before, 0)


# ------------------------------------------------------------------------------------------- machine


def device_name(device: str) -> str:
    """A short name for results files: ``cpu2`` (2 cores) or the CUDA device."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def machine() -> dict:
    """What the results depend on besides the code: CPU, threads, and how loaded the machine was."""
    import torch

    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info["loadavg_start"] = load_average()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    import runfolder

    return runfolder.hardware("cpu")["name"]  # one reading of the processor, the records' own


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"
