"""A real OTLP receiver process per test (tests/telemetry/otlp_receiver.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mesh_fixtures import make_mesh  # noqa: F401

from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.orchestrator.telemetry import TelemetryService

RECEIVER = Path(__file__).parent / "otlp_receiver.py"


@dataclass
class Receiver:
    proc: subprocess.Popen[str]
    port: int
    out: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def spans(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        text = self.out.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # the last piece may be a line still being written
        return [json.loads(x) for x in lines if x.strip()]

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans() if s["trace_id"] == trace_id]

    async def wait_for(self, pred: Any, timeout: float = 30.0, what: str = "spans") -> Any:
        """Poll the receiver's file until `pred(spans)` is truthy (its value)."""
        deadline = time.monotonic() + timeout
        while True:
            got = pred(self.spans())
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver never got {what}")
            await asyncio.sleep(0.05)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    out = tmp_path / "spans.jsonl"
    proc = subprocess.Popen([sys.executable, str(RECEIVER), "--port", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    rec = Receiver(proc, int(line.split()[1]), out)
    yield rec
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
async def telemetry(bus, receiver, monkeypatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "jetmesh-test")
    nc = await connect(bus.url)
    svc = TelemetryService(nc, jetstream(nc), durable=f"telemetry-t-{uuid.uuid4().hex[:8]}",
                           deliver_new=True)
    await svc.start()
    yield svc
    await svc.stop()
    await delete_durables(svc.js, svc.durable)
    await nc.close()


async def delete_durables(js: Any, durable: str) -> None:
    """The telemetry role's two durables (on the ledger and on the steps' logs)."""
    for stream in (subjects.STREAM_LEDGER, subjects.STREAM_LOG):
        try:
            await js.delete_consumer(stream, durable)
        except Exception:
            pass


