"""A routed, compacting demo agent (``concierge``) and scripted tier models of known cost
and quality, for the cost-lever eval suite (`evals/cost.yaml`) and its tests.

The models are deterministic functions of the request, priced in the bundled table
(``sim/tier-cheap`` at 1/20 of ``sim/tier-strong``), and they simulate a provider's
prompt cache: a request marked ``cache_prefix`` whose stable prefix (system prompt and
tools) was seen before reports that prefix as cache-read tokens, else as cache-written.

- ``strong`` answers every question right.
- ``cheap`` answers plain questions right; a "why" question gets a well-formed answer
  that leaves out the order id (a silent failure the skill's validator catches), a
  "compare" question an answer with low confidence.

Run it: ``jetmesh worker jetmesh.agents.costdemo:concierge``; measure routing against
all-strong with ``jetmesh eval run evals/cost.yaml`` and ``--models
concierge=sim:jetmesh.agents.costdemo:strong`` (``JETMESH_FORK_MODEL_MODULES=
jetmesh.agents.costdemo`` on the worker).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from pydantic import BaseModel, Field

from .compaction import SUMMARIZER_SYSTEM, CompactionPolicy
from .cost import CostPolicy
from .models.types import ModelRequest, ModelResponse, ToolCall, Usage
from .routing import RouteRule, Routing, Tier, Validator
from .spec import AgentSpec, Limits, ModelPolicy, SkillSpec
from .toolcache import ToolCacheRule
from .tools import tool

__all__ = ["TierSim", "cheap", "concierge", "make_concierge", "page_ref", "strong"]

CHEAP = "tier-cheap"
STRONG = "tier-strong"
MODULE = "jetmesh.agents.costdemo"


def page_ref(n: int) -> str:
    """The identifier printed on page `n` (what a digest must recover)."""
    return f"REF-{n:04d}-{hashlib.sha256(str(n).encode()).hexdigest()[:4]}"


class OrderArgs(BaseModel):
    order_id: str = Field(min_length=1, max_length=16)


class OrderRecord(BaseModel):
    order_id: str
    status: str
    eta: str


@tool(description="The status and ETA of one order (read-only).", blocking=False)
def order_record(args: OrderArgs) -> OrderRecord:
    n = int(re.sub(r"\D", "", args.order_id) or 0)
    return OrderRecord(order_id=args.order_id, status=("shipped", "paid", "delivered")[n % 3],
                       eta=f"2026-12-{10 + n % 18:02d}")


class PageArgs(BaseModel):
    n: int = Field(ge=1, le=1000)


class Page(BaseModel):
    n: int
    ref: str
    text: str


@tool(description="Read page n of the case file (large pages, read-only).", blocking=False)
def read_page(args: PageArgs) -> Page:
    filler = " ".join(f"line {i} of page {args.n}: nothing of note here." for i in range(40))
    return Page(n=args.n, ref=page_ref(args.n), text=filler)


class AnswerInput(BaseModel):
    order_id: str
    question: str


class Answer(BaseModel):
    order_id: str
    answer: str
    confidence: float = Field(ge=0, le=1)


class DigestInput(BaseModel):
    pages: int = Field(ge=1, le=200)
    want: list[int]
    """Pages whose references the answer must give."""


class Digest(BaseModel):
    refs: list[str]
    pages_read: int


def _skill(request: ModelRequest) -> str:
    m = re.search(r"Current skill: .*? \(`([^`]+)`\)", request.system)
    return m.group(1) if m else ""


def _input(request: ModelRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.messages[0].content)
    except (ValueError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


class TierSim:
    """A scripted model of known quality (``strong`` or not) with a simulated cache."""

    provider = "sim"
    _cached: dict[str, set[str]] = {}
    """Model name -> the prefixes in its cache, shared by every instance in the process
    (a provider's cache is the server's, whichever client asks)."""

    def __init__(self, name: str, *, strong: bool) -> None:
        self.name = name
        self.strong = strong
        self.calls = 0
        self._prefixes = self._cached.setdefault(name, set())

    def _answer(self, request: ModelRequest) -> str | list[ToolCall]:
        if request.system == SUMMARIZER_SYSTEM:
            # A lossy summariser: it names no identifier (those come from the records).
            return json.dumps({"intent": "digest the case file",
                               "decisions": ["kept reading the case file page by page"],
                               "open_questions": [], "next_steps": ["read the next page"]})
        given = _input(request)
        results = [m for m in request.messages if m.role == "tool"]
        corrected = any(m.role == "user" and m.content.startswith("Your ")
                        for m in request.messages[1:])
        if _skill(request).startswith("digest"):
            # Progress is read from the context (tool results, or a compaction summary).
            seen = " ".join(m.content for m in request.messages[1:])
            done = max((int(n) for n in re.findall(r"REF-(\d{4})-", seen)), default=0)
            if done < int(given.get("pages", 0)):
                return [ToolCall(id=f"p{done + 1}", name="read_page",
                                 arguments={"n": done + 1})]
            refs = [r for n in given.get("want", []) for r in [page_ref(int(n))] if r in seen]
            return json.dumps({"refs": refs, "pages_read": done})
        if not results:
            return [ToolCall(id="o1", name="order_record",
                             arguments={"order_id": given.get("order_id", "")})]
        record = json.loads(results[-1].content)
        oid, question = record.get("order_id", ""), str(given.get("question", "")).lower()
        good = {"order_id": oid, "confidence": 0.92,
                "answer": f"Order {oid} is {record.get('status')}, due {record.get('eta')}."}
        if self.strong or corrected:
            return json.dumps(good if self.strong else {**good, "confidence": 0.5,
                                                        "answer": "It is on its way."})
        if "why" in question:
            return json.dumps({**good, "answer": "It is on its way."})  # no order id
        if "compare" in question:
            return json.dumps({**good, "confidence": 0.4})
        return json.dumps(good)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        out = self._answer(request)
        text = out if isinstance(out, str) else ""
        calls = out if isinstance(out, list) else []
        chars = len(request.system) + sum(len(t.model_dump_json()) for t in request.tools)
        prefix = math.ceil(chars / 4)
        total = chars + sum(len(m.content) + sum(len(c.name) + len(json.dumps(c.arguments))
                                                 for c in m.tool_calls)
                            for m in request.messages)
        if request.output_schema is not None:
            total += len(json.dumps(request.output_schema))
        key = hashlib.sha256(f"{request.system}|{[t.name for t in request.tools]}".encode()
                             ).hexdigest()
        read = write = 0
        if request.cache_prefix:
            if key in self._prefixes:
                read = prefix
            else:
                write = prefix
                self._prefixes.add(key)
        out_chars = len(text) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in calls)
        return ModelResponse(
            provider=self.provider, model=self.name, text=text, tool_calls=calls,
            usage=Usage(input_tokens=math.ceil(total / 4), output_tokens=math.ceil(out_chars / 4),
                        cache_read_tokens=read, cache_write_tokens=write),
            stop_reason="tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


def cheap() -> TierSim:
    """The cheap tier's model (a factory: `sim:jetmesh.agents.costdemo:cheap`)."""
    return TierSim(CHEAP, strong=False)


