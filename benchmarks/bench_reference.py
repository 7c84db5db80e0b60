"""Our compression metrics, bounds and Hessian trace vs the authors' one-input-at-a-time algorithms.

Baseline, measured in the same process: ``_authors.py``, a re-implementation (from a reading of
``chinsengi/sharpdim`` at commit ``2bcbe24``, no code copied) of the loops the authors run: per input, one
``autograd.grad``/``backward`` per output, numpy/torch SVD per input, weight norms recomputed per input as
in their ``get_nmls``. Both sides run on the authors' model classes (``_authors.FNN``, ``_authors.vgg11``,
whose forwards call ``x.view``): FNN 784-500-500-500-10 (tanh, the default of their ``train.py``) on 200
Fashion-MNIST images and their small VGG on 100 CIFAR-10 images of classes 0 and 1 (bundled subsets,
``source="embedded"``), seeded random init followed by ``--train-steps`` SGD steps (their recipe: MSE on
one-hot targets, lr 0.1, batch 8) so the values are not those of a fresh init.

Per function: their time and ours (best of 3, called in alternation so that both sides see the same load;
fewer when one baseline run exceeds ~30 s), the ratio, the
time of the forward and backward passes alone that any exact batched method runs (``floor_s``, see
:func:`_floor_passes`; their time over it is the largest ratio such a method can reach here), the
target (10x everywhere; ``local_metrics`` on the VGG: 3x and an achieved throughput within 2x of the
machine's fp32 conv peak, measured in the same run, at the start and again before the VGG, as the best
of large 3x3 conv2d forward / forward + input-gradient / forward + backward passes; the FLOPs of
``local_metrics`` are estimated as k outputs x 2 x the forward FLOPs per input; the passes actually run
are one forward and k input-gradient backwards, about (k + 1) forwards, printed too), and the largest relative
difference of the values (log volume: absolute below 1) in float32 (the timed runs) and in float64 (a
separate run of both sides on float64 copies; the float32 column is dominated by rounding near ReLU/max-pool
kinks, the float64 one is the comparison against the 1e-5 target). Each row compares matching conventions:
log volume of the top 3 eigenvalues, Fig. G.5's all-layers weight factor (and Fig. 3's first-layer "D"),
the authors' NMLS term (``nmls_bound(variant="authors")``), and ``adversarial_mls(variant="authors")`` against
their per-image ViT loop (``eval_mls_adv``) started from the same perturbations.
Where our API does not offer the authors' convention, the row says "n/a (convention not available)".

Run: ``python benchmarks/bench_reference.py [--quick] [--train-steps S] [--cases fnn vgg]``; ``--quick``: 10 FNN and
4 VGG inputs.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _authors as au  # noqa: E402
from _common import machine_line, parser, print_table  # noqa: E402

from flatness.bounds import mls_bound_chain, nmls_bound  # noqa: E402
from flatness.compression import adversarial_mls, local_metrics, network_mls  # noqa: E402
from flatness.data import load_dataset  # noqa: E402
from flatness.hessian import hessian_trace  # noqa: E402
from flatness.losses import half_mse  # noqa: E402

TARGET = 10.0
VGG_LOCAL_TARGET = 3.0


class ConventionMissing(Exception):
    """Our API does not (yet) offer the authors' convention for this quantity."""


# ------------------------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], object], repeat: int, budget_s: float = 30.0) -> tuple[float, object]:
    """Smallest wall time of up to ``repeat`` calls (stop early once ``budget_s`` is spent) and the last result."""
    best, spent, out = math.inf, 0.0, None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best, out


def best_of_pair(fa: Callable[[], object], fb: Callable[[], object], repeat: int,
                 budget_s: float = 30.0) -> tuple[float, object, float, object]:
    """:func:`best_of` of two functions called in alternation (a, b, a, b, ...), so that both sides sample
    the same phases of a shared machine's load; stops after the pair in which ``fa`` has spent ``budget_s``."""
    ta = tb = math.inf
    spent, out_a, out_b = 0.0, None, None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out_a = fa()
        dt = time.perf_counter() - t0
        ta, spent = min(ta, dt), spent + dt
        t0 = time.perf_counter()
        out_b = fb()
        tb = min(tb, time.perf_counter() - t0)
        if spent > budget_s:
            break
    return ta, out_a, tb, out_b


def load_line() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average n/a"


