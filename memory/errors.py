"""Errors raised by the jetmesh memory store.

The tree::

    MemoryStoreError                 base of every memory-store error
    ├── EmbeddingDimensionMismatch   the collection holds vectors of another size
    ├── MemoryInferenceDisabled      fact extraction asked for, but no LLM is configured
    └── MemoryNotFound               no memory (or episode) with that id

Every error carries its facts as attributes so that a bus handler can map it to a
reply without parsing the message.
"""

from __future__ import annotations


class MemoryStoreError(Exception):
    """Base class of every error raised by `jetmesh.memory`."""


class EmbeddingDimensionMismatch(MemoryStoreError):
    """The existing collection was built with another embedding size.

    Raised when the store opens, before mem0 touches the collection, so that vectors
    of two sizes never mix in one collection.
    """

    def __init__(self, collection: str, expected: int, got: int) -> None:
        self.collection = collection
        """Name of the Qdrant collection."""
        self.expected = expected
        """Vector size the existing collection was created with."""
        self.got = got
        """Vector size of the embedder chosen now."""
        super().__init__(
            f"collection {collection!r} holds {expected}-dimensional vectors but the "
            f"configured embedder produces {got}; use the embedder the collection was "
            f"built with, or another collection name"
        )


class MemoryInferenceDisabled(MemoryStoreError):
    """Fact extraction needs an LLM and none is configured (or infer is switched off)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        """Why inference is off."""
        super().__init__(f"memory inference is disabled: {reason}")


class MemoryNotFound(MemoryStoreError):
    """No memory has this id."""

    def __init__(self, memory_id: str) -> None:
        self.memory_id = memory_id
        """The id that was looked up."""
        super().__init__(f"no memory with id {memory_id!r}")
