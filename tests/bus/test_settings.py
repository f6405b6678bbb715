"""Settings groups: each group's own variable names, the older flat names still work,
and the shared defaults are declared once."""

from __future__ import annotations

from pathlib import Path

import pytest

from jetmesh.agents.builtin import _data
from jetmesh.bus import settings
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.settings import BusSettings
from jetmesh.memory.settings import MemorySettings


def test_group_name_and_flat_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BusSettings().replicas == 1
    monkeypatch.setenv("JETMESH_REPLICAS", "3")  # the flat name, as documented before
    assert BusSettings().replicas == 3
    monkeypatch.setenv("JETMESH_BUS_REPLICAS", "2")  # the group's own name wins
    assert BusSettings().replicas == 2
    assert BusSettings(replicas=4).replicas == 4  # code wins over both
    monkeypatch.setenv("NATS_URL", "nats://a:1")
    monkeypatch.setenv("JETMESH_DURABILITY", "strict")
    s = BusSettings()
    assert (s.nats_url, s.durability) == ("nats://a:1", "strict")


def test_data_dir_default_and_variable_are_shared(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.delenv(settings.DATA_DIR_ENV, raising=False)
    assert BusSettings().data_dir == MemorySettings().data_dir == settings.DEFAULT_DATA_DIR
    assert _data.data_dir() == settings.DEFAULT_DATA_DIR
    assert EmbeddedNats().data_dir == settings.DEFAULT_DATA_DIR / "nats"
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    assert BusSettings().data_dir == MemorySettings().data_dir == _data.data_dir() == tmp_path
    assert BusSettings(data_dir=Path("elsewhere")).data_dir == Path("elsewhere")


def test_orchestrator_and_worker_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from jetmesh.agents.worker import WorkerSettings
    from jetmesh.orchestrator.service import OrchestratorSettings

    monkeypatch.setenv("JETMESH_NO_AGENT_WAIT_S", "7")
    monkeypatch.setenv("JETMESH_STEP_CONCURRENCY", "9")
    assert OrchestratorSettings().no_agent_wait_s == 7
    assert WorkerSettings().step_concurrency == 9
    monkeypatch.setenv("JETMESH_ORCHESTRATOR_NO_AGENT_WAIT_S", "8")
    monkeypatch.setenv("JETMESH_WORKER_STEP_CONCURRENCY", "3")
    assert OrchestratorSettings().no_agent_wait_s == 8
    assert WorkerSettings().step_concurrency == 3
