"""Model prices (data in ``prices.json``) and the cost of one call."""

from __future__ import annotations

import json
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter

from jetmesh.agents.models.types import Usage

__all__ = ["DEFAULT_PRICES_FILE", "Price", "cost_usd", "load_prices", "price_for"]

log = logging.getLogger(__name__)

DEFAULT_PRICES_FILE = Path(__file__).with_name("prices.json")
"""The bundled price table."""
PRICES_FILE_ENV = "JETMESH_PRICES_FILE"


class Price(BaseModel):
    """Price of one model in USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None
    """Input tokens read from the prompt cache; None: the input price."""
    cache_write_per_mtok: float | None = None
    """Input tokens written to the prompt cache; None: the input price."""


PriceTable = dict[str, dict[str, Price]]
_TABLE = TypeAdapter(PriceTable)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a price table must be a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}


@lru_cache(maxsize=8)
def _load(override: str | None) -> PriceTable:
    merged: dict[str, dict[str, Any]] = {
        provider: dict(models) for provider, models in _read(DEFAULT_PRICES_FILE).items()
    }
    if override:
        for provider, models in _read(Path(override)).items():
            merged.setdefault(provider, {}).update(models)
    return _TABLE.validate_python(merged)


def load_prices() -> PriceTable:
    """The bundled table with ``$JETMESH_PRICES_FILE`` merged over it (cached per path)."""
    return _load(os.environ.get(PRICES_FILE_ENV) or None)


def price_for(provider: str, model: str) -> Price | None:
    """Exact match, else the longest key that ``model`` extends with ``-``, else ``*``."""
    models = load_prices().get(provider, {})
    if model in models:
        return models[model]
    prefixes = [k for k in models if k != "*" and model.startswith(k + "-")]
    if prefixes:
        return models[max(prefixes, key=len)]
    return models.get("*")


def cost_usd(provider: str, model: str, usage: Usage) -> float:
    """USD cost of ``usage``: uncached input, cache reads and cache writes each at their
    price, plus output; unknown models cost 0 (warned once per model)."""
    price = price_for(provider, model)
    if price is None:
        with _warned_lock:
            first = (provider, model) not in _warned
            _warned.add((provider, model))
        if first:
            log.warning("no price known for %s/%s: counting its cost as 0", provider, model)
        return 0.0
    read = max(0, usage.cache_read_tokens)
    write = max(0, usage.cache_write_tokens)
    uncached = max(0, usage.input_tokens - read - write)
    read_price = price.input_per_mtok if price.cache_read_per_mtok is None \
        else price.cache_read_per_mtok
    write_price = price.input_per_mtok if price.cache_write_per_mtok is None \
        else price.cache_write_per_mtok
    return (
        float(
            uncached * price.input_per_mtok + read * read_price + write * write_price
            + usage.output_tokens * price.output_per_mtok
        )
        / 1_000_000
    )
