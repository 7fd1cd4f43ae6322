"""Default prices and context windows of hosted models, from the `genai-prices` package's bundled data
(offline: no network). Called when the route table is built and by `router list-models`, never per
request; an explicit price in the registry overrides these."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

#: our provider types -> genai-prices provider ids (types missing here have no default price: local engines,
#: in-process weights, and providers genai-prices does not know)
PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "google": "google", "groq": "groq",
                "openrouter": "openrouter", "grok": "x-ai"}


@dataclass(frozen=True, slots=True)
class Price:
    input: float | None  # USD per million input tokens
    output: float | None  # USD per million output tokens
    context_window: int | None  # tokens


def _per_million(value: Any) -> float | None:
    """A genai-prices price: a Decimal, or tiered prices whose base applies below the first tier."""
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return float(value)
    base = getattr(value, "base", None)
    return float(base) if base is not None else None


@functools.lru_cache(maxsize=4096)
def default_price(type: str, upstream_model: str) -> Price | None:
    """genai-prices' current price of `upstream_model` at provider `type`; None when it does not know it."""
    provider_id = PROVIDER_IDS.get(type)
    if provider_id is None or not upstream_model:
        return None
    from genai_prices.data_snapshot import get_snapshot

    try:
        _, model = get_snapshot().find_provider_model(upstream_model, None, provider_id, None)
    except LookupError:
        return None
    prices = model.get_prices(datetime.now(tz=UTC))
    price = Price(_per_million(getattr(prices, "input_mtok", None)),
                  _per_million(getattr(prices, "output_mtok", None)), model.context_window)
    return price if price.input is not None or price.output is not None else None
