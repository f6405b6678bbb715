"""`jetmesh health ROLE [AGENT]`: healthy only when the role really serves, one line why."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.server import EmbeddedNats, free_port
from jetmesh.bus.streams import declare_streams
from jetmesh.orchestrator.cli import health
from jetmesh.orchestrator.service import Orchestrator


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A stand-in for the jetmesh CLI."""

    health.register(app)
    return app


# ----------------------------------------------------------------------------- role parsing


@pytest.mark.parametrize(("argv", "want"), [
    (["/opt/jetmesh/bin/python", "/opt/jetmesh/bin/jetmesh", "worker", "researcher"],
     ("worker", "researcher")),
    (["jetmesh", "worker", "-v", "orders"], ("worker", "orders")),
    (["/usr/local/bin/jetmesh", "orchestrator", "-v"], ("orchestrator", None)),
    (["jetmesh", "gateway"], ("gateway", None)),
    (["jetmesh", "memory"], ("memory", None)),
    (["jetmesh", "submit", "hello"], None),
    (["sleep", "infinity"], None),
    ([], None),
])
def test_role_from_container_command_line(argv: list[str], want: Any) -> None:
    assert health.role_from_cmdline(argv) == want


def test_usage_errors_exit_2() -> None:
    runner = CliRunner()
    r = runner.invoke(cli(), ["health", "janitor"], env={"NATS_URL": "nats://127.0.0.1:1"})
    assert r.exit_code == 2, r.output
    assert "unknown role 'janitor'" in r.output
    r = runner.invoke(cli(), ["health", "worker"], env={"NATS_URL": "nats://127.0.0.1:1",
                                                         "JETMESH_AGENT": ""})
    assert r.exit_code == 2 and "needs AGENT" in r.output
    r = runner.invoke(cli(), ["health", "worker", "nobody"],
                      env={"NATS_URL": "nats://127.0.0.1:1"})
    assert r.exit_code == 2 and "unknown agent 'nobody'" in r.output


# ----------------------------------------------------------------------------- NATS roles


def test_unreachable_nats_is_unhealthy_fast() -> None:
    port = free_port()
    r = CliRunner().invoke(cli(), ["health", "orchestrator", "--timeout", "0.5"],
                           env={"NATS_URL": f"nats://127.0.0.1:{port}"})
    assert r.exit_code == 1, r.output
    assert r.output.startswith("unhealthy: orchestrator: cannot reach NATS")
    assert len(r.output.strip().splitlines()) == 1


def test_role_and_agent_from_environment(nats_server: EmbeddedNats) -> None:
    r = CliRunner().invoke(cli(), ["health"], env={"NATS_URL": nats_server.url,
                                                   "JETMESH_ROLE": "nats"})
    assert r.exit_code == 0, r.output
    assert r.output == f"healthy: JetStream answers at {nats_server.url}\n"


async def test_orchestrator_healthy_only_once_its_consumers_exist(
        fresh_server: EmbeddedNats) -> None:
    url = fresh_server.url
    nc = await connect(url)
    js = jetstream(nc)
    await declare_streams(js)
    try:
        before = await health.check("orchestrator", url=url, timeout_s=5.0)
        assert not before.ok
        assert "consumer orchestrator-submit on JM_TASKS does not exist" in before.reason
        orch = Orchestrator(nc, js, model=SimModel())
        await orch.start()
        try:
            after = await health.check("orchestrator", url=url, timeout_s=5.0)
            assert after.ok, after.reason
        finally:
            await orch.stop()
    finally:
        await nc.close()


