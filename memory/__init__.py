"""jetmesh.memory: episodic and semantic memory of agents, over mem0 and Qdrant.

mem0 and qdrant-client (over a second to import) load only when a store opens.
"""

from jetmesh.memory.client import MemoryClient
from jetmesh.memory.embedders import EmbedderChoice, HashingEmbedder, choose_embedder
from jetmesh.memory.errors import (
    EmbeddingDimensionMismatch,
    MemoryInferenceDisabled,
    MemoryNotFound,
    MemoryRequestFailed,
    MemoryServiceError,
    MemoryServiceUnavailable,
    MemoryStoreError,
)
from jetmesh.memory.models import (
    EpisodeRecord,
    ForgetReport,
    MemoryItem,
    MemoryKind,
    episode_id_for,
)
from jetmesh.memory.settings import MemorySettings
from jetmesh.memory.store import MemoryStore

__all__ = [
    "EmbedderChoice",
    "EmbeddingDimensionMismatch",
    "EpisodeRecord",
    "ForgetReport",
    "HashingEmbedder",
    "MemoryClient",
    "MemoryInferenceDisabled",
    "MemoryItem",
    "MemoryKind",
    "MemoryNotFound",
    "MemoryRequestFailed",
    "MemoryServiceError",
    "MemoryServiceUnavailable",
    "MemorySettings",
    "MemoryStore",
    "MemoryStoreError",
    "choose_embedder",
    "episode_id_for",
]
