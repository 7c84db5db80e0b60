"""Boolean prior sampler throughput (Zhang et al. 2021, Section 5.1: 7-40-40-1 on {0,1}^7).

Measures, in one run and on one device:

- ``loop``: one network at a time (draw its parameters, forward the 128 inputs, threshold, pack, dict count),
  the baseline;
- ``batched``: :func:`flatness.prior.sampling.sample_function_counts`, with one worker and with all workers;
- machine limits: drawing the 2001 normals per network alone (``torch.randn`` into a preallocated buffer, one
  thread and all workers) and the fp32 matmul rate of a large GEMM, against which the FLOP rate implied by the
  sampler (``2 * 128 * (7*40 + 40*40 + 40)`` = 0.49 MFLOP per network) is compared.

``python benchmarks/bench_boolean_sampling.py [--quick] [--device cuda] [--widths 7 40 40 1]``
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch

from _common import machine_line, parser, print_table, sync
from flatness.boolean import boolean_inputs, pack_bits
from flatness.prior.sampling import sample_function_counts


def loop_rate(widths, n_nets: int, device, sigma_w=math.sqrt(2.0), sigma_b=1.0) -> float:
    """Networks/s of the one-network-at-a-time baseline (single thread on CPU)."""
    x = boolean_inputs(widths[0], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    counts: dict[tuple, int] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_nets):
            h = x
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                w = torch.randn(a, b, generator=gen, device=device) * (sigma_w / math.sqrt(a))
                bias = torch.randn(b, generator=gen, device=device) * sigma_b
                h = h @ w + bias
                if i < len(widths) - 2:
                    h = h.relu()
            key = tuple(pack_bits(h.reshape(-1) > 0).tolist())
            counts[key] = counts.get(key, 0) + 1
        sync(device)
        return n_nets / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def randn_rate(n_params: int, n_nets: int, chunk: int, device, workers: int = 1) -> float:
    """Networks/s of drawing ``n_params`` normals per network into preallocated buffers, ``workers`` threads."""
    per_worker = max(1, n_nets // workers)

    def work(i: int) -> None:
        if device.type == "cpu":
            torch.set_num_threads(1)
        gen = torch.Generator(device=device).manual_seed(i)
        buf = torch.empty(chunk * n_params, device=device)
        for _ in range(-(-per_worker // chunk)):
            torch.randn(chunk * n_params, generator=gen, out=buf)

    threads = torch.get_num_threads()
    try:
        work(0)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        if workers == 1:
            work(0)
        else:
            ts = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
            [t.start() for t in ts]
            [t.join() for t in ts]
        sync(device)
        return workers * per_worker / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def matmul_gflops(device, size: int = 2048, threads: int | None = None) -> float:
    """fp32 GFLOP/s of a large square GEMM (the machine's practical FLOP limit)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        out = torch.empty(size, size, device=device)
        torch.mm(a, b, out=out)
        sync(device)
        reps = 3 if device.type == "cpu" else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[7, 40, 40, 1])
    p.add_argument("--n-samples", type=int, default=None, help="networks for the batched sampler")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    widths = tuple(args.widths)
    cuda = device.type == "cuda"
    if args.n_samples is not None:
        n_batched = args.n_samples
    elif cuda:
        n_batched = 2**22 if args.quick else 2**27
    else:
        n_batched = 2**16 if args.quick else 2**21
    n_loop = (200 if args.quick else 1000) if cuda else (1000 if args.quick else 5000)
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    flop = 2 * 2 ** widths[0] * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    print(machine_line())
    print(f"widths {widths}: {n_params} normals and {flop / 1e6:.3f} MFLOP per network; device {device}")

    threads = torch.get_num_threads()
    r_loop = loop_rate(widths, n_loop, device)
    sample_function_counts(widths, min(n_batched, 4096), seed=1, device=device, progress=False)  # warm-up
    rows = []

    cpu_rate = {}

    def batched(workers):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fc = sample_function_counts(widths, n_batched, seed=2, device=device, progress=False, n_workers=workers)
        sync(device)
        cpu_rate[workers] = n_batched / (time.process_time() - c0)
        return n_batched / (time.perf_counter() - t0), fc

    r_one, _ = batched(1)
    r_all, fc = batched(None)
    workers = 1 if cuda else min(threads, len(os.sched_getaffinity(0)))  # the sampler's default
    chunk = fc.runs[0]["chunk"]
    r_randn1 = randn_rate(n_params, max(chunk, n_batched // 8), chunk, device, 1)
    r_randn = randn_rate(n_params, max(chunk, n_batched // 8), chunk, device, workers) if workers > 1 else r_randn1
    peak = matmul_gflops(device)
    peak1 = matmul_gflops(device, threads=1) if not cuda else peak
    for name, rate, w, rnd, pk, per_cpu in [("loop baseline", r_loop, 1, r_randn1, peak1, float("nan")),
                                            ("batched, 1 worker", r_one, 1, r_randn1, peak1, cpu_rate[1]),
                                            (f"batched, {workers} workers", r_all, workers, r_randn, peak,
                                             cpu_rate[None])]:
        # networks per CPU-second: robust on a shared machine; times `workers` it estimates the idle rate
        rows.append({"method": name, "workers": w, "networks/s": rate, "net/CPU-s": per_cpu, "x loop": rate / r_loop,
                     "% randn-only": 100 * rate / rnd, "GFLOP/s": rate * flop / 1e9,
                     "% GEMM peak": 100 * rate * flop / 1e9 / pk})
    print_table(rows, f"sampling {widths}, batched n_samples={n_batched}, chunk={chunk}")
    print_table([{"limit": "randn only (2001 normals/net)", "workers": 1, "networks/s": r_randn1},
                 {"limit": "randn only (2001 normals/net)", "workers": workers, "networks/s": r_randn},
                 {"limit": "fp32 GEMM 2048^3 GFLOP/s", "workers": 1, "networks/s": peak1},
                 {"limit": "fp32 GEMM 2048^3 GFLOP/s", "workers": workers, "networks/s": peak}],
                "machine limits (GEMM rows: GFLOP/s, not networks/s)")
    print(f"\nbatched / loop = {r_all / r_loop:.1f}x; distinct functions {len(fc)} of {n_batched}; "
          f"top: {fc.top(1)['function'].iloc[0]} x{int(fc.top(1)['count'].iloc[0])}")


if __name__ == "__main__":
    main()
