"""Planning and merging with a model: the LLM planner over live skills, and the final merge.

Model calls go through the one pipeline (`jetmesh.agents.calls.ModelCaller`): every call
is returned as `ModelCalledData` for the ledger, and earlier recorded calls are replayed
instead of calling the model again (so a restarted orchestrator, or a replay of the
ledger, makes no new model call for work already done).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from jetmesh.agents.calls import ModelCaller, ModelCallGuard, parse_json_answer
from jetmesh.agents.models.types import Message, Model, ModelRequest
from jetmesh.agents.spec import SkillSpec, schema_errors
from jetmesh.bus.events import ModelCalledData, PlanStep
from jetmesh.orchestrator.errors import PlanError, WorkflowError
from jetmesh.orchestrator.workflows import check_dag

PLANNER_SYSTEM = (
    "You are the planner of a team of specialised agents. Break the user's goal into the "
    "fewest steps that achieve it, each step calling exactly one of the available skills "
    "with an input that matches that skill's input schema. Steps run concurrently unless "
    "one lists another in depends_on. Use only facts from the goal and input; do not "
    "invent order numbers or data. Set merge to true when several step results must be "
    "combined into one answer. Answer with JSON only."
)

MERGE_SYSTEM = (
    "You combine the results of several agents into one final answer for the user. Keep "
    "every concrete fact each agent reported (ids, statuses, amounts); do not add facts "
    "that are not in the results. Answer in plain text."
)


class Recorder(ModelCaller):
    """The orchestrator's calls of one purpose (plan, merge): replays the recorded ones,
    budgets new ones with ``guard`` and keeps their records in ``new`` for the ledger."""

    def __init__(self, purpose: str, recorded: Sequence[ModelCalledData],
                 guard: ModelCallGuard | None = None) -> None:
        self.new: list[ModelCalledData] = []
        super().__init__(record=self._keep, agent="orchestrator", recorded=list(recorded),
                         guard=guard, purpose=purpose)

    async def _keep(self, data: ModelCalledData) -> None:
        self.new.append(data)


def _prefix_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Move a skill schema's $defs into a shared table, rewriting its $refs."""
    s = copy.deepcopy(schema)
    local = s.pop("$defs", {}) or {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                    out[k] = f"#/$defs/{prefix}__{v.removeprefix('#/$defs/')}"
                else:
                    out[k] = rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, d in local.items():
        defs[f"{prefix}__{name}"] = rewrite(d)
    result: dict[str, Any] = rewrite(s)
    return result


_SCHEMAS: dict[tuple[tuple[str, int], ...], tuple[dict[str, Any], dict[str, Any]]] = {}


def _cached(skills: Sequence[SkillSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan schema and the plan's shape schema for this set of skills, built once per
    set (the same schema objects also keep their compiled validators cached)."""
    key = tuple((s.id, id(s.input_schema)) for s in skills)
    hit = _SCHEMAS.get(key)
    if hit is None:
        if len(_SCHEMAS) > 64:
            _SCHEMAS.clear()
        hit = _SCHEMAS[key] = (_build_plan_schema(skills), _shape_schema(skills))
    return hit


def plan_schema(skills: Sequence[SkillSpec]) -> dict[str, Any]:
    """A strict JSON Schema for plans over `skills`: each step's input matches its skill."""
    return _cached(skills)[0]


def _build_plan_schema(skills: Sequence[SkillSpec]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    variants = []
    for sk in skills:
        variants.append({
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{0,64}$", "default": "",
                       "description": "unique step id; empty: assigned in order"},
                "skill": {"const": sk.id},
                "input": _prefix_defs(sk.input_schema, sk.id, defs),
                "depends_on": {"type": "array", "items": {"type": "string"}, "default": []},
            },
            "required": ["skill", "input"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "minItems": 1, "maxItems": 12,
                      "items": {"oneOf": variants}},
            "merge": {"type": "boolean", "default": False},
        },
        "required": ["steps"],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _shape_schema(skills: Sequence[SkillSpec]) -> dict[str, Any]:
    return {
        "type": "object", "required": ["steps"],
        "properties": {"steps": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["skill", "input"],
            "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{0,64}$"},
                           "skill": {"enum": sorted(s.id for s in skills)},
                           "input": {"type": "object"},
                           "depends_on": {"type": "array", "items": {"type": "string"}}}}},
            "merge": {"type": "boolean"}},
    }


def check_plan(data: Any, skills: Sequence[SkillSpec]) -> tuple[list[PlanStep], bool, list[str]]:
    """Validate a planner answer; returns (steps, merge, errors)."""
    by_id = {s.id: s for s in skills}
    # The shape first (with plain messages), then each input against its own skill, so
    # the errors name the field that is wrong rather than "not valid under any schema".
    errors = schema_errors(_cached(skills)[1], data)
    if errors:
        return [], False, errors
    steps: list[PlanStep] = []
    for i, raw in enumerate(data["steps"]):
        raw = {**raw, "id": raw.get("id") or f"s{i + 1}"}
        sk = by_id[raw["skill"]]
        errs = schema_errors(sk.input_schema, raw["input"])
        errors += [f"step {raw['id']} ({sk.id}): {e}" for e in errs]
        steps.append(PlanStep(id=raw["id"], skill=raw["skill"], input=raw["input"],
                              depends_on=raw.get("depends_on", [])))
    try:
        check_dag(steps)
    except WorkflowError as e:
        errors.append(str(e))
    return steps, bool(data.get("merge", len(steps) > 1)), errors


async def plan_with_model(
    model: Model, goal: str, task_input: dict[str, Any], skills: Sequence[SkillSpec],
    recorder: Recorder, *, attempts: int = 2, context: list[dict[str, Any]] | None = None,
) -> tuple[list[PlanStep], bool]:
    """Ask for a plan; an invalid one is asked for again once, then PlanError.
    `context`: the earlier turns of the task's conversation (orchestrator.context)."""
    if not skills:
        raise PlanError("no live agent offers any skill to plan with")
    catalogue = [{"skill": s.id, "name": s.name, "description": s.description,
                  "tags": s.tags, **({"examples": s.examples} if s.examples else {})}
                 for s in skills]
    earlier = {"earlier_turns": context} if context else {}
    messages = [Message(role="user", content=json.dumps(
        {"goal": goal, "input": task_input, **earlier, "skills": catalogue},
        ensure_ascii=False))]
    last: list[str] = []
    for _ in range(attempts):
        request = ModelRequest(system=PLANNER_SYSTEM, messages=list(messages),
                               output_schema=plan_schema(skills), max_tokens=2048)
        resp = await recorder.call(model, request)
        data, problem = parse_json_answer(resp.text)
        if problem is not None:
            last = [problem]
        else:
            steps, merge, last = check_plan(data, skills)
            if not last:
                return steps, merge
        messages += [Message(role="assistant", content=resp.text),
                     Message(role="user", content="That plan is invalid:\n- "
                             + "\n- ".join(last) + "\nAnswer again with a corrected plan.")]
    raise PlanError(f"the planner gave no valid plan in {attempts} attempts", last)


async def merge_with_model(
    model: Model, goal: str, outputs: dict[str, dict[str, Any]], recorder: Recorder,
) -> dict[str, Any]:
    """One model call that merges the step outputs; the raw outputs stay in the result."""
    request = ModelRequest(system=MERGE_SYSTEM, messages=[Message(role="user", content=json.dumps(
        {"goal": goal, "results": outputs}, ensure_ascii=False))], max_tokens=2048)
    resp = await recorder.call(model, request)
    return {"answer": resp.text, "steps": outputs}
