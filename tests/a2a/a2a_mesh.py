"""An in-process mesh for the gateway tests: orchestrator, workers, gateway."""

from __future__ import annotations

from dataclasses import dataclass, field

from jetmesh.a2a.gateway import GatewayServer, GatewaySettings
from jetmesh.a2a.tasks import SKILL_WORKFLOW_PREFIX
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import Model
from jetmesh.agents.signing import CardSigner, CardVerifier
from jetmesh.agents.spec import AgentSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry, builtin_registry


class SkillWorkflows(WorkflowRegistry):
    """``skill:<id>`` is a one-step workflow running that skill on the task input.

    (What the gateway's ``skill`` metadata relies on; proposed for the orchestrator.)
    """

    def get(self, name: str) -> Workflow | None:
        if name.startswith(SKILL_WORKFLOW_PREFIX):
            skill = name[len(SKILL_WORKFLOW_PREFIX):]
            return Workflow(name=name, steps=[
                PlanStep(id="main", skill=skill, input={"$ref": "task.input"})])
        return super().get(name)


def skill_workflows() -> SkillWorkflows:
    reg = SkillWorkflows()
    base = builtin_registry()
    for name in base.names():
        wf = base.get(name)
        assert wf is not None
        reg.add(wf)
    return reg


@dataclass
class Mesh:
    url: str
    agents: list[AgentSpec]
    signer: CardSigner | None = None
    verifier: CardVerifier | None = None
    extra_workers: list[Worker] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)
    """A model per agent name (default: the agent's own, none for direct skills)."""
    gateway_settings: GatewaySettings | None = None
    planner: Model | None = None
    """The orchestrator's planning model (default: SimModel)."""
    base: str = ""
    """The gateway's base URL, once started."""

    async def start(self) -> str:
        self.nc = await connect(self.url)
        js = jetstream(self.nc)
        self.orch = Orchestrator(
            self.nc, js, model=self.planner or SimModel(), workflows=skill_workflows(),
            settings=OrchestratorSettings(no_agent_wait_s=60, tick_s=0.1, agent_ttl_s=3))
        await self.orch.start()
        self.workers = [Worker(spec, self.models.get(spec.name), self.nc, js,
                               heartbeat_s=0.5) for spec in self.agents]
        for w in self.workers:
            await w.start()
        self.gateway = GatewayServer(self.url, settings=self.gateway_settings or GatewaySettings(
                                         port=0, agent_ttl_s=3, send_wait_s=15),
                                     signer=self.signer, verifier=self.verifier)
        self.base = await self.gateway.start()
        return self.base

    async def stop(self) -> None:
        await self.gateway.stop()
        for w in self.workers + self.extra_workers:
            await w.stop(grace_s=1)
        await self.orch.stop()
        await self.nc.close()
