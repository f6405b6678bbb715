"""A scripted model for forks (`sim:replay_fork_models:loud`): the dry-run sim's answers
with `[simulated model]` turned into `[loud]`, counting its calls."""

from __future__ import annotations

import json

from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.models.types import ModelRequest, ModelResponse

CALLS: list[ModelRequest] = []


class LoudModel(SimModel):
    async def complete(self, request: ModelRequest) -> ModelResponse:
        CALLS.append(request)
        response = await super().complete(request)
        text = response.text.replace("[simulated model]", "[loud]")
        return response.model_copy(update={"text": text, "model": "loud"})


def loud() -> LoudModel:
    return LoudModel(name="loud")


LAZY_CALLS: list[ModelRequest] = []


def _lazy_turn(request: ModelRequest) -> str:
    LAZY_CALLS.append(request)
    return json.dumps({"answer": "I cannot tell.", "order": None})


def lazy() -> FunctionModel:
    """A support model of known (bad) behaviour: answers at once, never looks anything up."""
    return FunctionModel(_lazy_turn, name="lazy")
