"""Embedder choice and the offline hashing embedder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import jetmesh.memory as memory
from jetmesh.memory import HashingEmbedder, MemorySettings, choose_embedder
from jetmesh.memory.embedders import fastembed_choice


def cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))


def test_hashing_embedder_is_deterministic_normalised_and_word_sensitive() -> None:
    e = HashingEmbedder(256)
    v = e.embed("Book a flight to Paris")
    assert v == HashingEmbedder(256).embed("Book a flight to Paris")
    assert len(v) == 256
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    near = cos(v, e.embed("flights to Paris, please"))
    far = cos(v, e.embed("summarise the quarterly sales report"))
    assert near > 0.5 > far
    assert e.embed("") == [0.0] * 256
    assert e.name == "jetmesh-hash-256"


def test_auto_prefers_openai_when_keyed(tmp_path: Path) -> None:
    s = MemorySettings(data_dir=tmp_path, openai_api_key="sk-test")
    choice = choose_embedder(s)
    assert (choice.provider, choice.dims) == ("openai", 1536)


def test_auto_falls_back_to_hashing_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = MemorySettings(data_dir=tmp_path, openai_api_key=None, hash_dims=128)
    with caplog.at_level(logging.INFO, logger="jetmesh.memory.embedders"):
        choice = choose_embedder(s)
    assert (choice.kind, choice.dims, choice.name) == ("hash", 128, "jetmesh-hash-128")


def test_fastembed_is_skipped_with_a_log_line_when_unusable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="jetmesh.memory.embedders"):
        assert fastembed_choice("BAAI/bge-small-en-v1.5", cache_dir=tmp_path) is None
    assert "skipping" in caplog.text
    with pytest.raises(ValueError, match="fastembed"):
        choose_embedder(MemorySettings(data_dir=tmp_path, embedder="fastembed"))


def test_public_surface_is_sorted_and_complete() -> None:
    assert memory.__all__ == sorted(memory.__all__)
    assert all(hasattr(memory, name) for name in memory.__all__)
