"""mem0's LLM through jetmesh's own model layer, so fact extraction uses the same models,
keys, retries and pricing as the agents.

mem0 calls its LLM synchronously, from the worker thread in which the store runs mem0
(`MemoryStore` never calls mem0 on the event loop). A jetmesh `Model` is async and owns
an HTTP client bound to the service's event loop, so `JetmeshLLM` submits each call to
that loop with `asyncio.run_coroutine_threadsafe` and waits for the answer.

Use `jetmesh_llm_settings(model, loop)` as `MemorySettings.llm`; `fact_model()` picks
the model: the configured provider when a model key is set, none on the dry-run sim.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mem0.configs.llms.base import BaseLlmConfig
from mem0.llms.base import LLMBase

from jetmesh.agents.models import Message, Model, ModelRequest

logger = logging.getLogger(__name__)

JETMESH_LLM_PROVIDER = "jetmesh"
"""Provider name of `JetmeshLLM` in mem0's LlmFactory."""

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""Output schema asked for when mem0 wants a JSON object (its prompt gives the shape)."""


class JetmeshLLMConfig(BaseLlmConfig):  # type: ignore[misc]
    """Config of `JetmeshLLM`: the jetmesh model, the loop it lives on, a timeout."""

    def __init__(
        self,
        jetmesh_model: Model | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.jetmesh_model = jetmesh_model
        """The model every call goes to."""
        self.loop = loop
        """The event loop owning the model; None runs each call in a fresh loop."""
        self.timeout_s = timeout_s
        """Longest wait for one call."""


class JetmeshLLM(LLMBase):  # type: ignore[misc]
    """A mem0 LLM that calls a jetmesh `Model` (`Model.complete`)."""

    def __init__(self, config: JetmeshLLMConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, dict):
            config = JetmeshLLMConfig(**config)
        super().__init__(config or JetmeshLLMConfig())
        if self.config.jetmesh_model is None:
            raise ValueError("the jetmesh mem0 LLM needs config 'jetmesh_model'")

    def generate_response(
        self,
        messages: list[dict[str, str]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str = "auto",
        **kwargs: Any,
    ) -> str:
        if tools:
            raise ValueError("jetmesh's mem0 LLM does not take tools")
        request = to_model_request(
            messages,
            json_object=(kwargs.get("response_format") or {}).get("type") == "json_object",
            max_tokens=int(self.config.max_tokens or 2000),
        )
        model: Model = self.config.jetmesh_model
        loop: asyncio.AbstractEventLoop | None = self.config.loop
        if loop is None:
            response = asyncio.run(model.complete(request))
        else:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("JetmeshLLM must be called off the event loop (in a thread)")
            future = asyncio.run_coroutine_threadsafe(model.complete(request), loop)
            response = future.result(timeout=self.config.timeout_s)
        text: str = response.text
        return text


def to_model_request(
    messages: list[dict[str, str]], *, json_object: bool = False, max_tokens: int = 2000
) -> ModelRequest:
    """mem0's chat messages as a jetmesh `ModelRequest` (system messages become `system`)."""
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    turns = [
        Message(role="assistant" if m.get("role") == "assistant" else "user",
                content=str(m.get("content", "")))
        for m in messages
        if m.get("role") != "system"
    ]
    if not turns:
        turns = [Message(role="user", content="")]
    return ModelRequest(
        system=system,
        messages=turns,
        output_schema=JSON_OBJECT_SCHEMA if json_object else None,
        max_tokens=max_tokens,
        temperature=0.0,
    )


def jetmesh_llm_settings(
    model: Model, loop: asyncio.AbstractEventLoop | None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """The `MemorySettings.llm` value that routes mem0's LLM calls to `model`."""
    return {
        "provider": JETMESH_LLM_PROVIDER,
        "config": {"jetmesh_model": model, "loop": loop, "timeout_s": timeout_s},
    }


def fact_model() -> tuple[Model | None, str]:
    """The model for fact extraction and a line saying which, or None and why not.

    A model is used only when a provider is configured (a key, a base URL, or
    JETMESH_MODEL_PROVIDER other than sim): the dry-run sim cannot extract facts.
    """
    from jetmesh.agents.models.factory import ModelSettings, create_model, default_provider

    settings = ModelSettings()
    provider = default_provider(settings)
    if provider == "sim":
        return None, "no model API key is configured (the agents run on the dry-run sim)"
    model = create_model(provider, settings.model, settings=settings)
    return model, f"{model.provider}/{model.name}"
