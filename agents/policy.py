"""Tool-call policy: allow, ask a human, or deny, decided on the tool and its arguments.

Pure code. Rules are data (YAML/JSON, or Python), checked in order; the first rule whose
tool pattern and conditions match decides. With no matching rule, the tool's declared
risk decides (`read` and `write` are allowed, `irreversible` needs an approval).

    rules:
      - tool: issue_refund
        when: {amount_usd: {gt: 200}}
        action: approve
        reason: refunds over $200 need approval
      - tool: "delete_*"
        action: deny
        reason: deletions are for humans only
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

Action = Literal["allow", "approve", "deny"]


class Condition(BaseModel):
    """Tests on one argument; all given tests must hold."""

    eq: Any = None
    ne: Any = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    in_: list[Any] | None = Field(default=None, alias="in")
    not_in: list[Any] | None = None

    def holds(self, value: Any) -> bool:
        checks: list[bool] = []
        if self.eq is not None:
            checks.append(value == self.eq)
        if self.ne is not None:
            checks.append(value != self.ne)
        num = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        for bound, op in ((self.gt, float.__gt__), (self.gte, float.__ge__),
                          (self.lt, float.__lt__), (self.lte, float.__le__)):
            if bound is not None:
                checks.append(num is not None and op(float(num), float(bound)))
        if self.in_ is not None:
            checks.append(value in self.in_)
        if self.not_in is not None:
            checks.append(value not in self.not_in)
        return all(checks)


class PolicyRule(BaseModel):
    tool: str = "*"
    """Tool name or glob pattern."""
    when: dict[str, Condition] = Field(default_factory=dict)
    """Argument name -> condition; a missing argument never matches."""
    action: Action
    reason: str = ""

    def matches(self, tool: str, arguments: dict[str, Any]) -> bool:
        if not fnmatch.fnmatchcase(tool, self.tool):
            return False
        return all(name in arguments and cond.holds(arguments[name])
                   for name, cond in self.when.items())


class Decision(BaseModel):
    action: Action
    rule: str
    reason: str


_BY_RISK: dict[str, Action] = {"read": "allow", "write": "allow", "irreversible": "approve"}


class Policy(BaseModel):
    rules: list[PolicyRule] = Field(default_factory=list)
    by_risk: dict[str, Action] = Field(default_factory=lambda: dict(_BY_RISK))

    def decide(self, tool: str, risk: str, arguments: dict[str, Any]) -> Decision:
        for i, rule in enumerate(self.rules):
            if rule.matches(tool, arguments):
                return Decision(action=rule.action, rule=f"rules[{i}]:{rule.tool}",
                                reason=rule.reason or f"rule {i} ({rule.tool})")
        action = self.by_risk.get(risk, "approve")
        return Decision(action=action, rule=f"default:{risk}",
                        reason=f"{risk} tools are '{action}' by default")

    @classmethod
    def load(cls, path: Path) -> Policy:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


DEFAULT_POLICY = Policy(rules=[
    PolicyRule(tool="issue_refund", when={"amount_usd": Condition(gt=200)}, action="approve",
               reason="refunds over $200 need approval"),
    PolicyRule(tool="issue_refund", action="allow", reason="refunds up to $200 are allowed"),
    PolicyRule(tool="delete_*", action="deny", reason="deletions are for humans only"),
])


def args_hash(tool: str, arguments: dict[str, Any]) -> str:
    """What an approval is bound to: the tool and its exact arguments (canonical JSON)."""
    canon = json.dumps({"tool": tool, "arguments": arguments}, sort_keys=True,
                       separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()
