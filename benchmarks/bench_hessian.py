"""Top Hessian eigenvalue (Lanczos vs power iteration) and Hessian trace (exact vs Hutchinson / Hutch++).

Model: FCN 784-40-40-1 (Zhang et al.'s MNIST network, 33k parameters) trained to zero training error with
full-batch Adam on binarised MNIST (``flatness.data``; MNIST-like random inputs with a random teacher's labels
when the data is missing), sigmoid cross-entropy.

1. Eigenvalue: a long float64 Lanczos run gives the reference top eigenvalue; for each method we count the
   Hessian-vector products (HVPs) after which the top estimate stays within ``--rtol`` (1e-4) of it, then
   time a run of exactly that many products. Baseline: power iteration; ratios = power / Lanczos.
   Top-10: both methods with their own stopping rule at the same residual tolerance (1e-3), errors vs the
   float64 reference.
2. Trace at interpolation (half-MSE with targets = outputs, where Tr H = Chen et al.'s exact Gauss-Newton
   trace): exact per-example-Jacobian trace vs Hutchinson and Hutch++ with ``n`` HVPs; error, standard error,
   wall time, and the probes Hutchinson would need for a 1 % standard error. Baseline: exact.

Run: ``python benchmarks/bench_hessian.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import machine_line, parser, print_table, sync, timeit  # noqa: E402

from flatness.hessian import HessianOperator, hessian_trace, lanczos, power_iteration  # noqa: E402
from flatness.losses import half_mse, sigmoid_bce  # noqa: E402
from flatness.models import FCN  # noqa: E402


def _problem(n: int, widths, device, seed: int = 0, max_steps: int = 500):
    """Binarised MNIST (digits >= 5 -> 1) via flatness.data when available, else random inputs with the labels
    of a random teacher; the FCN is trained with full-batch Adam to zero training error (cap max_steps)."""
    source = "random"
    try:
        import warnings as _w

        from flatness.data import load_dataset

        with _w.catch_warnings():
            _w.simplefilter("ignore")
            d = load_dataset("mnist", "train")
        x = d.images[:n].reshape(n, -1).float() / 255
        y = (d.labels[:n] >= 5).float()
        source = f"mnist ({d.source})"
    except Exception:  # no data module or no data: MNIST-like random inputs
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, widths[0], generator=g)
        teacher = FCN(widths, seed=seed + 1)
        with torch.no_grad():
            out = teacher(x).reshape(-1)
            y = (out > out.median()).float()
    net = FCN(widths, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(max_steps):
        opt.zero_grad()
        loss = sigmoid_bce(net(x), y)
        loss.backward()
        opt.step()
        if bool(((net(x).reshape(-1) > 0).float() == y).all()):
            break
    return net.to(device), x.to(device), y.to(device), float(loss.detach()), source


def _hvps_to_reach(history: list[float], ref: float, rtol: float) -> int | None:
    """Products after which every later estimate stays within rtol of ref (None if never)."""
    ok = [abs(h - ref) <= rtol * abs(ref) for h in history]
    if not ok[-1]:
        return None
    n = len(ok)
    while n > 0 and ok[n - 1]:
        n -= 1
    return n + 1


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rtol", type=float, default=1e-4, help="relative accuracy of the top eigenvalue")
    p.add_argument("--n", type=int, default=None, help="number of inputs (default 500; --quick 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.n or (100 if args.quick else 500)
    widths = (784, 40, 40, 1)
    net, x, y, train_loss, source = _problem(n, widths, device, max_steps=100 if args.quick else 500)
    print(machine_line())
    print(f"FCN {widths}, {sum(p.numel() for p in net.parameters())} parameters, {n} inputs of {source}, "
          f"train loss {train_loss:.3g}, device {device}")

    # ---------------------------------------------------------------- top eigenvalue
    op64 = HessianOperator(net, sigmoid_bce, (x, y), dtype=torch.float64)
    ref_res = lanczos(op64, 1, tol=1e-12, max_iter=150 if args.quick else 300, seed=123)
    ref = float(ref_res.eigenvalues[0])
    op = HessianOperator(net, sigmoid_bce, (x, y))
    hvp_time = timeit(lambda: op.matvec(torch.ones(op.dim, device=device)), repeat=5, device=device)
    op_chunk = HessianOperator(net, sigmoid_bce, (x, y), batch_size=max(1, n // 5))
    hvp_chunk_time = timeit(lambda: op_chunk.matvec(torch.ones(op.dim, device=device)), repeat=3, device=device)

    rows, need = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runs are cut at a fixed number of products
        probe = {
            "lanczos": lanczos(op, 1, tol=1e-30, max_iter=200 if args.quick else 400, seed=0),
            "power": power_iteration(op, 1, tol=1e-30, max_iter=1000 if args.quick else 3000, seed=0),
        }
        for name, res in probe.items():
            need[name] = _hvps_to_reach(res.history, ref, args.rtol)
        for name in ("lanczos", "power"):
            k = need[name]
            if k is None:
                rows.append({"method": name, "HVPs": f"> {len(probe[name].history)}", "seconds": float("nan")})
                continue
            run = (lambda: lanczos(op, 1, tol=1e-30, max_iter=k, seed=0)) if name == "lanczos" else \
                (lambda: power_iteration(op, 1, tol=1e-30, max_iter=k, seed=0))
            secs = timeit(run, repeat=1 if args.quick else 3, device=device)
            est = float(run().eigenvalues[0])
            rows.append({"method": name, "HVPs": k, "seconds": secs, "HVP/s": k / secs,
                         "lambda_1": est, "rel_err": abs(est - ref) / abs(ref)})
    if need["lanczos"] and need["power"]:
        rows.append({"method": "ratio power/lanczos", "HVPs": round(need["power"] / need["lanczos"], 2),
                     "seconds": rows[1]["seconds"] / rows[0]["seconds"]})
    print_table(rows, f"top Hessian eigenvalue to rtol {args.rtol:g} (reference {ref:.6g}, float64 Lanczos "
                      f"{ref_res.n_matvec} HVPs)")
    print(f"one HVP: {hvp_time * 1e3:.2f} ms (cached graph), {hvp_chunk_time * 1e3:.2f} ms "
          f"(5 chunks, recomputed) -> chunking costs x{hvp_chunk_time / hvp_time:.2f}")

    k = 5 if args.quick else 10
    ref_k = lanczos(op64, k, tol=1e-10, max_iter=200 if args.quick else 400, seed=123).eigenvalues
    krows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, fn in (("lanczos", lanczos), ("power", power_iteration)):
            kw = {"max_iter": 2000} if name == "power" else {}
            t0 = time.perf_counter()
            res = fn(op, k, tol=1e-3, seed=0, **kw)
            sync(device)
            secs = time.perf_counter() - t0
            err = float(((res.eigenvalues.double().cpu() - ref_k).abs() / ref_k.abs()).max())
            krows.append({"method": name, "HVPs": res.n_matvec, "seconds": secs, "max_rel_err": err,
                          "converged": res.converged})
    krows.append({"method": "ratio power/lanczos", "HVPs": round(krows[1]["HVPs"] / krows[0]["HVPs"], 2),
                  "seconds": krows[1]["seconds"] / krows[0]["seconds"]})
    print_table(krows, f"top-{k} eigenvalues, residual tol 1e-3 (reference: float64 Lanczos)")

    # ---------------------------------------------------------------- trace
    y_fit = net(x).detach()
    n_probe = 30 if args.quick else 100
    t0 = time.perf_counter()
    exact = hessian_trace(net, half_mse, (x, y_fit), method="exact")
    sync(device)
    t_exact = time.perf_counter() - t0
    t_exact = min(t_exact, timeit(lambda: hessian_trace(net, half_mse, (x, y_fit), method="exact"),
                                  repeat=1 if args.quick else 3, warmup=0, device=device))
    trows = [{"method": "exact (per-example Jacobians)", "HVPs": 0, "value": exact.value, "std_err": 0.0,
              "rel_err": 0.0, "seconds": t_exact, "x exact time": 1.0}]
    for method in ("hutchinson", "hutchpp"):
        t0 = time.perf_counter()
        est = hessian_trace(net, half_mse, (x, y_fit), method=method, n_samples=n_probe, seed=0)
        sync(device)
        secs = time.perf_counter() - t0
        row = {"method": method, "HVPs": n_probe, "value": est.value, "std_err": est.std_err,
               "rel_err": abs(est.value - exact.value) / exact.value, "seconds": secs,
               "x exact time": secs / t_exact}
        if method == "hutchinson":
            row["probes for 1% se"] = math.ceil(n_probe * (est.std_err / (0.01 * abs(est.value))) ** 2)
        trows.append(row)
    print_table(trows, "Hessian trace at interpolation (half-MSE, targets = outputs): exact vs stochastic")
    print("(timings on a shared machine are noisy; ratios are measured in the same run)")


if __name__ == "__main__":
    main()
