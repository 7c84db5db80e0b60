"""Run every benchmark: ``python benchmarks/run.py [--quick] [--only NAME]``.

Each ``bench_*.py`` beside this file exposes ``main(argv)``; each prints its own table of measured
throughputs and of ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds), as CI's smoke check")
    p.add_argument("--only", default=None, help="substring of the benchmark file names to run")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    names = sorted(f.stem for f in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if args.only in n]
    from _common import machine_line

    print(machine_line())
    for name in names:
        print(f"\n######## {name} ########", flush=True)
        mod = importlib.import_module(name)
        sub = (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
        mod.main(sub)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
