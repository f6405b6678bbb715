"""The planner of a tenant's task is offered the shared agents' skills and the tenant's
own private agents', never another tenant's private agent's (a plan using it would wait
on a subject no agent of this tenant serves, and would tell the tenant it exists)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from jetmesh.agents.models.types import ModelRequest, ModelResponse
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.orchestrator.testing import memory_mesh


class In(BaseModel):
    q: str


def agent(name: str, skill: str, tenants: list[str] | None = None) -> AgentSpec:
    return AgentSpec(name=name, description=name, tenants=tenants,
                     skills=[SkillSpec.from_models(skill, skill, skill, input_model=In)])


class Offered:
    """A planner that notes the skills it was offered and plans the shared one."""

    provider, name = "sim", "offered"

    def __init__(self) -> None:
        self.offered: list[list[str]] = []

    async def complete(self, request: ModelRequest) -> ModelResponse:
        catalogue = json.loads(request.messages[0].content)["skills"]
        self.offered.append(sorted(s["skill"] for s in catalogue))
        plan = {"steps": [{"id": "s1", "skill": "shared_lookup", "input": {"q": "x"}}]}
        return ModelResponse(provider=self.provider, model=self.name, text=json.dumps(plan))

    async def aclose(self) -> None:
        pass


async def test_a_tenant_is_offered_its_own_private_skills_not_another_tenants() -> None:
    planner = Offered()
    m = memory_mesh([agent("shared", "shared_lookup"),
                     agent("acme-only", "acme_ledger", ["acme"]),
                     agent("globex-only", "globex_ledger", ["globex"])], planner=planner)
    for tenant in ("acme", "globex", None):
        tid = f"t-{tenant}"
        await m.ledger.append(ev.TaskSubmitted(
            id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(
                goal="look it up", tenant=tenant)), expected_last_subject_seq=0)
        await m.orchestrator.drive(tid)
    assert planner.offered == [["acme_ledger", "shared_lookup"],
                               ["globex_ledger", "shared_lookup"],
                               ["shared_lookup"]]
