"""Models that run without a provider: scripted, function-backed and the dry-run sim."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

from jetmesh.agents.models.errors import ModelError
from jetmesh.agents.models.schema_examples import example_for_schema
from jetmesh.agents.models.types import (
    Message,
    ModelRequest,
    ModelResponse,
    ToolCall,
    ToolDefinition,
    Usage,
)

__all__ = [
    "SIM_LABEL",
    "FunctionModel",
    "ModelFunction",
    "ScriptItem",
    "ScriptedModel",
    "SimModel",
    "estimate_usage",
    "sim_digest",
    "sim_plan",
    "tool_call",
]

FunctionResult: TypeAlias = ModelResponse | str | ToolCall | Sequence[ToolCall]
ModelFunction: TypeAlias = Callable[[ModelRequest], FunctionResult | Awaitable[FunctionResult]]
"""A turn function: gets the request, returns a response or a final text (sync or async)."""
ScriptItem: TypeAlias = ModelResponse | str | ToolCall | Sequence[ToolCall] | ModelFunction
"""One scripted turn: a response, a final text, tool call(s) or a turn function."""

_call_ids = itertools.count(1)


def tool_call(name: str, /, **arguments: Any) -> ToolCall:
    """Build a `ToolCall` with a fresh process-unique id (for scripts)."""
    return ToolCall(id=f"call_{next(_call_ids)}", name=name, arguments=arguments)


_JSON_LENGTHS: dict[tuple[Any, ...], tuple[tuple[Any, ...], int]] = {}
"""key -> (the objects the key names by id, JSON length); see `_json_len`."""


def _json_len(value: ToolDefinition | dict[str, Any]) -> int:
    """The length of a tool definition's JSON, or of ``json.dumps`` of a schema, cached.

    Every call of a step repeats the same tool definitions (the `Tool` caches them) and
    output schema, and schemas are not mutated (the validator cache in
    `jetmesh.agents.spec` relies on it too). A request's output schema is a shallow copy
    of its skill's, so its values are the same objects: the key is the identity of the
    definition, or the keys and the identities of the values of the schema. The entry
    holds those objects, so none of its ids is reused by another object while it lives.
    """
    if isinstance(value, ToolDefinition):
        held: tuple[Any, ...] = (value,)
        key: tuple[Any, ...] = ("tool", id(value))
    else:
        held = tuple(value.values())
        key = ("schema", tuple(value), tuple(map(id, held)))
    hit = _JSON_LENGTHS.get(key)
    if hit is not None:
        return hit[1]
    n = len(value.model_dump_json() if isinstance(value, ToolDefinition) else json.dumps(value))
    if len(_JSON_LENGTHS) > 1024:
        _JSON_LENGTHS.clear()
    _JSON_LENGTHS[key] = (held, n)
    return n


def _chars(request: ModelRequest) -> int:
    n = len(request.system)
    for m in request.messages:
        n += len(m.content)
        n += sum(len(c.name) + len(json.dumps(c.arguments)) for c in m.tool_calls)
    n += sum(_json_len(t) for t in request.tools)
    if request.output_schema is not None:
        n += _json_len(request.output_schema)
    return n


def estimate_usage(request: ModelRequest, text: str, tool_calls: Sequence[ToolCall]) -> Usage:
    """Token usage estimated as ceil(chars / 4) of the request and of the response."""
    out_chars = len(text) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in tool_calls)
    return Usage(
        input_tokens=math.ceil(_chars(request) / 4), output_tokens=math.ceil(out_chars / 4)
    )


def _to_response(
    result: ModelResponse | str | ToolCall | Sequence[ToolCall],
    request: ModelRequest,
    provider: str,
    model: str,
) -> ModelResponse:
    if isinstance(result, ModelResponse):
        return result
    if isinstance(result, str):
        return ModelResponse(
            provider=provider,
            model=model,
            text=result,
            usage=estimate_usage(request, result, []),
            stop_reason="end_turn",
        )
    calls = [result] if isinstance(result, ToolCall) else list(result)
    if not all(isinstance(c, ToolCall) for c in calls):
        raise TypeError(f"not a script item: {result!r}")
    return ModelResponse(
        provider=provider,
        model=model,
        tool_calls=calls,
        usage=estimate_usage(request, "", calls),
        stop_reason="tool_use",
    )


async def _call(fn: ModelFunction, request: ModelRequest) -> FunctionResult:
    result = fn(request)
    if inspect.isawaitable(result):
        return await result
    return result


class ScriptedModel:
    """A model that plays back a queue of turns, for tests and benchmarks.

    Each `complete` pops the next item; an empty queue raises `ModelError`
    ("script exhausted"). `requests` records every request in order.
    """

    def __init__(self, *items: ScriptItem, name: str = "scripted", provider: str = "sim") -> None:
        self.provider = provider
        self.name = name
        self.requests: list[ModelRequest] = []
        """Every request received, in order."""
        self._queue: deque[ScriptItem] = deque()
        self.enqueue(*items)

    def enqueue(self, *items: ScriptItem) -> None:
        """Append turns to the script."""
        for item in items:
            if not (
                isinstance(item, ModelResponse | str | ToolCall | list | tuple) or callable(item)
            ):
                raise TypeError(f"not a script item: {item!r}")
            self._queue.append(item)

    @property
    def remaining(self) -> int:
        """Turns not yet played."""
        return len(self._queue)

    def assert_complete(self) -> None:
        """Raise AssertionError unless every scripted turn was played."""
        if self._queue:
            raise AssertionError(
                f"{self.provider}/{self.name}: {len(self._queue)} scripted turn(s) not played"
            )

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        if not self._queue:
            raise ModelError(
                self.provider,
                self.name,
                f"script exhausted after {len(self.requests) - 1} call(s)",
            )
        item = self._queue.popleft()
        if callable(item) and not isinstance(item, ModelResponse | ToolCall):
            result: ModelResponse | str | ToolCall | Sequence[ToolCall] = await _call(item, request)
        else:
            result = item
        return _to_response(result, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None


class FunctionModel:
    """A model whose every turn is computed by a function of the request."""

    def __init__(
        self, function: ModelFunction, *, name: str = "function", provider: str = "sim"
    ) -> None:
        self.provider = provider
        self.name = name
        self.function = function
        self.requests: list[ModelRequest] = []
        """Every request received, in order."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        result = await _call(self.function, request)
        return _to_response(result, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None


_UNTRUSTED_OPEN, _UNTRUSTED_CLOSE = "<untrusted-data", "</untrusted-data>"


def _data_of(text: str) -> str:
    """A tool result's data without its untrusted-data envelope (`tools.untrusted_block`:
    the tag line and the notice line are the wrapper, not what the tool returned)."""
    start, end = text.find(_UNTRUSTED_OPEN), text.rfind(_UNTRUSTED_CLOSE)
    if start < 0 or end < start:
        return text
    _, _, rest = text[start:end].partition("\n")
    _, _, body = rest.partition("\n")
    body = body.removesuffix("\n").replace("<\\/untrusted-data>", _UNTRUSTED_CLOSE)
    before, after = text[:start].strip(), text[end + len(_UNTRUSTED_CLOSE):].strip()
    return " ".join(p for p in (before, body, after) if p) if (before or after) else body


def _tool_results(messages: Sequence[Message]) -> list[dict[str, Any]]:
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    results: list[dict[str, Any]] = []
    for m in messages:
        if m.role != "tool":
            continue
        text = _data_of(m.content)
        try:
            content: Any = json.loads(text)
        except ValueError:
            content = text
        entry: dict[str, Any] = {"tool": names.get(m.tool_call_id or "", ""), "result": content}
        if m.is_error:
            entry["is_error"] = True
        results.append(entry)
    return results


def _first_user_object(messages: Sequence[Message]) -> dict[str, Any]:
    """The first user message, when it is a JSON object (a step input)."""
    first = next((m.content for m in messages if m.role == "user"), "")
    try:
        data = json.loads(first)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


SIM_LABEL = "[simulated model]"
"""How every answer of the dry-run model starts, so nobody takes it for a real one."""

_TEXT_KEYS = ("question", "text", "query", "brief", "draft", "goal", "answer", "summary")
"""Step-input fields whose text a dry-run tool call may take for a same-typed argument."""

_SKIP_KEYS = frozenset({"idempotency_key", "email", "customer", "already_issued"})
"""Fields left out of the digest (internal keys, personal data)."""

_CLIP = 400


def _primary_text(given: dict[str, Any]) -> str | None:
    """The main text of a step input (its question, text, brief, ...), if any."""
    for key in _TEXT_KEYS:
        value = given.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _prefer_given(args: Any, given: dict[str, Any], schema: dict[str, Any]) -> Any:
    """Use values from the step input for same-named arguments, when still schema-valid.

    So a dry run of `lookup_order` on a step whose input has `order_id: "A1001"` looks up
    that order rather than a placeholder; a plain text argument no input field names
    (`search_kb`'s ``query`` on a research step) takes the input's main text (its
    question), so the tool searches for what was asked.
    """
    if not isinstance(args, dict) or not given:
        return args
    from jetmesh.agents.spec import schema_errors

    merged = {**args, **{k: v for k, v in given.items() if k in args}}
    text = _primary_text(given)
    props = schema.get("properties", {})
    if text is not None:
        for k in args:
            sub = props.get(k, {})
            if k not in given and isinstance(sub, dict) and sub.get("type") == "string" \
                    and not ({"enum", "const", "format", "pattern"} & set(sub)):
                merged[k] = text
    if merged == args:
        return args
    if not schema_errors(schema, merged):
        return merged
    only_given = {**args, **{k: v for k, v in given.items() if k in args}}
    if only_given != args and not schema_errors(schema, only_given):
        return only_given
    return args


def _unlabel(text: str) -> str:
    text = text.strip()
    while text.startswith(SIM_LABEL):
        text = text.removeprefix(SIM_LABEL).strip()
    return text


def _clip(text: str) -> str:
    text = " ".join(_unlabel(text).split())
    return text if len(text) <= _CLIP else text[: _CLIP - 3] + "..."


def _words_of(key: str) -> str:
    return key.replace("_", " ")


def _render(value: Any) -> str:
    """A tool result or step output as short readable text, every fact from `value`."""
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if value is None:
        return "none"
    if isinstance(value, list):
        if not value:
            return "none"
        shown = [_render(v) for v in value[:3]]
        more = f" (and {len(value) - 3} more)" if len(value) > 3 else ""
        return "; ".join(shown) + more
    if isinstance(value, dict):
        return _render_dict(value)
    return _clip(str(value))


_FIRST_KEYS = ("status", "carrier", "tracking", "eta", "amount_usd", "total_usd", "reason")
"""Fields a record's digest names first (what a customer asks about)."""


def _lead(d: dict[str, Any], tool: str = "") -> tuple[str, str | None]:
    """("Order A1002", "order_id") for a record with an id field; ("", None) without.
    Of several id fields, the one the tool is named after (``issue_refund``: refund_id)."""
    ids = [k for k, v in d.items() if k.endswith("_id") and isinstance(v, str) and v]
    ids.sort(key=lambda k: k[:-3] not in tool)
    for key in ids:
        return f"{_words_of(key[:-3]).capitalize()} {d[key]}", key
    for key in ("id", "title", "name"):
        if isinstance(d.get(key), str) and d[key]:
            return _clip(d[key]), key
    return "", None


def _render_dict(d: dict[str, Any], lead: str | None = None, tool: str = "") -> str:
    own, key = _lead(d, tool)
    if d.get("found") is False:
        return f"{own or 'the record'}: not found"
    # A step's answer (or a written text) says it all; the record beside it is its source.
    for text_key in ("answer", "text", "summary"):
        if isinstance(d.get(text_key), str) and d[text_key].strip():
            return _clip(d[text_key])
    parts: list[str] = []
    ordered = sorted(d, key=lambda k: _FIRST_KEYS.index(k) if k in _FIRST_KEYS else 99)
    for k in ordered:
        v = d[k]
        if k == key or k in _SKIP_KEYS or v is None or (k == "found" and v is True):
            continue
        if isinstance(v, dict):
            inner_lead, _ = _lead(v)
            inner = _render_dict(v)
            if inner_lead and inner_lead in (own, lead):  # the same record, nested
                inner = inner.removeprefix(inner_lead).removeprefix(": ")
                parts.append(inner)
            else:
                parts.append(f"{_words_of(k)}: {inner}")
            continue
        parts.append(f"{_words_of(k)} {_render(v)}")
    body = ", ".join(p for p in parts if p)
    if own and body:
        return f"{own}: {body}"
    return own or body or "nothing"


def _render_result(entry: dict[str, Any]) -> str:
    tool, result = entry.get("tool") or "a tool", entry.get("result")
    if entry.get("is_error"):
        return f"{tool} was not made: {_render(result)}"
    if isinstance(result, dict):
        if result.get("hits") == []:  # a search that found nothing
            return f"{tool}: nothing found"
        return _render_dict(result, tool=tool)
    return _render(result)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def sim_digest(request: ModelRequest) -> str:
    """The dry-run answer text, ``[simulated model] `` and then every tool result in the
    conversation, in words built from the results alone ("Order A1002: status shipped,
    carrier ..."; a call that was refused: "issue_refund was not made: denied ...") or,
    with no tool results, the last user message (a JSON step input or merge request:
    its texts and its steps' answers)."""
    results = _tool_results(request.messages)
    if results:
        return " ".join([SIM_LABEL, *(_sentence(_render_result(r)) for r in results)])
    last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    try:
        data: Any = json.loads(last_user)
    except ValueError:
        return f"{SIM_LABEL} {_unlabel(last_user)}"
    if isinstance(data, dict) and isinstance(data.get("results"), dict):  # a merge
        lines = [f"{step}: {_sentence(_render(out))}" for step, out in data["results"].items()]
        return " ".join([SIM_LABEL, *lines])
    if isinstance(data, dict):
        text = _primary_text(data)
        facts = data.get("facts")
        rest = [_sentence(_clip(f)) for f in facts if isinstance(f, str)] \
            if isinstance(facts, list) else []
        if text is not None:
            return " ".join([SIM_LABEL, _sentence(_clip(text)), *rest])
        return f"{SIM_LABEL} {_sentence(_render(data))}"
    return f"{SIM_LABEL} {_unlabel(last_user)}"


def _facts(messages: Sequence[Message]) -> dict[str, Any]:
    """Field -> value from the successful tool results (top level, and one level into a
    nested record), the first result naming a field winning: what a structured answer's
    fields may be grounded in."""
    found: dict[str, Any] = {}
    for entry in _tool_results(messages):
        result = entry["result"]
        if entry.get("is_error") or not isinstance(result, dict):
            continue
        for k, v in result.items():
            found.setdefault(k, v)
        for v in result.values():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    found.setdefault(k2, v2)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                # A list of checks: a yes/no field holds for the list if it holds for each.
                for k2 in v[0]:
                    flags = [x.get(k2) for x in v]
                    if all(isinstance(f, bool) for f in flags):
                        found.setdefault(k2, all(flags))
    return found


def _grounded_answer(request: ModelRequest, schema: dict[str, Any], digest: str) -> Any:
    """A structured answer valid against `schema`: each field a tool result names (same
    name, or ``suggested_<name>``) takes that value; a field no result grounds is null
    when it may be (never an invented id), else carries the digest (strings) or the
    schema's example value."""
    from jetmesh.agents.spec import schema_errors

    base = example_for_schema(schema, text=digest)
    props = schema.get("properties")
    if not isinstance(base, dict) or not isinstance(props, dict):
        return base
    facts = _facts(request.messages)
    changes: list[tuple[str, Any]] = []
    for name in props:
        for key in (name, f"suggested_{name}"):
            if key in facts:
                changes.append((name, facts[key]))
                break
        else:
            if name in base and not isinstance(base[name], str | list) \
                    and base[name] is not None:
                continue
            if name in base and _nullable(props[name], schema):
                changes.append((name, None))
    candidate = {**base, **dict(changes)}
    if not schema_errors(schema, candidate):
        return candidate
    out = dict(base)  # some change does not fit: take those that do, one by one
    for name, value in changes:
        trial = {**out, name: value}
        if not schema_errors(schema, trial):
            out = trial
    return out


def _nullable(prop: Any, root: dict[str, Any]) -> bool:
    if not isinstance(prop, dict):
        return False
    kinds = prop.get("type")
    if kinds == "null" or (isinstance(kinds, list) and "null" in kinds):
        return True
    return any(isinstance(b, dict) and b.get("type") == "null"
               for b in (*prop.get("anyOf", ()), *prop.get("oneOf", ())))


_STOPWORDS = frozenset({
    "a", "an", "and", "any", "are", "as", "at", "be", "by", "can", "do", "does", "for",
    "from", "how", "i", "in", "is", "it", "me", "my", "of", "on", "or", "our", "please",
    "the", "this", "to", "us", "we", "what", "when", "where", "which", "who", "why", "will",
    "with", "you", "your",
})


def _stems(text: str) -> set[str]:
    """Words of `text` cut to five letters ("summarise" ~ "summary", "returns" ~ "return")."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return {w[:5] for w in words if len(w) > 2 and w not in _STOPWORDS}


def _plan_variants(schema: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """skill id -> its step variant, when `schema` is the planner's plan schema."""
    if not isinstance(schema, dict):
        return None
    steps = schema.get("properties", {}).get("steps")
    items = steps.get("items", {}) if isinstance(steps, dict) else {}
    variants = items.get("oneOf") if isinstance(items, dict) else None
    if not isinstance(variants, list) or not variants:
        return None
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        skill = v.get("properties", {}).get("skill", {}).get("const") \
            if isinstance(v, dict) else None
        if not isinstance(skill, str):
            return None
        out[skill] = v
    return out


def _takes_text(sub: Any) -> bool:
    """A plain string field (maybe nullable)."""
    if not isinstance(sub, dict):
        return False
    if sub.get("type") == "string":
        return True
    return any(isinstance(b, dict) and b.get("type") == "string" and len(b) == 1
               for b in sub.get("anyOf", ()))


def _step_inputs(input_schema: dict[str, Any], root: dict[str, Any], goal: str,
                 task_input: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The inputs of the steps one skill gets for this goal, from the goal and the task
    input only (None: its required fields cannot be filled without inventing data). A
    task input listing ids (``order_ids``) for a skill taking one (``order_id``) gives
    one step per id."""
    from jetmesh.agents.spec import schema_errors

    props: dict[str, Any] = input_schema.get("properties", {})
    required = list(input_schema.get("required", []))
    fan: tuple[str, list[Any]] | None = None
    base: dict[str, Any] = {}
    for name, sub in props.items():
        plural = task_input.get(name + "s")
        if name in task_input:
            base[name] = task_input[name]
        elif isinstance(plural, list) and plural and fan is None:
            fan = (name, plural)
        elif _takes_text(sub) and not name.endswith("_id") \
                and not ({"enum", "const", "pattern"} & set(sub)) \
                and (name in required or name in _TEXT_KEYS) and goal:
            base[name] = goal
    names = [base] if fan is None else [{**base, fan[0]: v} for v in fan[1]]
    if any(r not in names[0] for r in required):
        return None
    check = {**input_schema, "$defs": root.get("$defs", {})}
    if any(schema_errors(check, i) for i in names):
        return None
    return names[:12]


def sim_plan(request: ModelRequest) -> dict[str, Any] | None:
    """The dry-run planner: a plan for a planner request (the plan schema over the live
    skills and a user message with ``goal``, ``input`` and the skill catalogue), else
    None. Deterministic: every skill whose required input the goal and task input fill
    is scored by the goal's words found in its id, name and tags (2 each), description
    and examples (1 each); the best one runs (ties: catalogue order), once, or once per
    id of a list of ids in the input (then merged). No match: the first skill taking the
    goal as text."""
    variants = _plan_variants(request.output_schema)
    if variants is None or not request.messages:
        return None
    try:
        ask = json.loads(request.messages[0].content)
    except ValueError:
        return None
    if not isinstance(ask, dict) or not isinstance(ask.get("skills"), list):
        return None
    raw_goal, raw_input = ask.get("goal"), ask.get("input")
    goal: str = raw_goal if isinstance(raw_goal, str) else ""
    task_input: dict[str, Any] = raw_input if isinstance(raw_input, dict) else {}
    wanted = _stems(goal)
    root = request.output_schema or {}
    best: tuple[float, int, str, list[dict[str, Any]]] | None = None
    for order, entry in enumerate(ask["skills"]):
        skill = entry.get("skill") if isinstance(entry, dict) else None
        if skill not in variants:
            continue
        schema = variants[skill]["properties"]["input"]
        inputs = _step_inputs(schema, root, goal, task_input)
        if inputs is None:
            continue
        strong = _stems(" ".join([skill.replace("_", " "), str(entry.get("name") or ""),
                                  *map(str, entry.get("tags") or [])]))
        weak = _stems(" ".join([str(entry.get("description") or ""),
                                *map(str, entry.get("examples") or [])]))
        score = 2 * len(wanted & strong) + len(wanted & weak - strong)
        # Prefer the skill that uses the task's input (an order id), then catalogue order.
        uses = len([k for k in schema.get("properties", {})
                    if k in task_input or k + "s" in task_input])
        key = (score + 0.5 * uses, -order, skill, inputs)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return None
    _, _, skill, inputs = best
    steps = [{"id": f"{skill}{i + 1}" if len(inputs) > 1 else skill, "skill": skill,
              "input": i_} for i, i_ in enumerate(inputs)]
    return {"steps": steps, "merge": len(steps) > 1}


class SimModel:
    """The dry-run model used when no API key is configured.

    Turn 1 (no tool results yet, tools offered): calls every offered tool once, in offered
    order, with arguments generated from its input schema. Afterwards it answers with
    `sim_digest`; with an ``output_schema`` the answer is JSON valid against it whose
    string fields hold the digest. Deterministic; usage is estimated from text size.
    """

    provider = "sim"

    def __init__(self, *, name: str = "dry-run", latency_s: float = 0.0) -> None:
        self.name = name
        self.latency_s = latency_s
        """Simulated latency per call, for benchmarks."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        has_results = any(m.role == "tool" for m in request.messages)
        if request.tools and not has_results:
            calls = []
            given = _first_user_object(request.messages)
            for i, tool in enumerate(request.tools, start=1):
                args = _prefer_given(example_for_schema(tool.input_schema), given,
                                     tool.input_schema)
                calls.append(
                    ToolCall(
                        id=f"sim_{i}",
                        name=tool.name,
                        arguments=args if isinstance(args, dict) else {},
                    )
                )
            return _to_response(calls, request, self.provider, self.name)
        plan = sim_plan(request)
        if plan is not None:
            return _to_response(json.dumps(plan, ensure_ascii=False), request,
                                self.provider, self.name)
        digest = sim_digest(request)
        if request.output_schema is not None:
            text = json.dumps(_grounded_answer(request, request.output_schema, digest),
                              ensure_ascii=False)
        else:
            text = digest
        return _to_response(text, request, self.provider, self.name)

    async def aclose(self) -> None:
        return None