# ---------------------------------------------------------------------------------------- problems
def _images(name: str, n: int, classes: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = load_dataset(name, "train", source="embedded")
    keep = torch.ones(len(d.labels), dtype=torch.bool) if classes is None else torch.isin(
        d.labels, torch.tensor(classes))
    img, lab = d.images[keep][:n], d.labels[keep][:n]
    x = img.float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    return x, lab


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    """Their recipe, briefly: SGD lr 0.1, batch 8, mean MSE against one-hot targets (10 classes)."""
    if steps <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = F.one_hot(y, 10).float()
    for _ in range(steps):
        idx = torch.randint(len(x), (8,), generator=gen)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), target[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def make_case(case: str, n: int, train_steps: int) -> tuple[str, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if case == "fnn":
        model, name = au.FNN(10, "tanh"), "FNN 784-500x3-10"
        x, y = _images("fashion_mnist", n + 400, None)
    else:
        model, name = au.vgg11(10, 3), "VGG (authors') 3x32x32"
        x, y = _images("cifar10", n + 400, (0, 1))
    _train(model, x[n:], y[n:], train_steps, seed=1)
    model.eval()
    return name, model, x[:n].contiguous()


# ------------------------------------------------------------------------------------- comparisons
def _rel(ours: dict[str, float | np.ndarray], theirs: dict[str, float | np.ndarray],
         floors: dict[str, float] | None = None) -> float:
    """Largest relative difference over the keys of ``theirs`` (absolute below ``floors[key]``, default 1e-12)."""
    floors = floors or {}
    worst = 0.0
    for key, b in theirs.items():
        a = np.asarray(ours[key], dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        err = np.abs(a - b) / np.maximum(np.abs(b), floors.get(key, 1e-12))
        err = np.where(a == b, 0.0, err)  # equal infinities
        if np.isnan(err).any():
            return math.nan  # a NaN on one side only (or both): never hide it behind max()
        worst = max(worst, float(np.max(err)))
    return worst


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float64)


def _has_kw(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _gn_method() -> str:
    """The name under which hessian_trace offers the Gauss-Newton trace (H2 may add an explicit one)."""
    doc = hessian_trace.__doc__ or ""
    for cand in ("gauss_newton", "gauss-newton", "gn"):
        if f'"{cand}"' in doc:
            return cand
    return "exact"


# Each spec: (label, theirs(model, x) -> dict of values, ours(model, x) -> dict of values, floors)
def theirs_local(model, x):
    d = au.get_dim(model, x)
    return {"mls": d["mls"], "log_volume": d["log_volume"], "local_dim": d["local_dim"], "jac_fro2": d["jac_fro2"]}


def ours_local(model, x):
    m = local_metrics(model, x, top_k=3)
    return {"mls": _np(m["mls"]), "log_volume": _np(m["log_volume"]), "local_dim": _np(m["local_dim"]),
            "jac_fro2": _np(m["jac_fro"]) ** 2}


def theirs_nmls(model, x):
    return {"nmls": au.get_nmls(model, x, with_norms=False)["nmls"]}


def ours_nmls(model, x):
    return {"nmls": _np(network_mls(model, x))}


def theirs_trace(model, x):
    return {"trace": float(au.get_grad_w(model, x)["grad_theta2"].mean())}


def ours_trace(model, x):
    with torch.no_grad():
        y = model(x).detach()
    return {"trace": float(hessian_trace(model, half_mse, (x, y), method=_gn_method()).value)}


def theirs_chain(model, x):
    c = au.g5_chain(model, x)
    return {k: c[k] for k in ("A", "B", "C", "D", "D_fig3")}


def ours_chain(model, x):
    if not _has_kw(mls_bound_chain, "weight_norm"):
        raise ConventionMissing("mls_bound_chain has no weight_norm='all_layers'")
    r = mls_bound_chain(model, x, weight_norm="all_layers")
    # Fig. 3's "D" uses the first layer's factor (their W0 = ||W_1||_2 for the FNN): weight_norm="first"
    return {"A": r.A, "B": r.B, "C": r.C, "D": r.D, "D_fig3": r.D * r.w_spectral_norm / r.weight_factor}


def theirs_nmls_bound(model, x):
    t = au.nmls_bound_terms(model, x)
    return {"lhs": t["lhs"], "rhs": t["rhs"]}


def ours_nmls_bound(model, x):
    if not _has_kw(nmls_bound, "variant"):
        raise ConventionMissing("nmls_bound has no variant='authors'")
    r = nmls_bound(model, x, variant="authors")
    return {"lhs": r.lhs, "rhs": r.rhs}


def _delta0(x: torch.Tensor) -> torch.Tensor:
    """The initial perturbations adversarial_mls draws for seed 0 (randn of x's shape times 0.1)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype) * 0.1


def theirs_adv(model, x):
    return {"ratio": au.mls_adv(model, x, _delta0(x))}


def ours_adv(model, x):
    if 'variant="authors"' not in (adversarial_mls.__doc__ or ""):
        raise ConventionMissing("adversarial_mls has no variant='authors'")
    return {"ratio": _np(adversarial_mls(model, x, n_steps=30, lr=0.1, init_std=0.1, output="sigmoid",
                                         seed=0, variant="authors"))}


SPECS = {
    "local_metrics": (theirs_local, ours_local, {"log_volume": 1.0}, "get_dim"),
    "network_mls": (theirs_nmls, ours_nmls, {}, "get_nmls (NMLS part)"),
    "hessian_trace": (theirs_trace, ours_trace, {}, "get_gradW"),
    "mls_bound_chain": (theirs_chain, ours_chain, {}, "G.5: get_dim+get_gradW+norms"),
    "nmls_bound": (theirs_nmls_bound, ours_nmls_bound, {}, "get_nmls+get_gradW"),
    "adversarial_mls": (theirs_adv, ours_adv, {}, "eval_mls_adv (ViT)"),
}


# ------------------------------------------------------------------------------------ backprop floor
def _floor_passes(label: str, model: torch.nn.Module, x: torch.Tensor, k: int) -> Callable[[], None]:
    """The forward and backward passes of ``label``'s batched algorithm alone, nothing else.

    One forward of the whole batch and, per output, one backward pass of the batch-summed output (vectorised
    over the inputs) to the tensors the quantity is a function of: the input (``local_metrics``,
    ``network_mls``; every layer input lies on the way), every Linear/Conv layer output (the per-example
    weight-gradient norms of ``hessian_trace``) or both (the bounds). ``adversarial_mls``: its 30 evaluations,
    each a forward and one backward to the perturbed input (29 of them). No Jacobian is stored, no norm,
    product or eigenvalue is computed. Any exact method that backpropagates every output runs at least
    these passes; ours run them (on a Linear first layer the input passes stop one layer earlier, so the FNN
    rows can come below them).
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    to_input = label in ("local_metrics", "network_mls", "mls_bound_chain", "nmls_bound", "adversarial_mls")
    to_layers = label in ("hessian_trace", "mls_bound_chain", "nmls_bound")

    def passes():
        outs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in layers] if to_layers else []
        try:
            xi = x.detach().requires_grad_(to_input)
            if label == "adversarial_mls":
                for step in range(30):
                    out = model(xi + 0.1)
                    if step < 29:
                        torch.autograd.grad(out.sum(), xi)
                return
            out = model(xi)
        finally:
            for h in hooks:
                h.remove()
        wrt = ([xi] if to_input else []) + outs
        for j in range(k):
            torch.autograd.grad(out[:, j].sum(), wrt, retain_graph=j < k - 1, allow_unused=True)

    return passes


def _run_ours(fn, model, x):
    try:
        return fn(model, x), None
    except ConventionMissing as exc:
        return None, f"n/a (convention not available: {exc})"
    except NotImplementedError as exc:
        return None, f"n/a (refused: {str(exc).split(';')[0][:70]})"
    except Exception as exc:  # noqa: BLE001 - report, never crash the benchmark run
        return None, f"n/a (error: {type(exc).__name__}: {str(exc)[:70]})"


# ------------------------------------------------------------------------------------ conv peak
def conv_peak_gflops(quick: bool, repeat: int) -> tuple[float, str]:
    """The machine's fp32 conv throughput: best GFLOP/s of large 3x3 conv2d passes.

    Passes: forward; forward + input gradient (what ``local_metrics`` runs); forward + input and weight
    gradients. Shapes 16x64x56x56 and 32x128x28x28 (quick: 2x64x28x28), NCHW and channels-last.
    """
    shapes = [(2, 64, 28)] if quick else [(16, 64, 56), (32, 128, 28)]
    best, where = 0.0, ""
    for n, c, hw in shapes:
        f = 2.0 * n * c * c * 9 * hw * hw  # one pass
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(n, c, hw, hw).contiguous(memory_format=fmt).requires_grad_(True)
            w = torch.randn(c, c, 3, 3).contiguous(memory_format=fmt).requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    F.conv2d(x, w, padding=1)

            def fwd_gin():
                y = F.conv2d(x, w.detach(), padding=1)
                torch.autograd.grad(y, x, torch.ones_like(y))

            def fwd_bwd():
                y = F.conv2d(x, w, padding=1)
                y.backward(torch.ones_like(y))

            for label, step, passes in (("fwd", fwd, 1), ("fwd+grad input", fwd_gin, 2), ("fwd+bwd", fwd_bwd, 3)):
                step()
                t, _ = best_of(step, repeat)
                g = passes * f / t / 1e9
                if g > best:
                    layout = "channels_last" if fmt is torch.channels_last else "NCHW"
                    best, where = g, f"conv2d 3x3 {n}x{c}x{hw}x{hw} {label}, {layout}"
    return best, where


# --------------------------------------------------------------------------------------------- main
def bench_case(case: str, n: int, train_steps: int, repeat: int, peak: float) -> list[dict]:
    name, model, x = make_case(case, n, train_steps)
    if case == "vgg":  # the peak again, next to the measurement it is compared with (the load changes)
        again, how = conv_peak_gflops(n <= 10, repeat)
        print(f"fp32 conv peak, measured again: {again:.3g} GFLOP/s ({how})", flush=True)
        peak = max(peak, again)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        k = model(x[:1]).shape[1]
    rows = []
    for label, (theirs, ours, floors, their_name) in SPECS.items():
        warm = x[:2]
        theirs(model, warm)
        res, note = _run_ours(ours, model, warm)
        if note is None:  # both sides timed in alternation
            t_theirs, v_theirs, t_ours, v_ours = best_of_pair(lambda: theirs(model, x), lambda: ours(model, x),
                                                              repeat)
        else:
            t_theirs, v_theirs = best_of(lambda: theirs(model, x), repeat)
        row = {"function": label, "model": name, "N": n, "theirs": their_name, "theirs_s": t_theirs}
        if note is not None:
            rows.append({**row, "ours_s": "n/a", "ratio": "n/a", "floor_s": "", "target": "", "met": note,
                         "maxrel_fp64": "", "maxrel_fp32": ""})
            print(f"  {name} {label}: theirs {t_theirs:.3g} s, ours {note}", flush=True)
            continue
        floor = _floor_passes(label, model, x, k)
        floor()
        t_floor, _ = best_of(floor, repeat)
        ratio = t_theirs / t_ours
        err32 = _rel(v_ours, v_theirs, floors)
        res64, note64 = _run_ours(ours, model64, x64)
        err64 = _rel(res64, theirs(model64, x64), floors) if note64 is None else float("nan")
        target = f">= {TARGET:g}x"
        met = ratio >= TARGET
        extra = ""
        if label == "local_metrics" and case == "vgg":
            gflops = n * k * 2 * au.forward_flops(model, x) / t_ours / 1e9
            target = f">= {VGG_LOCAL_TARGET:g}x and >= {peak / 2:.3g} GFLOP/s"
            met = ratio >= VGG_LOCAL_TARGET and gflops >= peak / 2
            # the estimate of the target counts 2k forwards per input; the passes run are one forward and k
            # input-gradient backwards (no weight gradients), about (k + 1) forwards
            extra = f"{gflops:.3g} GFLOP/s as 2k fwd, {gflops * (k + 1) / (2 * k):.3g} as (k+1) fwd; peak {peak:.3g}"
        if not met and t_theirs / t_floor < TARGET:
            extra = "; ".join(e for e in (extra, f"the passes alone allow {t_theirs / t_floor:.3g}x") if e)
        rows.append({**row, "ours_s": t_ours, "ratio": ratio, "floor_s": t_floor, "target": target,
                     "met": ("yes" if met else "NO") + (f"; {extra}" if extra else ""),
                     "maxrel_fp64": err64, "maxrel_fp32": err32})
        print(f"  {name} {label}: theirs {t_theirs:.3g} s, ours {t_ours:.3g} s, {ratio:.3g}x "
              f"(forward and backward passes alone {t_floor:.3g} s: at most {t_theirs / t_floor:.3g}x), "
              f"max rel diff {err64:.2g} (fp64) {err32:.2g} (fp32)", flush=True)
    return rows


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=None, help="SGD steps before measuring (default 50, quick 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: on a shared 2-core machine two threads per "
                        "process oversubscribe and LAPACK calls slow down up to 100x)")
    p.add_argument("--cases", nargs="+", choices=("fnn", "vgg"), default=("fnn", "vgg"),
                   help="which of the authors' models to run (default both)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.device not in (None, "cpu"):
        print(f"bench_reference: runs on the CPU (the authors' loops copy every gradient to numpy); "
              f"ignoring --device {args.device}")
    n_fnn, n_vgg = (10, 4) if args.quick else (200, 100)
    steps = args.train_steps if args.train_steps is not None else (5 if args.quick else 50)
    repeat = 1 if args.quick else 3
    print(machine_line())
    print(load_line() + " (before)")
    peak, how = conv_peak_gflops(args.quick, repeat)
    print(f"fp32 conv peak: {peak:.3g} GFLOP/s ({how})")
    rows = [r for case, n in (("fnn", n_fnn), ("vgg", n_vgg)) if case in args.cases
            for r in bench_case(case, n, steps, repeat, peak)]
    print_table(rows, f"vs the authors' algorithm (one input at a time), float32 timings, {steps} SGD steps; "
                      "maxrel: values, fp64 run and fp32 run")
    print(load_line() + " (after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
