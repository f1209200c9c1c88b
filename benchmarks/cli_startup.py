#!/usr/bin/env python3
"""Median wall time of `pyiommufd --help` (and a few subcommands' --help).

    python benchmarks/cli_startup.py [-n RUNS] [ARGS...]

Each run is a fresh interpreter (`python -c "from pyiommufd.cli import main; main()" ARGS`),
so the figure includes interpreter start-up; the baseline line shows bare
`python -c pass` for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ENTRY = "from pyiommufd.cli import main; main()"


def measure(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=20)
    ap.add_argument("args", nargs="*", help="pyiommufd arguments (default: --help and each "
                    "subcommand's --help)")
    opts = ap.parse_args()
    cases = [opts.args] if opts.args else [
        ["--help"], ["selftest", "--help"], ["doctor", "--help"], ["devices", "--help"],
        ["vm", "--help"], ["vm", "run", "--help"]]
    base = measure([sys.executable, "-c", "pass"], opts.runs)
    print(f"{'python -c pass':32s} median {statistics.median(base) * 1e3:7.1f} ms "
          f"(min {min(base) * 1e3:.1f}, n={opts.runs})")
    for args in cases:
        t = measure([sys.executable, "-c", ENTRY, *args], opts.runs)
        label = "pyiommufd " + " ".join(args)
        print(f"{label:32s} median {statistics.median(t) * 1e3:7.1f} ms "
              f"(min {min(t) * 1e3:.1f}, n={opts.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
