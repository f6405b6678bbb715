"""Declared workflows: a DAG of skill steps, defined in YAML or Python.

A step's input maps literal values and references: `{"$ref": "task.input.order_id"}`,
`{"$ref": "task.goal"}` or `{"$ref": "steps.<id>.output.<field>"}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.errors import InputResolutionError, WorkflowError


class Workflow(BaseModel):
    """A named, reusable plan."""

    name: str
    description: str = ""
    steps: list[PlanStep]
    merge: bool = False
    """Merge the step outputs with one model call at the end."""

    @model_validator(mode="after")
    def _check_dag(self) -> Workflow:
        check_dag(self.steps)
        return self

def check_dag(steps: list[PlanStep]) -> None:
    """Unique ids, known dependencies, no cycle; raises WorkflowError."""
    ids = [s.id for s in steps]
    if len(set(ids)) != len(ids):
        raise WorkflowError(f"duplicate step ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    known = set(ids)
    for s in steps:
        for d in s.depends_on:
            if d not in known:
                raise WorkflowError(f"step {s.id} depends on unknown step {d}")
    done: set[str] = set()
    remaining = list(steps)
    while remaining:
        ready = [s for s in remaining if set(s.depends_on) <= done]
        if not ready:
            raise WorkflowError(f"cycle among steps {[s.id for s in remaining]}")
        done.update(s.id for s in ready)
        remaining = [s for s in remaining if s.id not in done]

def _lookup(root: Any, path: list[str], ref: str) -> Any:
    cur = root
    for part in path:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise InputResolutionError(ref, f"no '{part}'")
    return cur

def resolve_input(
    template: Any, *, goal: str, task_input: dict[str, Any], outputs: dict[str, dict[str, Any]],
) -> Any:
    """Replace every `{"$ref": ...}` in `template`; raises InputResolutionError."""
    if isinstance(template, dict):
        if set(template) == {"$ref"} and isinstance(template["$ref"], str):
            ref = template["$ref"]
            head, *rest = ref.split(".")
            if head == "task" and rest[:1] == ["goal"] and len(rest) == 1:
                return goal
            if head == "task" and rest[:1] == ["input"]:
                return _lookup(task_input, rest[1:], ref)
            if head == "steps" and len(rest) >= 2 and rest[1] == "output":
                if rest[0] not in outputs:
                    raise InputResolutionError(ref, f"step {rest[0]} has no output")
                return _lookup(outputs[rest[0]], rest[2:], ref)
            raise InputResolutionError(ref, "must start with task.goal, task.input or "
                                            "steps.<id>.output")
        return {k: resolve_input(v, goal=goal, task_input=task_input, outputs=outputs)
                for k, v in template.items()}
    if isinstance(template, list):
        return [resolve_input(v, goal=goal, task_input=task_input, outputs=outputs)
                for v in template]
    return template

class WorkflowRegistry:
    """Workflows by name: the built-ins, plus YAML files from a folder."""

    def __init__(self, workflows: list[Workflow] | None = None) -> None:
        self._by_name: dict[str, Workflow] = {}
        for w in workflows or []:
            self.add(w)

    def add(self, workflow: Workflow) -> None:
        self._by_name[workflow.name] = workflow

    def get(self, name: str) -> Workflow | None:
        """A named workflow; `skill:<id>` is the one-step workflow running that skill on
        the task's input (how the A2A gateway routes a message to one skill)."""
        if name.startswith("skill:") and name not in self._by_name:
            skill = name.removeprefix("skill:")
            try:
                step = PlanStep(id="main", skill=skill, input={"$ref": "task.input"})
            except ValueError:
                return None
            return Workflow(name=name, steps=[step])
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def load_yaml(self, path: Path) -> Workflow:
        try:
            data = yaml.safe_load(path.read_text())
            wf = Workflow.model_validate(data)
        except (yaml.YAMLError, ValidationError, WorkflowError) as e:
            raise WorkflowError(f"{path}: {e}") from e
        self.add(wf)
        return wf

    def load_dir(self, folder: Path) -> list[Workflow]:
        return [self.load_yaml(p) for p in sorted(folder.glob("*.y*ml"))]

def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}

BUILTIN_WORKFLOWS = [
    Workflow(
        name="fanout",
        description="Look up three orders concurrently with the support agent, then merge.",
        steps=[
            PlanStep(id=f"order{i}", skill="order_status",
                     input={"order_id": _ref(f"task.input.order_ids.{i}"),
                            "question": _ref("task.goal")})
            for i in range(3)
        ],
        merge=True,
    ),
    Workflow(
        name="support",
        description="Triage a customer request, answer it about the order, draft and review.",
        steps=[
            PlanStep(id="triage", skill="triage", input={"text": _ref("task.goal")}),
            PlanStep(id="order", skill="order_status",
                     input={"order_id": _ref("task.input.order_id"),
                            "question": _ref("task.goal")}, depends_on=["triage"]),
            PlanStep(id="draft", skill="write",
                     input={"brief": _ref("steps.order.output.answer"),
                            "audience": "customer"}, depends_on=["order"]),
            PlanStep(id="review", skill="review",
                     input={"draft": _ref("steps.draft.output.text"),
                            "criteria": ["polite", "mentions the order"]},
                     depends_on=["draft"]),
        ],
    ),
    Workflow(
        name="refund",
        description="Refund an order (the support agent checks it first; over the policy's "
                    "threshold, $200 by default, the refund waits for a human's approval: "
                    "jetmesh approve TASK), then draft the reply to the customer.",
        steps=[
            PlanStep(id="refund", skill="refund",
                     input={"order_id": _ref("task.input.order_id"),
                            "amount_usd": _ref("task.input.amount_usd"),
                            "reason": _ref("task.input.reason")}),
            PlanStep(id="reply", skill="write",
                     input={"brief": _ref("steps.refund.output.answer"),
                            "audience": "customer"}, depends_on=["refund"]),
        ],
    ),
    Workflow(
        name="research",
        description="Research a question, write it up, review the draft.",
        steps=[
            PlanStep(id="research", skill="research", input={"question": _ref("task.goal")}),
            PlanStep(id="write", skill="write",
                     input={"brief": _ref("steps.research.output.answer")},
                     depends_on=["research"]),
            PlanStep(id="review", skill="review",
                     input={"draft": _ref("steps.write.output.text"), "criteria": ["clear"]},
                     depends_on=["write"]),
        ],
    ),
]

def builtin_registry(extra_dir: Path | None = None) -> WorkflowRegistry:
    reg = WorkflowRegistry(list(BUILTIN_WORKFLOWS))
    if extra_dir and extra_dir.is_dir():
        reg.load_dir(extra_dir)
    return reg

