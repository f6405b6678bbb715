"""The dashboard's mesh: a nats-server of its own, the orchestrator, two agents (one with a
gated refund, one whose model waits for the test) and the real gateway serving /ui."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ui_support import (
    REFUNDER,
    TOKENS,
    TRACE_URL,
    WAITER,
    Gates,
    UiMesh,
    one_step,
    refunding,
    two_steps,
)

from jetmesh.a2a.gateway import GatewayServer, GatewaySettings
from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_buckets, declare_streams
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A server of the module's own: its ledger holds only these tests' tasks."""
    server = EmbeddedNats(data_dir=Path(tmp_path_factory.mktemp("ui-nats")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def ui_mesh(ui_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[UiMesh]:
    data_dir = Path(tmp_path_factory.mktemp("ui-data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETMESH_DATA_DIR", str(data_dir))
        mp.setenv("JETMESH_UI_TOKENS", TOKENS)
        mp.setenv("JETMESH_UI_HEARTBEAT_S", "1")
        mp.setenv("JETMESH_UI_TRACE_URL", TRACE_URL)
        nc = await connect(ui_server.url)
        js = jetstream(nc)
        await declare_streams(js)
        await declare_buckets(js)
        orch = Orchestrator(nc, js, model=SimModel(),
                            settings=OrchestratorSettings(no_agent_wait_s=60, tick_s=0.1))
        for wf in (one_step("refund_ui", "refund_ui"), one_step("wait_ui", "wait_ui"),
                   two_steps("wait2_ui", "wait_ui")):
            orch.workflows.add(wf)
        await orch.start()
        gates = Gates()
        workers = [Worker(REFUNDER, FunctionModel(refunding, name="refunding"), nc, js,
                          replica="refunder-ui"),
                   Worker(WAITER, FunctionModel(gates.model, name="gated"), nc, js,
                          replica="waiter-ui")]
        for w in workers:
            await w.start()
        gateway = GatewayServer(ui_server.url, settings=GatewaySettings(port=0))
        base = await gateway.start()
        client = Client(ui_server.url)
        await client.connect()
        mesh = UiMesh(ui_server.url, base, client, gates, data_dir, gateway)
        try:
            yield mesh
        finally:
            for g in gates.opened.values():
                g.set()
            await client.close()
            await mesh.dashboard().stop()
            await gateway.stop()
            for w in workers:
                await w.stop(grace_s=1)
            await orch.stop()
            await nc.close()
