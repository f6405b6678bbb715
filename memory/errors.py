"""Errors raised by the jetmesh memory store.

The tree::

    MemoryStoreError                 base of every memory-store error
    ├── EmbeddingDimensionMismatch   the collection holds vectors of another size
    ├── MemoryInferenceDisabled      fact extraction asked for, but no LLM is configured
    ├── MemoryNotFound               no memory (or episode) with that id
    └── MemoryServiceError           talking to the memory service over NATS failed
        ├── MemoryServiceUnavailable no memory service answered (not running, or too slow)
        └── MemoryRequestFailed      the service answered with an error reply

A client turns error replies whose code names a store error (``not_found``,
``inference_disabled``) back into that error, so callers catch the same class whether
they hold a store or a client.

Every error carries its facts as attributes so that a bus handler can map it to a
reply without parsing the message.
"""

from __future__ import annotations

from jetmesh.bus.errors import JetmeshError


class MemoryStoreError(JetmeshError):
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


class MemoryServiceError(MemoryStoreError):
    """Base class of the errors of `jetmesh.memory.client.MemoryClient`."""


class MemoryServiceUnavailable(MemoryServiceError):
    """No memory service answered the request."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        """The request subject."""
        self.reason = reason
        """``no responders`` or ``timed out after Ns``."""
        super().__init__(
            f"memory service unavailable on {subject} ({reason}); is `jetmesh memory` running?"
        )


class MemoryRequestFailed(MemoryServiceError):
    """The memory service refused or failed a request; `code` says which way."""

    def __init__(self, code: str, message: str, details: list[dict[str, object]] | None = None
                 ) -> None:
        self.code = code
        """Machine-readable: invalid_request, not_found, inference_disabled, store_error,
        internal."""
        self.message = message
        """What went wrong, for people."""
        self.details = details or []
        """Per-field validation errors of an invalid request."""
        super().__init__(f"memory service error [{code}]: {message}")
