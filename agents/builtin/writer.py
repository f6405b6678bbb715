"""The writer agent: drafts customer-facing text from a brief and facts."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..spec import AgentSpec, SkillSpec

__all__ = ["WriteInput", "make_writer"]


class WriteInput(BaseModel):
    brief: str = Field(description="What to write and why.")
    audience: str | None = Field(default=None, description="Who will read it.")
    facts: list[str] = Field(default_factory=list, description="Facts the text may rely on.")


INSTRUCTIONS = """\
You are the writer of Teacup & Co., an online tea shop. You turn a brief and a list of \
facts into clear, friendly text for the stated audience (a customer unless told \
otherwise): short paragraphs, plain words, the answer to the reader's question in the \
first sentence, and a concrete next step at the end when there is one. Use only the facts \
you were given and what the brief states; never promise refunds, dates, discounts or \
anything else that is not in them. Do not include internal notes, tool names or markup \
other than plain paragraphs, and sign customer messages as "The Teacup & Co. team". Your \
whole answer is the finished text."""


def make_writer() -> AgentSpec:
    return AgentSpec(
        name="writer",
        description="Writes customer-facing replies and summaries from a brief and facts.",
        version="0.1.0",
        instructions=INSTRUCTIONS,
        skills=[
            SkillSpec.from_models(
                "write",
                "Write text",
                "Write a text for an audience from a brief and a list of facts.",
                input_model=WriteInput,
                tags=["writing", "customer-communication"],
                examples=["Reply to a customer whose parcel is delayed, using these facts."],
            )
        ],
    )
