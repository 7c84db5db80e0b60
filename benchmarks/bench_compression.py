"""Per-input compression metrics (MLS, log volume, local dim, ||J||_F): batched vs the authors' loop.

Baseline, measured in the same run: the approach of ``chinsengi/sharpdim`` (``src/utils.py:get_dim``): one
input at a time, one ``autograd.grad`` per output into a float64 numpy array, then ``np.linalg.svd``
(also timed without the SVD, "autograd part"; its numpy BLAS is limited to one thread, which only makes
the baseline faster for these 10 x d matrices and avoids thread oversubscription). Ours: :func:`flatness.compression.local_metrics`
(backward passes over whole chunks of inputs, k x k Gram matrices and ``eigvalsh``; for an MLP the
"factored" Gram through the first layer). Also timed: :func:`network_mls` (all layers at once) and the
matrix-free :func:`top_singular_values` against the dense path.

Targets (2 CPU cores, idle machine): >= 20x on FCN 784-40-40-10 with 1,000 inputs and >= 8x on SmallVGG with
100 CIFAR-shaped inputs. ``--quick``: 100 and 20 inputs. Peak memory: on CPU, the peak RSS of a child
process running that one step, minus its RSS before the step (full runs only); on CUDA, peak allocated.

Agreement: ``max_rel_err`` is the largest relative difference to the baseline over inputs and metrics
(log volume: absolute below 1), ``n_err>1e-4`` the number of inputs above 1e-4. ReLU networks are not
differentiable where a pre-activation is 0 or a max-pool window has a tie; an input within float32
rounding of such a kink (with 100 random CIFAR-shaped inputs, one max-pool gap of 2e-8 relative
occurred) gets a different Jacobian from any two float32 algorithms (batch-1 vs batched
convolution kernels), and the float64 Jacobian agrees with one of them only.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, parser, peak_cuda_mib, peak_rss_mib, print_table, timeit  # noqa: E402

from flatness._device import resolve_device  # noqa: E402
from flatness.compression import local_metrics, network_mls, top_singular_values  # noqa: E402
from flatness.models import FCN, SmallVGG  # noqa: E402

KEYS = ("mls", "log_volume", "local_dim", "jac_fro")


# ------------------------------------------------------------------------------------------ baseline
def baseline_jacobian(model: torch.nn.Module, xi: torch.Tensor) -> np.ndarray:
    """One input ``(1, ...)``: k backward passes into a float64 numpy array ``(k, d)`` (authors' loop)."""
    xi = xi.clone().requires_grad_(True)
    logits = model(xi).reshape(1, -1)
    grad_x = np.zeros((logits.shape[1], xi.numel()))
    for j in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[0][j], xi, retain_graph=True)
        grad_x[j, :] = g.detach().cpu().numpy().reshape(-1)
    return grad_x


def _one_blas_thread():
    """numpy's BLAS on one thread for the tiny baseline SVDs: faster, and immune to oversubscription."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def baseline_metrics(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The reference implementation's approach: per input, k backward passes and a numpy SVD."""
    model.eval()
    out = {key: np.zeros(len(x)) for key in KEYS}
    with _one_blas_thread():  # entered once: threadpoolctl's own cost stays out of the loop
        for i in range(len(x)):
            _baseline_one(model, x[i:i + 1], out, i)
    return out


def _baseline_one(model: torch.nn.Module, xi: torch.Tensor, out: dict[str, np.ndarray], i: int) -> None:
    sv = np.linalg.svd(baseline_jacobian(model, xi), compute_uv=False)
    eig = sv**2
    out["mls"][i] = sv[0]
    out["log_volume"][i] = 0.5 * np.sum(np.log(eig))
    out["local_dim"][i] = np.sum(eig) ** 2 / np.sum(eig**2)
    out["jac_fro"][i] = np.sqrt(np.sum(eig))


