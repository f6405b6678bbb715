"""A scripted model for forks (`sim:replay_fork_models:loud`): the dry-run sim's answers
with `[sim]` turned into `[loud]`, counting its calls."""

from __future__ import annotations

from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import ModelRequest, ModelResponse

CALLS: list[ModelRequest] = []


class LoudModel(SimModel):
    async def complete(self, request: ModelRequest) -> ModelResponse:
        CALLS.append(request)
        response = await super().complete(request)
        return response.model_copy(update={"text": response.text.replace("[sim]", "[loud]"),
                                           "model": "loud"})


def loud() -> LoudModel:
    return LoudModel(name="loud")
