"""Fixtures for the agents tests: a tool context and an isolated data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from jetmesh.agents import ToolContext


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Built-in tools write under a per-test ``$JETMESH_DATA_DIR``."""
    path = tmp_path / "data"
    monkeypatch.setenv("JETMESH_DATA_DIR", str(path))
    return path


@pytest.fixture
def ctx() -> ToolContext:
    return ToolContext(task_id="task1", step_id="step1", agent="test-agent", user_id="u1")
