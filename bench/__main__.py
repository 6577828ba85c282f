"""`python -m bench [NAME ...]` (`make bench`): run the benchmarks, print their tables, update results.json.

Each name is a module of this package with a ``main()`` that prints its table and calls
``bench.common.record``. With no names, every module in ``BENCHMARKS`` runs, in order; ``gpu``
is not among them (it needs a CUDA GPU): run it as ``python -m bench gpu``.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ["overhead", "engine", "batching", "submit", "watch", "quality"]
OPTIONAL = ["gpu"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = [name for name in names if name not in BENCHMARKS + OPTIONAL]
    if unknown:
        print(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS + OPTIONAL)}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        started = time.monotonic()
        print(f"\n=== bench {name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main()
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
