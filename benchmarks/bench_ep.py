"""EP for log P(f): wall time vs n, against GPy's parallel EP (probit) on the same kernel and labels.

Inputs: the first n MNIST training images in [0, 1] (``flatness.data.load_dataset``; random binary
784-vectors when MNIST is not available), the arc-cosine kernel of FCN 784-40-40-1 (n_hidden = 2,
sigma_w = sqrt 2, sigma_b = 1), random labels. Ours: ``log_prior_ep`` (parallel EP, default tolerance),
Heaviside and probit. Baseline: GPy 1.15 ``EP(parallel_updates=True)`` with its Bernoulli/probit
likelihood (and its Heaviside link, for the Heaviside rows), timing only its ``expectation_propagation`` +
``_ep_marginal`` (no gradients), sweeps counted.

    python benchmarks/bench_ep.py [--quick] [--gpy-max-n 5000]
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, parser, peak_rss_mib, print_table, sync  # noqa: E402

from flatness.prior.ep import log_prior_ep  # noqa: E402
from flatness.prior.kernels import arccos_kernel  # noqa: E402


def _inputs(n: int) -> tuple[torch.Tensor, str]:
    try:
        from flatness.data import load_dataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_dataset("mnist", "train")
        if len(ds.images) >= n:
            return ds.images[:n].reshape(n, -1).double() / 255.0, f"mnist/{ds.source}"
    except Exception:  # noqa: BLE001 - any failure: fall back to synthetic inputs
        pass
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 784, generator=g) > 0.5).double(), "random binary"


def _gpy_ep(K: np.ndarray, y01: np.ndarray, likelihood: str) -> tuple[float, float, int] | str | None:
    """GPy's parallel EP: (log Z, seconds, sweeps), None when GPy is missing, or the error it raised."""
    try:
        import GPy
        from GPy.inference.latent_function_inference import expectation_propagation as gep
    except ImportError:
        return None
    calls = [0]
    orig = gep.posteriorParams._recompute

    def counting(*args, **kwargs):
        calls[0] += 1
        return orig(*args, **kwargs)

    gep.posteriorParams._recompute = staticmethod(counting)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from paramz import ObsAr

            n = K.shape[0]
            link = GPy.likelihoods.link_functions.Heaviside() if likelihood == "heaviside" else None
            lik = GPy.likelihoods.Bernoulli(gp_link=link) if link else GPy.likelihoods.Bernoulli()
            ep = GPy.inference.latent_function_inference.EP(parallel_updates=True)
            t0 = time.perf_counter()
            _, ga, _, log_z_tilde = ep.expectation_propagation(np.zeros(n), K, ObsAr(y01[:, None]), lik, None)
            log_z, _ = ep._ep_marginal(np.zeros(n), K, ga, log_z_tilde)
            seconds = time.perf_counter() - t0
            if not np.isfinite(log_z):
                return f"log Z = {log_z}"
    except (AssertionError, ArithmeticError, np.linalg.LinAlgError) as err:
        return f"{type(err).__name__}"
    finally:
        gep.posteriorParams._recompute = staticmethod(orig)
    return float(log_z), seconds, calls[0] - 1  # the last recompute is _ep_marginal's


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="n values (default 500 1500 5000 10000)")
    p.add_argument("--gpy-max-n", type=int, default=5000, help="largest n at which GPy is run (it is slow)")
    args = p.parse_args(argv)
    sizes = args.sizes or ([500, 1500] if args.quick else [500, 1500, 5000, 10000])
    device = torch.device(args.device) if args.device else torch.device("cpu")
    print(machine_line())
    x_all, source = _inputs(max(sizes))
    k_warm = arccos_kernel(x_all[:64], n_hidden=2, device=device)  # warm-up (CUDA context, kernels)
    log_prior_ep(k_warm, torch.arange(64) % 2)
    rows = []
    for n in sizes:
        x = x_all[:n]
        t0 = time.perf_counter()
        K = arccos_kernel(x, n_hidden=2, device=device)
        sync(device)
        t_kernel = time.perf_counter() - t0
        y = torch.from_numpy((np.random.default_rng(n).random(n) > 0.5).astype(np.int64))
        for lik in ("heaviside", "probit"):
            gpy = _gpy_ep(K.cpu().numpy(), y.numpy().astype(float), lik) if n <= args.gpy_max_n else None
            t0 = time.perf_counter()
            res = log_prior_ep(K, y, likelihood=lik)
            sync(device)
            secs = time.perf_counter() - t0
            row = {"n": n, "likelihood": lik, "kernel_s": t_kernel, "sweeps": res.n_iter, "ours_s": secs,
                   "log10_P": res.log10_prob, "damping": res.damping}
            if isinstance(gpy, str):
                row["gpy_s"] = f"failed: {gpy}"
            elif gpy is not None:
                g_logz, g_secs, g_sweeps = gpy
                row.update({"gpy_sweeps": g_sweeps, "gpy_s": g_secs, "gpy_log10_P": g_logz / math.log(10),
                            "rel_diff": abs(res.log_prob - g_logz) / abs(g_logz), "speedup": g_secs / secs})
            rows.append(row)
        print(f"n={n} done", flush=True)
    print_table(rows, title=f"EP on the arc-cosine kernel ({source} inputs, random labels, {device})")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; speedup = GPy parallel EP seconds / ours (same K, labels, likelihood)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
