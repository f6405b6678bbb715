"""Embedders for the memory store: an offline hashing embedder, OpenAI and fastembed.

`choose_embedder` picks one from `MemorySettings` and returns an `EmbedderChoice`: the
mem0 embedder provider and config, and the vector size the collection must have. The
choice is data; the store hands it to mem0, which builds the embedder itself.

The offline `HashingEmbedder` is pure numpy and needs no model weights: it hashes the
words and character trigrams of a text into a fixed number of signed buckets and
L2-normalises the result, so texts that share words (or word stems) have a high cosine
similarity. It is a stand-in that keeps jetmesh working without a network, not a
semantic model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from jetmesh.memory.settings import MemorySettings

logger = logging.getLogger(__name__)

HASH_EMBEDDER_NAME = "jetmesh-hash"
"""Family name of the offline embedder; the full name carries its size, e.g. jetmesh-hash-256."""

HASH_PROVIDER = "jetmesh_hash"
"""Name under which the offline embedder is registered in mem0's EmbedderFactory."""

OPENAI_DIMS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
"""Vector sizes of the OpenAI embedding models jetmesh knows."""

FASTEMBED_DIMS: dict[str, int] = {
    "BAAI/bge-small-en-v1.5": 384,
    "BAAI/bge-base-en-v1.5": 768,
    "sentence-transformers/all-MiniLM-L6-v2": 384,
}
"""Vector sizes of the fastembed models jetmesh knows."""

_WORD = re.compile(r"\w+", re.UNICODE)
_warned_offline = False


class HashingEmbedder:
    """Deterministic offline embedder: signed feature hashing of words and trigrams.

    Same text, same vector, in every process (crc32, not Python's salted `hash`).
    """

    def __init__(self, dims: int = 256) -> None:
        if dims < 8:
            raise ValueError(f"hashing embedder needs at least 8 dimensions, got {dims}")
        self.dims = dims
        """Length of every vector."""

    @property
    def name(self) -> str:
        """Name with size, e.g. ``jetmesh-hash-256``."""
        return f"{HASH_EMBEDDER_NAME}-{self.dims}"

    def embed(self, text: str) -> list[float]:
        """Return the L2-normalised vector of `text` (all zeros for a text with no words)."""
        vec = np.zeros(self.dims, dtype=np.float32)
        for word in _WORD.findall(text.lower()):
            self._add(vec, b"w:" + word.encode(), 1.0)
            padded = f"#{word}#"
            for i in range(len(padded) - 2):
                self._add(vec, b"t:" + padded[i : i + 3].encode(), 0.5)
        norm = float(np.linalg.norm(vec))
        if norm > 0.0:
            vec /= norm
        return [float(x) for x in vec]

    def _add(self, vec: np.ndarray[Any, np.dtype[np.float32]], feature: bytes, w: float) -> None:
        h = zlib.crc32(feature)
        vec[h % self.dims] += w if (h >> 31) & 1 else -w


class EmbedderChoice(BaseModel):
    """The embedder the store will use: what to tell mem0, and the vector size."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Human name, e.g. ``jetmesh-hash-256`` or ``openai/text-embedding-3-small``."""
    kind: Literal["hash", "openai", "fastembed"]
    """Which family."""
    provider: str
    """mem0 EmbedderFactory provider name."""
    config: dict[str, Any]
    """mem0 embedder config dict (passed to mem0's BaseEmbedderConfig)."""
    dims: int
    """Vector size; the Qdrant collection must have exactly this size."""


def hash_choice(dims: int) -> EmbedderChoice:
    """The offline hashing embedder of `dims` dimensions."""
    global _warned_offline
    embedder = HashingEmbedder(dims)
    if not _warned_offline:
        _warned_offline = True
        logger.warning(
            "memory: using the offline hashing embedder (%s); set OPENAI_API_KEY for real "
            "embeddings",
            embedder.name,
        )
    return EmbedderChoice(
        name=embedder.name,
        kind="hash",
        provider=HASH_PROVIDER,
        config={"embedding_dims": dims},
        dims=dims,
    )


def openai_choice(api_key: str, model: str, base_url: str | None = None) -> EmbedderChoice:
    """OpenAI embeddings through mem0's own ``openai`` embedder."""
    dims = OPENAI_DIMS.get(model)
    if dims is None:
        raise ValueError(f"unknown OpenAI embedding model {model!r}; known: {sorted(OPENAI_DIMS)}")
    config: dict[str, Any] = {"model": model, "api_key": api_key, "embedding_dims": dims}
    if base_url:
        config["openai_base_url"] = base_url
    return EmbedderChoice(
        name=f"openai/{model}", kind="openai", provider="openai", config=config, dims=dims
    )


def fastembed_cache_dir() -> Path:
    """Where fastembed keeps downloaded models (its own default rule)."""
    env = os.environ.get("FASTEMBED_CACHE_PATH")
    return Path(env) if env else Path(tempfile.gettempdir()) / "fastembed_cache"


def fastembed_choice(model: str, cache_dir: Path | None = None) -> EmbedderChoice | None:
    """fastembed through mem0's ``fastembed`` embedder, or None (logged) when unusable.

    Usable means: the package imports, the model's vector size is known, and the model
    is already in the local cache, because nothing may download weights at run time.
    """
    if importlib.util.find_spec("fastembed") is None:
        logger.info("memory: fastembed is not installed; skipping it")
        return None
    dims = FASTEMBED_DIMS.get(model)
    if dims is None:
        logger.info("memory: fastembed model %r has no known size; skipping it", model)
        return None
    cache = cache_dir or fastembed_cache_dir()
    stem = model.rsplit("/", 1)[-1].lower()
    cached = cache.is_dir() and any(stem in p.name.lower() for p in cache.iterdir())
    if not cached:
        logger.info("memory: fastembed model %r is not cached in %s; skipping it", model, cache)
        return None
    return EmbedderChoice(
        name=f"fastembed/{model}",
        kind="fastembed",
        provider="fastembed",
        config={"model": model, "embedding_dims": dims},
        dims=dims,
    )


def choose_embedder(settings: MemorySettings) -> EmbedderChoice:
    """Pick the embedder named by `settings.embedder`.

    ``auto`` prefers OpenAI when OPENAI_API_KEY is set, then a cached fastembed model,
    then the offline hashing embedder. An explicit choice that cannot work is an error,
    not a silent fallback, because the vector size decides the collection.
    """
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    wanted = settings.embedder
    if wanted == "hash":
        return hash_choice(settings.hash_dims)
    if wanted == "openai":
        if not key:
            raise ValueError("embedder 'openai' needs OPENAI_API_KEY")
        return openai_choice(key, settings.openai_embedding_model, settings.openai_base_url)
    if wanted == "fastembed":
        choice = fastembed_choice(settings.fastembed_model)
        if choice is None:
            raise ValueError(
                f"embedder 'fastembed' is not usable (package missing or model "
                f"{settings.fastembed_model!r} not cached); see the log"
            )
        return choice
    if key:
        return openai_choice(key, settings.openai_embedding_model, settings.openai_base_url)
    return fastembed_choice(settings.fastembed_model) or hash_choice(settings.hash_dims)
