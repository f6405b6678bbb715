"""Top functions from py-spy raw (collapsed-stack) output: self and cumulative share.

    .venv/bin/python benchmarks/pyspy_top.py benchmarks/profiles/orchestrator-*.txt [-n 25]

py-spy records only active samples by default (not idle threads), so the shares are of
the process's busy time. Functions are keyed by name and file (line numbers dropped);
cumulative counts a function once per sample however often it appears on the stack.
`--group` folds frames into coarse buckets (pydantic, jsonschema, nats-py, asyncio,
jetmesh module) to see where a process spends its time by library.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    f = f.removeprefix("main/")  # py-spy shortens /work/main/x.py to main/x.py
    return f"{m.group('fn')} ({f})"


def bucket(frame: str) -> str:
    k = key(frame)
    f = k[k.rfind("(") + 1:-1]
    if f.startswith("pydantic"):
        return "pydantic"
    if f.startswith(("jsonschema", "referencing", "rpds")):
        return "jsonschema"
    if f.startswith("nats/"):
        return "nats-py"
    if f.startswith("asyncio/"):
        return "asyncio"
    if f.startswith(("json/", "copy.py")):
        return "stdlib json/copy"
    if f.startswith(("logging", "rich")):
        return "logging"
    for part in ("bus/", "orchestrator/", "agents/", "benchmarks/"):
        if f.startswith(part):
            return "jetmesh " + f.removesuffix(".py")
    return "other: " + f


def load(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        out.append((frames, int(n)))
    return out


def report(path: Path, n: int, group: bool) -> None:
    samples = load(path)
    total = sum(c for _, c in samples)
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    own_b: Counter[str] = Counter()
    for frames, c in samples:
        if not frames:
            continue
        own[key(frames[-1])] += c
        own_b[bucket(frames[-1])] += c
        for k in {key(f) for f in frames}:
            cum[k] += c
    print(f"\n{path.name}: {total} samples")
    print(f"{'cum %':>6} {'self %':>6}  function (cumulative order)")
    skip = ("<module>", "run (asyncio", "run_forever", "_run_once", "_run (asyncio",
            "run_until_complete", "main (", "__call__ (click", "invoke (click", "_main (",
            "_run_module", "run (orchestrator/cli", "_run_code", "runner.run", "(typer/",
            "orchestrator_cmd (", "worker_cmd (", "_serve_until_signal (")
    shown = 0
    for k, c in cum.most_common():
        if any(s in k for s in skip):
            continue
        print(f"{100 * c / total:6.1f} {100 * own[k] / total:6.1f}  {k}")
        shown += 1
        if shown >= n:
            break
    print(f"{'self %':>6}  function (self order)")
    for k, c in own.most_common(n):
        print(f"{100 * c / total:6.1f}  {k}")
    if group:
        print(f"{'self %':>6}  library / module (self time)")
        for k, c in own_b.most_common(20):
            print(f"{100 * c / total:6.1f}  {k}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("-n", type=int, default=25)
    p.add_argument("--group", action="store_true")
    a = p.parse_args()
    for f in a.files:
        report(f, a.n, a.group)


if __name__ == "__main__":
    main()
