"""The order book: the `lookup_order` tool and the deterministic ``orders`` agent (no model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..spec import AgentSpec, SkillSpec
from ..tools import tool
from ._data import orders_by_id

__all__ = ["LookupOrderInput", "Order", "OrderLookup", "lookup_order", "make_orders"]

OrderStatus = Literal["placed", "paid", "shipped", "delivered", "delayed", "cancelled", "returned"]


class OrderItem(BaseModel):
    sku: str
    name: str
    qty: int
    unit_price_usd: float


class Order(BaseModel):
    order_id: str
    customer: str
    email: str
    status: OrderStatus
    items: list[OrderItem]
    total_usd: float
    placed_at: str
    """ISO date."""
    carrier: str | None = None
    tracking: str | None = None
    eta: str | None = None
    """Estimated delivery date (ISO), once shipped."""


class LookupOrderInput(BaseModel):
    order_id: str = Field(
        min_length=1, max_length=32, description="The order id, e.g. A1001.", examples=["A1001"]
    )


class OrderLookup(BaseModel):
    order_id: str
    found: bool
    order: Order | None = None


@tool(description="Look up one order by id: status, items, total, carrier and tracking.",
      blocking=False)  # a dict lookup: no thread hop
def lookup_order(args: LookupOrderInput) -> OrderLookup:
    """Read-only lookup in the bundled order book; an unknown id gives found=false."""
    order_id = args.order_id.strip().upper()
    record = orders_by_id().get(order_id)
    if record is None:
        return OrderLookup(order_id=order_id, found=False)
    return OrderLookup(order_id=order_id, found=True, order=Order.model_validate(record))


def make_orders() -> AgentSpec:
    return AgentSpec(
        name="orders",
        description="The order book: looks up an order by id. Deterministic, no model.",
        version="0.1.0",
        instructions="Serves order lookups directly from the order book; no model is used.",
        skills=[
            SkillSpec.from_models(
                "lookup_order",
                "Look up an order",
                "Return the order record for an order id (found=false when it does not exist).",
                input_model=LookupOrderInput,
                output_model=OrderLookup,
                tags=["orders", "deterministic"],
                examples=["A1001"],
            )
        ],
        tools=[lookup_order],
        direct={"lookup_order": "lookup_order"},
    )
