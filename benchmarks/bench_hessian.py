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

3. Gauss-Newton trace (Chen et al.'s sharpness, ``hessian_trace(method="gauss_newton")``) on the authors' models
   (``benchmarks/_authors.py``): FNN 784-500-500-500-10 with 200 inputs and their small VGG with 100 CIFAR-sized
   inputs. Baseline: the authors' ``get_gradW`` (one input at a time, one backward per output, parameter
   gradients copied to numpy). Ours: factorised per-layer norms (``per_example_grad_norms_sq``), and the
   generic ``vmap(jacrev)`` path (``method="vmap"``) for reference; relative differences vs the baseline.

Run: ``python benchmarks/bench_hessian.py [--quick] [--device cuda] [--only gn]``.
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

from flatness.hessian import (HessianOperator, hessian_trace, lanczos, per_example_grad_norms_sq,  # noqa: E402
                              power_iteration)
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


def gauss_newton_section(device, quick: bool) -> None:
    """Section 3: our Gauss-Newton trace vs the authors' per-input, per-output loop (same process, same threads)."""
    import _authors as au

    torch.manual_seed(0)
    cases = [("FNN 784-500-500-500-10 (tanh)", au.FNN(10), (200 if not quick else 40, 784)),
             ("small VGG [16,M,16,M,32,M,64,M,64,M]", au.vgg11(10), (100 if not quick else 20, 3, 32, 32))]
    rows = []
    for name, model, shape in cases:
        model = model.to(device).eval()
        x = torch.rand(*shape, device=device)
        repeat = 1 if quick else 2
        t_theirs = timeit(lambda: au.get_grad_w(model, x), repeat=repeat, warmup=0, device=device)
        theirs = float(au.get_grad_w(model, x)["grad_theta2"].mean())
        model.zero_grad(set_to_none=True)
        ours_fn = lambda: hessian_trace(model, None, (x, x[:, 0]), method="gauss_newton").value  # noqa: E731
        t_ours = timeit(ours_fn, repeat=repeat + 1, device=device)
        ours = ours_fn()
        vmap_fn = lambda: float(per_example_grad_norms_sq(model, x, method="vmap").double().mean())  # noqa: E731
        t_vmap = timeit(vmap_fn, repeat=repeat, warmup=0, device=device)
        vm = vmap_fn()
        rows.append({"model": name, "n": shape[0], "authors s": t_theirs, "ours s": t_ours,
                     "speed-up": t_theirs / t_ours, "vmap s": t_vmap, "vmap speed-up": t_theirs / t_vmap,
                     "rel diff ours": abs(ours - theirs) / theirs, "rel diff vmap": abs(vm - theirs) / theirs})
    print_table(rows, "Gauss-Newton trace (1/n) sum_i ||grad_theta f(x_i)||_F^2: ours vs the authors' get_gradW")


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rtol", type=float, default=1e-4, help="relative accuracy of the top eigenvalue")
    p.add_argument("--n", type=int, default=None, help="number of inputs (default 500; --quick 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", choices=("gn",), default=None,
                   help="gn: only section 3, the Gauss-Newton trace vs the authors' loop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.only in (None, "gn"):
        print(machine_line())
        gauss_newton_section(device, args.quick)
        if args.only == "gn":
            return
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
