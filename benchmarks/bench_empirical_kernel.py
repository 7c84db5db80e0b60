"""Monte-Carlo NNGP kernel throughput (images x networks per second), against a plain forward pass.

``empirical_nngp_kernel`` for ``resnet50_cifar`` (32x32 inputs, the paper's ResNet-50 kernel) and for a
small model (FCN 3072-512-512-1 and SmallVGG). Baseline measured in the same run: forward passes of
already-built networks over the same inputs (no initialisation, no hook, no K accumulation); the ratio
shows what fresh initialisation and the (N, N) float64 accumulation cost on top.

    python benchmarks/bench_empirical_kernel.py [--quick] [--device cuda]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, parser, peak_rss_mib, print_table, sync  # noqa: E402

from flatness._device import resolve_device  # noqa: E402
from flatness.models import FCN, SmallVGG, resnet50_cifar  # noqa: E402
from flatness.prior.kernels import empirical_nngp_kernel  # noqa: E402


def _factories():
    def resnet(seed):
        torch.manual_seed(seed)
        return resnet50_cifar(num_classes=1)

    def fcn(seed):
        return FCN((3072, 512, 512, 1), seed=seed)

    def vgg(seed):
        torch.manual_seed(seed)
        return SmallVGG(num_classes=1)

    return {"resnet50_cifar": resnet, "FCN 3072-512-512-1": fcn, "SmallVGG": vgg}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    print(machine_line())
    sizes = {"resnet50_cifar": (8, 2) if args.quick else (256, 4),
             "FCN 3072-512-512-1": (256, 2) if args.quick else (2048, 16),
             "SmallVGG": (64, 2) if args.quick else (1024, 8)}
    batch = 64 if device.type == "cpu" else 256
    rows = []
    for name, factory in _factories().items():
        n, m = sizes[name]
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        empirical_nngp_kernel(factory, x[:2], n_samples=1, batch_size=batch, device=device, progress=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        K = empirical_nngp_kernel(factory, x, n_samples=m, sigma_w=math.sqrt(2.0), sigma_b=1.0, batch_size=batch,
                                  device=device, progress=False)
        sync(device)
        t_kernel = time.perf_counter() - t0
        assert K.shape == (n, n) and bool(torch.isfinite(K).all())
        # baseline: forward passes only, networks built beforehand
        nets = [factory(i).to(device).eval() for i in range(m)]
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for net in nets:
                for i in range(0, n, batch):
                    net(x[i:i + batch].to(device))
        sync(device)
        t_fwd = time.perf_counter() - t0
        del nets
        rows.append({"model": name, "N": n, "samples": m, "kernel_s": t_kernel,
                     "kernel_img_x_net_per_s": n * m / t_kernel, "forward_img_x_net_per_s": n * m / t_fwd,
                     "ratio_kernel/forward": t_fwd / t_kernel})
    print_table(rows, title=f"empirical NNGP kernel throughput ({device})")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
