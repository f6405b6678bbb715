"""Model routing per skill: tiers from cheap to strong, and output validators.

A skill's `Routing` (data, in the agent's `CostPolicy`) lists its tiers, cheapest
first. The step starts on the default (first) tier unless an input rule, a retried
attempt or a classifier call (a small model asked which tier, recorded like any model
call, so a replay reproduces it) says otherwise; it escalates one tier up when the
answer fails the output schema or a validator, or reports low confidence. Every
decision is checked against what the task's budget has left first: a tier whose one
call (upper bound) the budget cannot cover is not taken (the step stays on the tier it
has, or fails, per ``on_budget``). The step loop (agents.loop) applies it and records
each decision as a `jetmesh.model.routed.v1` event with its reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .models.pricing import cost_usd
from .models.types import ModelRequest, Usage

__all__ = [
    "CLASSIFIER_SCHEMA",
    "Classifier",
    "Escalation",
    "RouteRule",
    "Routing",
    "Tier",
    "Validator",
    "as_text",
    "estimate_call",
    "lookup",
    "validator_errors",
]

Escalation = Literal["invalid_output", "validator", "low_confidence", "retry"]
_ALL_ESCALATIONS: tuple[Escalation, ...] = ("invalid_output", "validator", "low_confidence",
                                            "retry")


def lookup(value: Any, path: str) -> tuple[bool, Any]:
    """The value at a dotted path (list indexes as numbers); "" is the value itself."""
    cur = value
    for part in [p for p in path.split(".") if p]:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def as_text(value: Any) -> str:
    """A value as text for a check: a string as is, anything else as sorted JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def estimate_call(request: ModelRequest, provider: str, model: str) -> tuple[float, int]:
    """An upper bound of one call's cost and tokens: the prompt's size (3 characters a
    token) plus the full output allowance, at the uncached price."""
    chars = len(request.system) + sum(len(m.content) + 40 * len(m.tool_calls)
                                      for m in request.messages)
    chars += sum(len(json.dumps(t.input_schema)) + len(t.description) for t in request.tools)
    tokens_in = math.ceil(chars / 3)
    usage = Usage(input_tokens=tokens_in, output_tokens=request.max_tokens)
    return cost_usd(provider, model, usage), tokens_in + request.max_tokens


class Tier(BaseModel):
    """One model tier; no provider and model: the agent's own model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    provider: str | None = None
    model: str | None = None


class RouteRule(BaseModel):
    """Start on `tier` when the step input matches (every condition given holds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: str
    path: str = ""
    """Dotted path into the step input ("": the whole input)."""
    regex: str | None = None
    """Searched in the value's text (its JSON when not a string), case-insensitive."""
    min_chars: int | None = None
    """The value's text is at least this long."""
    equals: Any = None

    def matches(self, step_input: dict[str, Any]) -> bool:
        found, value = lookup(step_input, self.path)
        if not found:
            return False
        text = as_text(value)
        if self.regex is not None and re.search(self.regex, text, re.IGNORECASE) is None:
            return False
        if self.min_chars is not None and len(text) < self.min_chars:
            return False
        return self.equals is None or value == self.equals

    def describe(self) -> str:
        what = [f"/{self.regex}/" if self.regex else "",
                f">= {self.min_chars} chars" if self.min_chars is not None else "",
                f"== {self.equals!r}" if self.equals is not None else ""]
        return f"input {self.path or '(all)'} " + " ".join(w for w in what if w)


CLASSIFIER_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["tier"],
    "properties": {"tier": {"type": "string"}, "reason": {"type": "string"}},
}


