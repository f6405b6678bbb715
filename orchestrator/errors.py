"""Orchestrator errors.

    OrchestratorError
    ├── WorkflowError           a workflow is malformed (duplicate ids, unknown deps, cycle)
    ├── InputResolutionError    a step input reference cannot be resolved
    └── PlanError               the planner produced no valid plan (after one retry)
"""

from __future__ import annotations

from typing import Any

from jetmesh.bus.errors import JetmeshError


class OrchestratorError(JetmeshError):
    pass


class WorkflowError(OrchestratorError):
    pass


class InputResolutionError(OrchestratorError):
    def __init__(self, ref: str, detail: str) -> None:
        self.ref = ref
        self.detail = detail
        super().__init__(f"cannot resolve {ref}: {detail}")


class PlanError(OrchestratorError):
    def __init__(self, reason: str, errors: list[Any] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        super().__init__(reason)
