"""Every exception tree of jetmesh hangs under one root, `JetmeshError`."""

from __future__ import annotations

import importlib
import inspect

import pytest

import jetmesh
from jetmesh.bus.errors import JetmeshError

ERROR_MODULES = [
    "jetmesh.bus.errors",
    "jetmesh.agents.errors",
    "jetmesh.agents.models.errors",
    "jetmesh.agents.mcp.errors",
    "jetmesh.orchestrator.errors",
    "jetmesh.a2a.errors",
    "jetmesh.memory.errors",
]


@pytest.mark.parametrize("module", ERROR_MODULES)
def test_every_error_class_derives_from_the_root(module: str) -> None:
    mod = importlib.import_module(module)
    own = [c for _, c in inspect.getmembers(mod, inspect.isclass)
           if issubclass(c, BaseException) and c.__module__ == module and c is not JetmeshError]
    assert own, f"{module} defines no exception"
    assert [c.__name__ for c in own if not issubclass(c, JetmeshError)] == []


def test_the_root_is_public_and_old_bases_still_hold() -> None:
    from jetmesh.agents.errors import UnknownAgent
    from jetmesh.bus.errors import WireError
    from jetmesh.orchestrator.client import ControlRefused, TaskExists

    assert jetmesh.JetmeshError is JetmeshError
    assert issubclass(UnknownAgent, KeyError) and issubclass(WireError, ValueError)
    assert issubclass(TaskExists, ValueError) and issubclass(TaskExists, JetmeshError)
    assert issubclass(ControlRefused, JetmeshError)
    roots = {c for m in ERROR_MODULES for _, c in
             inspect.getmembers(importlib.import_module(m), inspect.isclass)
             if JetmeshError in c.__bases__}
    assert len(roots) == 7  # one per package: bus, agents, models, mcp, orchestrator, a2a, memory
