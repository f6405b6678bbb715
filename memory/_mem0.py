"""The mem0 side of the store: providers registered with mem0 and the Memory factory.

Imported only when a store opens, because importing mem0 (and qdrant-client) takes
over a second.

How the offline embedder reaches mem0: mem0 2.2.1 builds its embedder through
``EmbedderFactory.create(provider, config)``, which looks the provider up in the class
dict ``EmbedderFactory.provider_to_class`` (dotted class paths). There is no
``register_provider`` for embedders (the LLM factory has one), so we add our entry to
that dict. ``EmbedderConfig`` (and ``LlmConfig``) also validate the provider name
against a hard-coded list, so the config object for a jetmesh provider is built with
``model_construct`` (no validation), which pydantic then accepts as-is inside
``MemoryConfig``. mem0 itself then constructs and owns the embedder; nothing is swapped
after construction.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from mem0.configs.base import MemoryConfig
from mem0.configs.embeddings.base import BaseEmbedderConfig
from mem0.configs.llms.base import BaseLlmConfig
from mem0.embeddings.base import EmbeddingBase
from mem0.embeddings.configs import EmbedderConfig
from mem0.llms.base import LLMBase
from mem0.llms.configs import LlmConfig
from mem0.memory.main import Memory
from mem0.utils.factory import EmbedderFactory, LlmFactory
from mem0.vector_stores.configs import VectorStoreConfig

from jetmesh.memory.embedders import HASH_PROVIDER, EmbedderChoice, HashingEmbedder
from jetmesh.memory.errors import MemoryInferenceDisabled

DISABLED_LLM_PROVIDER = "jetmesh_disabled"
"""LLM provider mem0 gets when no LLM is configured: it refuses every call."""

_MEM0_BUILTIN_LLMS = frozenset(LlmFactory.provider_to_class) - {DISABLED_LLM_PROVIDER}


class HashingMem0Embedding(EmbeddingBase):  # type: ignore[misc]
    """mem0 embedder backed by `HashingEmbedder`."""

    def __init__(self, config: BaseEmbedderConfig | None = None) -> None:
        super().__init__(config)
        dims = getattr(self.config, "embedding_dims", None) or 256
        self._embedder: HashingEmbedder = HashingEmbedder(int(dims))

    def embed(
        self, text: str, memory_action: Literal["add", "search", "update"] | None = None
    ) -> list[float]:
        vector: list[float] = self._embedder.embed(text)
        return vector


class DisabledLLM(LLMBase):  # type: ignore[misc]
    """Stands in for mem0's LLM when inference is off, so mem0 never builds an OpenAI client."""

    def __init__(self, config: BaseLlmConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)

    def generate_response(self, messages: Any, **kwargs: Any) -> str:
        raise MemoryInferenceDisabled("no LLM is configured for memory")


class ScriptedFactsConfig(BaseLlmConfig):  # type: ignore[misc]
    """Config of `ScriptedFactsLLM`: the facts it extracts from any input."""

    def __init__(self, facts: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.facts = list(facts or [])


class ScriptedFactsLLM(LLMBase):  # type: ignore[misc]
    """A real mem0 LLM for tests: every extraction call yields the configured facts.

    Use it with ``settings.llm = {"provider": "jetmesh_scripted", "config": {"facts":
    [...]}}``; the calls it received are in `calls`.
    """

    def __init__(self, config: ScriptedFactsConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, dict):
            config = ScriptedFactsConfig(**config)
        super().__init__(config or ScriptedFactsConfig())
        self.calls: list[Any] = []

    def generate_response(self, messages: Any, **kwargs: Any) -> str:
        self.calls.append(messages)
        return json.dumps({"memory": [{"text": f} for f in self.config.facts]})


SCRIPTED_LLM_PROVIDER = "jetmesh_scripted"
"""Provider name of `ScriptedFactsLLM`."""


def register_providers() -> None:
    """Make jetmesh's embedder and LLMs known to mem0's factories (idempotent)."""
    EmbedderFactory.provider_to_class[HASH_PROVIDER] = f"{__name__}.HashingMem0Embedding"
    LlmFactory.register_provider(DISABLED_LLM_PROVIDER, f"{__name__}.DisabledLLM")
    LlmFactory.register_provider(
        SCRIPTED_LLM_PROVIDER, f"{__name__}.ScriptedFactsLLM", ScriptedFactsConfig
    )
    from jetmesh.memory.llm import JETMESH_LLM_PROVIDER, JetmeshLLMConfig

    LlmFactory.register_provider(
        JETMESH_LLM_PROVIDER, "jetmesh.memory.llm.JetmeshLLM", JetmeshLLMConfig
    )


def _embedder_config(choice: EmbedderChoice) -> EmbedderConfig:
    if choice.provider in EmbedderFactory.provider_to_class and choice.provider != HASH_PROVIDER:
        return EmbedderConfig(provider=choice.provider, config=dict(choice.config))
    return EmbedderConfig.model_construct(provider=choice.provider, config=dict(choice.config))


def _llm_config(llm: dict[str, Any] | None) -> LlmConfig:
    if llm is None:
        return LlmConfig.model_construct(provider=DISABLED_LLM_PROVIDER, config={})
    provider = str(llm.get("provider", "openai"))
    config = dict(llm.get("config") or {})
    if provider in _MEM0_BUILTIN_LLMS:
        return LlmConfig(provider=provider, config=config)
    return LlmConfig.model_construct(provider=provider, config=config)


def build_memory(
    *,
    client: Any,
    collection: str,
    choice: EmbedderChoice,
    llm: dict[str, Any] | None,
    history_db_path: str,
) -> Memory:
    """A mem0 `Memory` over an already-open (and dimension-checked) Qdrant client."""
    register_providers()
    config = MemoryConfig(
        vector_store=VectorStoreConfig(
            provider="qdrant",
            config={
                "collection_name": collection,
                "embedding_model_dims": choice.dims,
                "client": client,
            },
        ),
        embedder=_embedder_config(choice),
        llm=_llm_config(llm),
        history_db_path=history_db_path,
    )
    return Memory(config)