async def test_worker_healthy_while_a_replica_on_this_host_heartbeats(
        fresh_server: EmbeddedNats) -> None:
    url = fresh_server.url
    nc = await connect(url)
    js = jetstream(nc)
    try:
        before = await health.check("worker", "support", url=url, timeout_s=5.0)
        assert not before.ok
        assert "consumer work-order_status on JM_WORK does not exist" in before.reason
        worker = Worker(get_agent("support"), SimModel(), nc, js, heartbeat_s=0.2)
        await worker.start()
        try:
            ok = await health.check("worker", "support", url=url, timeout_s=5.0)
            assert ok.ok, ok.reason
            assert "order_status, refund" in ok.reason
            # Another agent's consumers are not this one's.
            other = await health.check("worker", "researcher", url=url, timeout_s=5.0)
            assert not other.ok and "work-research" in other.reason
        finally:
            await worker.stop()
        # Stopped: the consumers remain (they are durable) but no replica heartbeats.
        gone = await health.check("worker", "support", url=url, timeout_s=5.0)
        assert not gone.ok
        assert "no replica registered on" in gone.reason
        # A heartbeat that went stale (a frozen or SIGKILLed replica) is unhealthy too.
        frozen = Worker(get_agent("support"), SimModel(), nc, js, heartbeat_s=60)
        await frozen.start()
        try:
            await asyncio.sleep(0.3)
            stale = await health.check("worker", "support", url=url, timeout_s=5.0,
                                       agent_ttl_s=0.2)
            assert not stale.ok and "last heartbeat" in stale.reason
            fresh = await health.check("worker", "support", url=url, timeout_s=5.0,
                                       any_host=True)
            assert fresh.ok, fresh.reason
        finally:
            await frozen.stop()
    finally:
        await nc.close()


async def test_memory_needs_a_responder(nats_server: EmbeddedNats) -> None:
    url = nats_server.url
    down = await health.check("memory", url=url, timeout_s=5.0)
    assert not down.ok
    assert down.reason == f"memory: no service answers on {subjects.memory('search')}"

    nc = await connect(url)
    try:
        async def answer(msg: Any) -> None:
            await msg.respond(json.dumps({"hits": []}).encode())

        sub = await nc.subscribe(subjects.memory("search"), queue="memory", cb=answer)
        await nc.flush()
        up = await health.check("memory", url=url, timeout_s=5.0)
        assert up.ok and up.reason.endswith("answers"), up.reason
        await sub.unsubscribe()

        async def busy(msg: Any) -> None:  # subscribed but never answers in time
            return None

        sub = await nc.subscribe(subjects.memory("search"), queue="memory", cb=busy)
        await nc.flush()
        slow = await health.check("memory", url=url, timeout_s=0.3)
        assert slow.ok and "has responders" in slow.reason, slow.reason
        await sub.unsubscribe()
    finally:
        await nc.close()


# ----------------------------------------------------------------------------- gateway


class _CardHandler(BaseHTTPRequestHandler):
    card: dict[str, Any] | None = {"name": "jetmesh-gateway", "skills": []}

    def do_GET(self) -> None:
        if self.path != "/.well-known/agent-card.json" or self.card is None:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(self.card).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def card_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CardHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def test_gateway_serves_its_card(card_server: ThreadingHTTPServer) -> None:
    port = card_server.server_address[1]
    r = CliRunner().invoke(cli(), ["health", "gateway"], env={"JETMESH_GATEWAY_PORT": str(port)})
    assert r.exit_code == 0, r.output
    assert r.output.startswith("healthy: gateway serves the card of 'jetmesh-gateway'")


def test_gateway_down_or_wrong_is_unhealthy(card_server: ThreadingHTTPServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(cli(), ["health", "gateway", "--timeout", "0.5"],
                           env={"JETMESH_GATEWAY_PORT": str(free_port())})
    assert r.exit_code == 1 and "ConnectError" in r.output, r.output
    monkeypatch.setattr(_CardHandler, "card", None)
    port = card_server.server_address[1]
    r = CliRunner().invoke(cli(), ["health", "gateway"], env={"JETMESH_GATEWAY_PORT": str(port)})
    assert r.exit_code == 1 and "returned 404" in r.output, r.output
