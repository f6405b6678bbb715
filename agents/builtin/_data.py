"""The bundled demo data (a fictional tea shop): orders and knowledge-base articles."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jetmesh.bus.settings import DATA_DIR_ENV, data_dir  # where the tools write records

__all__ = ["DATA_DIR_ENV", "data_dir", "kb_articles", "orders_by_id"]

_HERE = Path(__file__).parent


def _load(name: str) -> dict[str, Any]:
    data = json.loads((_HERE / name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object")
    return data


@lru_cache(maxsize=1)
def orders_by_id() -> dict[str, dict[str, Any]]:
    """Every bundled order by its id (e.g. ``A1001``)."""
    return {o["order_id"]: o for o in _load("orders.json")["orders"]}


@lru_cache(maxsize=1)
def kb_articles() -> list[dict[str, Any]]:
    """Every bundled knowledge-base article (id, title, text, tags)."""
    articles: list[dict[str, Any]] = _load("kb.json")["articles"]
    return articles
