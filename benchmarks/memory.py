"""Memory store latency: add and search p50/p99 at growing sizes, embedded Qdrant.

    .venv/bin/python benchmarks/memory.py --sizes 1000 10000

Fills one store through the public API (`add_episode`: one mem0 ``add(infer=False)``
per episode, each with its idempotency check; no bulk path) with the offline hashing
embedder. Add latency is measured over the last 10% of each fill (so it reflects the
store at about that size), then search latency over `--queries` queries, unscoped and
scoped to one user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jetmesh.memory import EpisodeRecord, MemorySettings, MemoryStore

WORDS = [
    "flight",
    "hotel",
    "invoice",
    "report",
    "budget",
    "customer",
    "refund",
    "contract",
    "meeting",
    "agenda",
    "deploy",
    "incident",
    "database",
    "query",
    "latency",
    "cache",
    "queue",
    "retry",
    "timeout",
    "schema",
    "migration",
    "paris",
    "berlin",
    "tokyo",
    "quarterly",
    "sales",
    "forecast",
    "summary",
    "translate",
    "review",
    "approve",
    "draft",
    "email",
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


def episode(i: int, rng: random.Random) -> EpisodeRecord:
    return EpisodeRecord(
        task_id=f"task{i // 4}",
        step_id=f"s{i % 4}",
        request=" ".join(rng.choices(WORDS, k=8)),
        outcome=" ".join(rng.choices(WORDS, k=6)),
        user_id=f"user{i % 50}",
        agent_id=f"agent{i % 7}",
        ledger_seqs=[i],
    )


async def run(sizes: list[int], queries: int, data_dir: Path) -> None:
    settings = MemorySettings(data_dir=data_dir, embedder="hash", hash_dims=256)
    store = await MemoryStore.open(settings)
    rng = random.Random(7)
    n = 0
    print(
        f"{'size':>7} {'add p50':>9} {'add p99':>9} {'search p50':>11} {'search p99':>11} "
        f"{'scoped p50':>11} {'scoped p99':>11}   (ms)"
    )
    try:
        for size in sorted(sizes):
            adds: list[float] = []
            window = max(1, (size - n) // 10)
            t_fill = time.perf_counter()
            while n < size:
                e = episode(n, rng)
                t0 = time.perf_counter()
                await store.add_episode(e)
                dt = time.perf_counter() - t0
                n += 1
                if size - n < window:
                    adds.append(dt)
                if n % max(1, size // 20) == 0 or n == size:
                    rate = n / max(1e-9, time.perf_counter() - t_fill)
                    print(f"  filling {n}/{size} ({rate:.0f}/s)", file=sys.stderr, flush=True)
            search: list[float] = []
            scoped: list[float] = []
            for q in range(queries):
                text = " ".join(rng.choices(WORDS, k=4))
                t0 = time.perf_counter()
                await store.search(text, limit=5)
                search.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await store.search(text, user_id=f"user{q % 50}", limit=5)
                scoped.append(time.perf_counter() - t0)
            print(
                f"{size:>7} {pct(adds, 50):>9.1f} {pct(adds, 99):>9.1f} {pct(search, 50):>11.1f}"
                f" {pct(search, 99):>11.1f} {pct(scoped, 50):>11.1f} {pct(scoped, 99):>11.1f}"
                f"   fill {statistics.fmean(adds) * 1000:.1f} ms/add",
                flush=True,
            )
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.data_dir:
        asyncio.run(run(args.sizes, args.queries, args.data_dir))
        return
    with tempfile.TemporaryDirectory(prefix="jetmesh-bench-") as tmp:
        asyncio.run(run(args.sizes, args.queries, Path(tmp)))


if __name__ == "__main__":
    main()
