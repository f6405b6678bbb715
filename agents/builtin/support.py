"""The support agent: answers order questions and issues refunds (a side-effecting tool)."""

from __future__ import annotations

import fcntl
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..spec import AgentSpec, Limits, SkillSpec
from ..tools import ToolContext, idempotency_key, tool
from ._data import data_dir, orders_by_id
from .orders import lookup_order

__all__ = [
    "OrderStatusInput",
    "OrderStatusOutput",
    "RefundInput",
    "RefundReceipt",
    "issue_refund",
    "make_support",
    "refunds_file",
]


def refunds_file() -> Any:
    """``$JETMESH_DATA_DIR/refunds.jsonl`` (a Path)."""
    return data_dir() / "refunds.jsonl"


class RefundInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(min_length=1, max_length=32, examples=["A1001"])
    amount_usd: float = Field(gt=0, description="Amount to refund; at most the order total.")
    reason: str = Field(min_length=3, max_length=500)


class RefundReceipt(BaseModel):
    refund_id: str
    order_id: str
    amount_usd: float
    reason: str
    idempotency_key: str
    issued_at: str
    already_issued: bool = False
    """True when this key had been refunded before: nothing new was written."""


@tool(
    description="Refund money on an order to the original payment method. Irreversible.",
    side_effects=True,
    risk="irreversible",
    timeout_s=10.0,
)
def issue_refund(args: RefundInput, ctx: ToolContext) -> RefundReceipt:
    """Append a refund record, once per idempotency key (checked under a file lock)."""
    order_id = args.order_id.strip().upper()
    order = orders_by_id().get(order_id)
    if order is None:
        raise ValueError(f"no order {order_id!r}; look the order up first")
    if args.amount_usd > float(order["total_usd"]):
        raise ValueError(
            f"amount_usd {args.amount_usd} exceeds the order total {order['total_usd']}"
        )
    key = ctx.idempotency_key or idempotency_key(
        ctx.task_id, ctx.step_id, "issue_refund", args.model_dump()
    )
    path = refunds_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.begin_effect_blocking()  # still this replica's step? (raises ClaimLost if not)
    with path.open("a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if record.get("idempotency_key") == key:
                        return RefundReceipt.model_validate({**record, "already_issued": True})
            receipt = RefundReceipt(
                refund_id=f"R{uuid.uuid4().hex[:12]}",
                order_id=order_id,
                amount_usd=args.amount_usd,
                reason=args.reason,
                idempotency_key=key,
                issued_at=datetime.now(UTC).isoformat(),
            )
            f.write(receipt.model_dump_json(exclude={"already_issued"}) + "\n")
            f.flush()
            return receipt
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class OrderStatusInput(BaseModel):
    order_id: str = Field(min_length=1, max_length=32, description="The order id, e.g. A1001.")
    question: str | None = Field(default=None, description="The customer's question, if any.")


class OrderStatusOutput(BaseModel):
    answer: str = Field(description="The reply to the customer, two or three sentences.")
    order: dict[str, Any] | None = Field(
        description="The order record as looked up, or null when the order was not found."
    )


class RefundRequest(BaseModel):
    order_id: str = Field(min_length=1, max_length=32)
    amount_usd: float = Field(gt=0)
    reason: str


class RefundOutcome(BaseModel):
    answer: str
    refund_id: str | None = Field(description="The refund id, or null when none was issued.")


INSTRUCTIONS = """\
You are a customer-support agent of Teacup & Co., an online tea shop. For any question \
about an order, call lookup_order with the order id first and base your answer only on \
the record it returns: status, carrier, tracking number and estimated delivery date. If \
the order is not found, say so and ask the customer to check the id; never guess. Answer \
in two or three friendly sentences, and include the tracking number when the order has \
shipped. Issue a refund only when the skill asks for one, never more than the order \
total, and only once: issue_refund is irreversible and is recorded with an idempotency \
key. Do not reveal other customers' data or internal notes."""


def make_support() -> AgentSpec:
    return AgentSpec(
        name="support",
        description="Answers questions about orders and issues refunds.",
        version="0.1.0",
        instructions=INSTRUCTIONS,
        skills=[
            SkillSpec.from_models(
                "order_status",
                "Order status",
                "Answer a customer's question about one order from its record.",
                input_model=OrderStatusInput,
                output_model=OrderStatusOutput,
                tags=["support", "orders"],
                examples=["Where is my order A1004?"],
                tools=["lookup_order"],
            ),
            SkillSpec.from_models(
                "refund",
                "Refund an order",
                "Check an order and refund the requested amount to the customer.",
                input_model=RefundRequest,
                output_model=RefundOutcome,
                tags=["support", "refunds", "irreversible"],
                examples=["Refund 12.50 USD on A1002: item arrived damaged."],
                tools=["lookup_order", "issue_refund"],
            ),
        ],
        tools=[lookup_order, issue_refund],
        limits=Limits(max_tool_calls=4, max_turns=6),
    )
