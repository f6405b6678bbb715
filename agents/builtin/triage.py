"""The triage agent: classify and prioritise an inbound customer request."""

from __future__ import annotations

import re
from typing import Literal, cast

from pydantic import BaseModel, Field

from ..spec import AgentSpec, SkillSpec
from ..tools import tool

__all__ = ["TriageInput", "TriageOutput", "keyword_signals", "make_triage"]

Category = Literal["billing", "shipping", "technical", "account", "other"]
Priority = Literal["low", "normal", "high", "urgent"]

_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "billing": (
        "invoice",
        "charge",
        "charged",
        "refund",
        "payment",
        "paid",
        "price",
        "vat",
        "voucher",
        "card",
        "billing",
    ),
    "shipping": (
        "shipping",
        "delivery",
        "deliver",
        "delivered",
        "tracking",
        "parcel",
        "package",
        "carrier",
        "arrived",
        "late",
        "shipped",
        "lost",
    ),
    "technical": (
        "broken",
        "error",
        "kettle",
        "scale",
        "heat",
        "not working",
        "defect",
        "faulty",
        "e1",
        "e2",
        "warranty",
    ),
    "account": (
        "password",
        "login",
        "log in",
        "sign in",
        "account",
        "email address",
        "gdpr",
        "delete my",
    ),
}
_URGENCY_WORDS: dict[str, tuple[str, ...]] = {
    "urgent": (
        "urgent",
        "asap",
        "immediately",
        "fraud",
        "unauthorized",
        "unauthorised",
        "legal action",
        "lawyer",
        "chargeback",
        "burn",
        "fire",
        "injured",
    ),
    "high": (
        "angry",
        "unacceptable",
        "still waiting",
        "third time",
        "twice",
        "double charged",
        "charged twice",
        "lost",
        "damaged",
        "missing",
    ),
    "low": ("question", "wondering", "curious", "no rush", "whenever", "just asking"),
}


class KeywordSignals(BaseModel):
    """Keywords found in a request, as evidence for the triage decision."""

    categories: dict[str, list[str]] = Field(default_factory=dict)
    """Category -> the keywords of that category found in the text."""
    urgency: dict[str, list[str]] = Field(default_factory=dict)
    """Priority level -> the keywords of that level found in the text."""
    suggested_category: Category
    suggested_priority: Priority


def _found(text: str, words: tuple[str, ...]) -> list[str]:
    return [w for w in words if re.search(rf"\b{re.escape(w)}\b", text)]


@tool(description="Find category and urgency keywords in a request (deterministic).")
def keyword_signals(text: str) -> KeywordSignals:
    """Score a request's words against fixed category and urgency keyword lists."""
    lowered = text.lower()
    categories = {c: h for c, words in _CATEGORY_WORDS.items() if (h := _found(lowered, words))}
    urgency = {p: h for p, words in _URGENCY_WORDS.items() if (h := _found(lowered, words))}
    category = "other"
    if categories:
        category = max(categories, key=lambda c: len(categories[c]))
    priority = next((p for p in ("urgent", "high", "low") if p in urgency), "normal")
    return KeywordSignals(
        categories=categories,
        urgency=urgency,
        suggested_category=cast(Category, category),
        suggested_priority=cast(Priority, priority),
    )


class TriageInput(BaseModel):
    text: str = Field(description="The customer's request, verbatim.")
    channel: str | None = Field(default=None, description="email, chat, phone, ...")


class TriageOutput(BaseModel):
    category: Category
    priority: Priority
    summary: str = Field(description="One sentence: what the customer wants.")
    route_to_skill: str = Field(
        description="The skill that should handle it, e.g. order_status, research, write."
    )


INSTRUCTIONS = """\
You are the triage desk of Teacup & Co., an online tea shop. Read the customer's request \
and decide what kind of request it is and how urgent it is. Call keyword_signals first \
and treat its result as evidence, not as the answer: you understand context the keyword \
lists cannot (a customer who writes "no rush, but I was charged twice" still has a billing \
problem of high priority). Categories: billing (payments, invoices, refunds), shipping \
(delivery, tracking, damaged or lost parcels), technical (products that do not work, \
warranty), account (sign-in, personal data), other. Priority: urgent for fraud, safety or \
legal threats; high for money taken wrongly, lost or damaged goods or repeated contacts; \
low for general questions; normal otherwise. Write a one-sentence neutral summary without \
personal data beyond an order id, and route to the skill that should answer: order_status \
for questions about a specific order, research for policy or product questions, write for \
anything else that needs a written reply."""


def make_triage() -> AgentSpec:
    return AgentSpec(
        name="triage",
        description="Classifies and prioritises inbound customer requests and routes them.",
        version="0.1.0",
        instructions=INSTRUCTIONS,
        skills=[
            SkillSpec.from_models(
                "triage",
                "Triage a request",
                "Classify a customer request (category, priority), summarise it and pick "
                "the skill that should handle it.",
                input_model=TriageInput,
                output_model=TriageOutput,
                tags=["support", "classification", "routing"],
                examples=["My parcel for order A1004 never arrived and I need it by Friday!"],
            )
        ],
        tools=[keyword_signals],
    )
