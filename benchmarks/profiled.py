"""Run a `jetmesh` CLI role under cProfile and dump the stats when it exits.

    python benchmarks/profiled.py OUT.pstats orchestrator
    python benchmarks/profiled.py OUT.pstats worker support

The roles stop gracefully on SIGTERM/SIGINT (their own signal handlers), after which the
stats are written to OUT.pstats. Used by `benchmarks/fanout.py --profile cprofile`.
Read them with `python benchmarks/profiled.py --top OUT.pstats`.
"""

from __future__ import annotations

import cProfile
import pstats
import sys


def top(path: str, n: int = 25) -> None:
    st = pstats.Stats(path)
    total = st.total_tt  # type: ignore[attr-defined]
    print(f"{path}: {total:.2f} s profiled CPU+wait in Python frames")
    st.sort_stats("cumulative").print_stats(n)
    st.sort_stats("tottime").print_stats(n)


def main() -> None:
    if sys.argv[1] == "--top":
        for p in sys.argv[2:]:
            top(p)
        return
    out = sys.argv[1]
    sys.argv = ["jetmesh", *sys.argv[2:]]
    from jetmesh.orchestrator.cli import main as cli_main

    prof = cProfile.Profile()
    prof.enable()
    try:
        cli_main()
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
