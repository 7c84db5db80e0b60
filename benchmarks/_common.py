"""Shared helpers for the benchmark scripts: timing, peak memory, and a plain-text table.

Every benchmark measures its baseline in the same run and prints ratios, never absolute targets alone.
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock timings are honest."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, repeat: int = 3, warmup: int = 1,
           device: torch.device | str | None = None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mib(device=None) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.cuda.is_available() else float("nan")


def print_table(rows: Sequence[dict], title: str | None = None) -> None:
    """Print a list of dicts as an aligned plain-text table."""
    if title:
        print(f"\n== {title} ==")
    if not rows:
        print("(no rows)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def machine_line() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, {dev}")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity run in seconds")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    return p