def strong() -> TierSim:
    """The strong tier's model (`sim:jetmesh.agents.costdemo:strong`)."""
    return TierSim(STRONG, strong=True)


def make_concierge(*, compaction: bool = True, summarizer: str = "extract") -> AgentSpec:
    """The demo agent: `answer_order` routed cheap -> strong with validators; the
    `digest_pages` skill compacted (`digest_pages_full`: the same, never compacted),
    its summary extracted from the records or also written by the model."""
    routing = Routing(
        tiers=[Tier(name="cheap", provider="sim", model=f"{MODULE}:cheap"),
               Tier(name="strong", provider="sim", model=f"{MODULE}:strong")],
        rules=[RouteRule(tier="strong", path="question", regex=r"legal|chargeback|lawyer")],
    )
    digest = dict(input_model=DigestInput, output_model=Digest, tools=["read_page"])
    return AgentSpec(
        name="concierge",
        description="Answers order questions (routed cheap -> strong) and digests case files.",
        instructions="You are the tea shop's concierge. Use the tools; answer in JSON.",
        skills=[
            SkillSpec.from_models("answer_order", "Answer an order question",
                                  "Answer a customer's question about one order.",
                                  input_model=AnswerInput, output_model=Answer,
                                  tools=["order_record"]),
            SkillSpec.from_models("digest_pages", "Digest a case file",
                                  "Read every page and give the references asked for.",
                                  **digest),  # type: ignore[arg-type]
            SkillSpec.from_models("digest_pages_full", "Digest a case file (no compaction)",
                                  "Read every page and give the references asked for.",
                                  **digest),  # type: ignore[arg-type]
        ],
        tools=[order_record, read_page],
        model=ModelPolicy(provider="sim", model=f"{MODULE}:cheap", max_tokens=256),
        limits=Limits(max_tool_calls=64, max_turns=70),
        cost=CostPolicy(
            routing={"answer_order": routing},
            validators={"answer_order": [
                Validator(name="order id", path="order_id", regex=r"^A\d{4}$"),
                Validator(name="answer names the order", path="answer",
                          contains_path="order_id")]},
            tool_cache={"order_record": ToolCacheRule(ttl_s=600, scope="shared")},
            compaction=CompactionPolicy(max_context_tokens=4000, keep_recent=4, digest_chars=80,
                                        skills=["digest_pages"],
                                        summarizer=summarizer)  # type: ignore[arg-type]
            if compaction else None,
        ),
    )


concierge = make_concierge()
"""The demo agent (`jetmesh worker jetmesh.agents.costdemo:concierge`)."""