def baseline_autograd_only(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.eval()
    for i in range(len(x)):
        baseline_jacobian(model, x[i:i + 1])


def rel_err_per_input(ours: dict[str, torch.Tensor], ref: dict[str, np.ndarray]) -> np.ndarray:
    """Per input, the largest relative difference over the four metrics."""
    errs = []
    for key in KEYS:
        a = ours[key].detach().cpu().double().numpy()
        b = ref[key]
        # log_volume is a log that crosses 0: compare it absolutely below 1, the others relatively
        floor = 1.0 if key == "log_volume" else 1e-12
        errs.append(np.abs(a - b) / np.maximum(np.abs(b), floor))
    return np.max(np.stack(errs), axis=0)


# ------------------------------------------------------------------------------------------- cases
def make_case(case: str, n: int):
    torch.manual_seed(0)
    if case == "fcn":
        return "FCN 784-40-40-10", FCN((784, 40, 40, 10), seed=0).eval(), torch.rand(n, 784)
    return "SmallVGG 3x32x32", SmallVGG().eval(), torch.rand(n, 3, 32, 32)


STEPS = {
    "baseline": baseline_metrics,
    "baseline_autograd": baseline_autograd_only,
    "ours": local_metrics,
    "nmls": network_mls,
}
LABELS = {
    "baseline": "baseline: loop + numpy SVD",
    "baseline_autograd": "  (its autograd part only)",
    "ours": "local_metrics (batched)",
    "nmls": "network_mls (all layers)",
}


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (4096 / 2**20)


def child_peak(case: str, step: str, n: int) -> float:
    """Peak RSS growth (MiB) of one step run alone in a fresh process (CPU)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, step, str(n)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"])
    except (ValueError, IndexError, KeyError):
        return float("nan")


def _child_main(case: str, step: str, n: int) -> None:
    _, model, x = make_case(case, n)
    STEPS[step](model, x[:2])  # warm up lazy initialisation (oneDNN primitives, BLAS buffers)
    before = _current_rss_mib()
    STEPS[step](model, x)
    print(json.dumps({"peak_mib": max(0.0, peak_rss_mib() - before)}))


# --------------------------------------------------------------------------------------------- main
def bench_case(case: str, n: int, device: torch.device, repeat: int, memory: bool) -> list[dict]:
    name, model, x = make_case(case, n)
    model, x = model.to(device), x.to(device)
    rows, times, ref, ours = [], {}, {}, {}
    for step in STEPS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if step == "baseline":
            t = timeit(lambda: ref.update(baseline_metrics(model, x)), repeat=1, warmup=0, device=device)
        elif step == "ours":
            t = timeit(lambda: ours.update(local_metrics(model, x)), repeat=repeat, device=device)
        else:
            t = timeit(lambda s=step: STEPS[s](model, x), repeat=1 if "baseline" in step else repeat,
                       warmup=0 if "baseline" in step else 1, device=device)
        times[step] = t
        mem = peak_cuda_mib(device) if device.type == "cuda" else (
            child_peak(case, step, n) if memory else float("nan"))
        err = rel_err_per_input(ours, ref) if step == "ours" else None
        rows.append({"case": name, "method": LABELS[step], "N": n, "seconds": t, "inputs/s": n / t,
                     "speedup": times["baseline"] / t, "peak_MiB": mem,
                     "max_rel_err": float(err.max()) if err is not None else float("nan"),
                     "n_err>1e-4": int((err > 1e-4).sum()) if err is not None else ""})
    return rows


def bench_matrix_free(n: int, device: torch.device, repeat: int) -> list[dict]:
    _, model, x = make_case("vgg", n)
    model, x = model.to(device), x.to(device)
    dense = {}
    t_dense = timeit(lambda: dense.update(local_metrics(model, x)), repeat=repeat, device=device)
    mf = {}
    t_mf = timeit(lambda: mf.update(s=top_singular_values(model, x, k=1, tol=1e-5)), repeat=repeat, device=device)
    err = float(((mf["s"][:, 0] - dense["mls"]).abs() / dense["mls"]).max())
    return [
        {"case": "SmallVGG top sigma", "method": "dense Jacobian (local_metrics)", "N": n, "seconds": t_dense,
         "inputs/s": n / t_dense, "speedup": 1.0, "max_rel_err": 0.0},
        {"case": "SmallVGG top sigma", "method": "matrix-free subspace iteration", "N": n, "seconds": t_mf,
         "inputs/s": n / t_mf, "speedup": t_dense / t_mf, "max_rel_err": err},
    ]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child_main(argv[1], argv[2], int(argv[3]))
        return 0
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    n_fcn, n_vgg = (100, 20) if args.quick else (1000, 100)
    repeat = 1 if args.quick else 3
    memory = not args.quick and device.type == "cpu"
    print(machine_line())
    rows = bench_case("fcn", n_fcn, device, repeat, memory) + bench_case("vgg", n_vgg, device, repeat, memory)
    print_table(rows, "per-input metrics vs one-input-at-a-time, float32 (targets: 20x FCN, 8x SmallVGG)")
    print_table(bench_matrix_free(min(n_vgg, 20), device, repeat),
                "top singular value: matrix-free (for inputs too large for a Jacobian) vs dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