class Classifier(BaseModel):
    """A small model picks the starting tier from the step input (one recorded call)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: str | None = None
    """The tier whose model classifies (default: the first)."""
    instructions: str = (
        "You route requests to a model tier. Read the request and pick the cheapest tier "
        "that can answer it well. Answer with one JSON object only.")
    max_tokens: int = 64


class Validator(BaseModel):
    """A check on a skill's output beyond its JSON Schema. A failure is a silent failure
    caught: the answer was well-formed but wrong."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str
    path: str = ""
    """Dotted path into the output ("": the whole output)."""
    regex: str | None = None
    """The value's text must match (searched)."""
    min: float | None = None
    max: float | None = None
    one_of: list[Any] | None = None
    equals_path: str | None = None
    """Cross-field: the value must equal the output's value at this path."""
    contains_path: str | None = None
    """Cross-field: the value's text must contain the text of the value at this path."""
    check: Callable[[dict[str, Any]], str | None] | None = Field(default=None, exclude=True)
    """A callable given the whole output: None when it holds, else what is wrong."""

    def errors(self, output: dict[str, Any]) -> list[str]:
        found, value = lookup(output, self.path)
        where = self.path or "(output)"
        out: list[str] = []
        if not found and (self.regex or self.min is not None or self.max is not None
                          or self.one_of is not None or self.equals_path or self.contains_path):
            return [f"{self.name}: {where} is missing"]
        if self.regex is not None and re.search(self.regex, as_text(value)) is None:
            out.append(f"{self.name}: {where} does not match /{self.regex}/")
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if self.min is not None and (number is None or number < self.min):
            out.append(f"{self.name}: {where} must be >= {self.min:g}")
        if self.max is not None and (number is None or number > self.max):
            out.append(f"{self.name}: {where} must be <= {self.max:g}")
        if self.one_of is not None and value not in self.one_of:
            out.append(f"{self.name}: {where} must be one of {self.one_of}")
        if self.equals_path is not None:
            other_found, other = lookup(output, self.equals_path)
            if not other_found or other != value:
                out.append(f"{self.name}: {where} must equal {self.equals_path}")
        if self.contains_path is not None:
            other_found, other = lookup(output, self.contains_path)
            if not other_found or as_text(other) not in as_text(value):
                out.append(f"{self.name}: {where} must contain {self.contains_path}")
        if self.check is not None:
            problem = self.check(output)
            if problem:
                out.append(f"{self.name}: {problem}")
        return out


def validator_errors(validators: list[Validator], output: dict[str, Any]) -> list[str]:
    """Every validator's complaint about `output` (empty: all hold)."""
    return [line for v in validators for line in v.errors(output)]


class Routing(BaseModel):
    """A skill's model tiers and how a step moves between them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: list[Tier] = Field(min_length=1)
    """Cheapest first; the first is the default."""
    rules: list[RouteRule] = Field(default_factory=list)
    """The first that matches the input picks the starting tier."""
    classifier: Classifier | None = None
    """Asked when no rule matched (and the attempt is the first)."""
    escalate_on: list[Escalation] = Field(default_factory=lambda: list(_ALL_ESCALATIONS))
    confidence_path: str = "confidence"
    """Where a structured answer reports its confidence (0..1)."""
    min_confidence: float = 0.7
    """Below this, the answer escalates (low_confidence) or, on the top tier, stands."""
    on_budget: Literal["stay", "fail"] = "stay"
    """When the budget cannot cover the tier wanted: stay on a cheaper one (the default
    tier at the start), or fail the step with that reason."""

    @model_validator(mode="after")
    def _names(self) -> Routing:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tier names in {names}")
        wanted = [r.tier for r in self.rules] + (
            [self.classifier.tier] if self.classifier and self.classifier.tier else [])
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"rules or classifier name unknown tiers {unknown}")
        return self

    def index(self, name: str) -> int:
        return [t.name for t in self.tiers].index(name)

    def start(self, step_input: dict[str, Any], attempt: int
              ) -> tuple[int, Literal["default", "rule", "retry"], str]:
        """The starting tier by the input rules and the attempt (pure)."""
        idx, reason = 0, "the default (cheapest) tier"
        trigger: Literal["default", "rule", "retry"] = "default"
        for rule in self.rules:
            if rule.matches(step_input):
                idx, trigger, reason = self.index(rule.tier), "rule", \
                    f"rule: {rule.describe()} -> {rule.tier}"
                break
        if attempt > 1 and "retry" in self.escalate_on:
            up = min(len(self.tiers) - 1, idx + attempt - 1)
            if up > idx:
                return up, "retry", (f"attempt {attempt}: {attempt - 1} tier(s) above "
                                     f"{self.tiers[idx].name}")
        return idx, trigger, reason

    def confidence(self, output: dict[str, Any]) -> float | None:
        found, value = lookup(output, self.confidence_path)
        if found and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None


def tier_models(routings: list[Routing], default: Any) -> dict[str, Any]:
    """A model per tier name across `routings` (a worker builds them once): a tier with
    a provider or model gets its own chain behind the circuit breakers; one with
    neither is the agent's `default` model. Tiers of the same name must agree."""
    from .models.factory import create_model_chain
    from .spec import ModelPolicy

    out: dict[str, Any] = {}
    seen: dict[str, Tier] = {}
    for routing in routings:
        for tier in routing.tiers:
            if tier.name in seen:
                if seen[tier.name] != tier:
                    raise ValueError(f"tier {tier.name!r} names two different models")
                continue
            seen[tier.name] = tier
            if tier.provider is None and tier.model is None:
                if default is not None:
                    out[tier.name] = default
                continue
            out[tier.name] = create_model_chain(ModelPolicy(provider=tier.provider,
                                                            model=tier.model))
    return out
