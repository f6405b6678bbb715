"""The reviewer agent: checks a draft against a list of criteria."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from ..spec import AgentSpec, SkillSpec
from ..tools import tool

__all__ = ["CriterionCheck", "ReviewInput", "ReviewOutput", "check_criteria", "make_reviewer"]

_MAX_WORDS = re.compile(r"\b(?:at most|max(?:imum)?|no more than|under)\s+(\d+)\s+words?\b")
_MIN_WORDS = re.compile(r"\b(?:at least|min(?:imum)?|no fewer than)\s+(\d+)\s+words?\b")
_MAX_CHARS = re.compile(r"\b(?:at most|max(?:imum)?|no more than|under)\s+(\d+)\s+char")
_MUST_NOT = re.compile(
    r"\b(?:must not|does not|doesn't|never|no)\s+(?:mention|include|contain)s?\s+(.+)"
)
_MUST = re.compile(r"\b(?:mentions?|includes?|contains?)\s+(.+)")


class CriterionCheck(BaseModel):
    criterion: str
    passed: bool | None
    """None: not checkable mechanically, judge it yourself."""
    detail: str


class CriteriaReport(BaseModel):
    checks: list[CriterionCheck]


def _phrase(raw: str) -> str:
    return raw.strip().strip(".").strip().strip("\"'")


def _check(draft: str, criterion: str) -> CriterionCheck:
    c = criterion.lower().strip()
    words = len(draft.split())
    lowered = draft.lower()
    if m := _MAX_WORDS.search(c):
        n = int(m.group(1))
        return CriterionCheck(criterion=criterion, passed=words <= n, detail=f"{words} words")
    if m := _MIN_WORDS.search(c):
        n = int(m.group(1))
        return CriterionCheck(criterion=criterion, passed=words >= n, detail=f"{words} words")
    if m := _MAX_CHARS.search(c):
        n = int(m.group(1))
        return CriterionCheck(
            criterion=criterion, passed=len(draft) <= n, detail=f"{len(draft)} characters"
        )
    if m := _MUST_NOT.search(c):
        phrase = _phrase(m.group(1))
        found = phrase in lowered
        return CriterionCheck(
            criterion=criterion,
            passed=not found,
            detail=f"{phrase!r} {'found' if found else 'not found'}",
        )
    if m := _MUST.search(c):
        phrase = _phrase(m.group(1))
        found = phrase in lowered
        return CriterionCheck(
            criterion=criterion,
            passed=found,
            detail=f"{phrase!r} {'found' if found else 'not found'}",
        )
    return CriterionCheck(criterion=criterion, passed=None, detail="not mechanically checkable")


@tool(description="Mechanical checks of a draft: word/character limits and required mentions.")
def check_criteria(draft: str, criteria: list[str]) -> CriteriaReport:
    """Check each criterion that has a mechanical form; others come back with passed=None."""
    return CriteriaReport(checks=[_check(draft, c) for c in criteria])


class ReviewInput(BaseModel):
    draft: str = Field(description="The text to review.")
    criteria: list[str] = Field(description="What the draft must satisfy, one per item.")


class ReviewOutput(BaseModel):
    passed: bool = Field(description="True only if every criterion is met.")
    reasons: list[str] = Field(description="One line per criterion: met or not, and why.")


INSTRUCTIONS = """\
You are the quality reviewer of Teacup & Co. You decide whether a draft meets every \
criterion you are given, before it reaches a customer. First call check_criteria: its \
mechanical results (word and character limits, required or forbidden mentions) are \
authoritative and you must not override them. Judge the criteria it marks as not \
checkable yourself, strictly: tone, accuracy against stated facts, no promises the shop \
cannot keep. The draft passes only if every criterion is met. Give one reason per \
criterion, saying whether it was met and, when it was not, exactly what to change. Do not \
rewrite the draft."""


def make_reviewer() -> AgentSpec:
    return AgentSpec(
        name="reviewer",
        description="Reviews drafts against explicit criteria and says what to fix.",
        version="0.1.0",
        instructions=INSTRUCTIONS,
        skills=[
            SkillSpec.from_models(
                "review",
                "Review a draft",
                "Check a draft against a list of criteria; pass only if all are met.",
                input_model=ReviewInput,
                output_model=ReviewOutput,
                tags=["review", "quality"],
                examples=["Check this reply is under 120 words and mentions the order id."],
            )
        ],
        tools=[check_criteria],
    )
