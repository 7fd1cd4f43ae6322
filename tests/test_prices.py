"""Default prices and context windows come from genai-prices' bundled data (real data, offline)."""

from __future__ import annotations

import pytest

from router.prices import Price, default_price


@pytest.mark.parametrize("type_, model, expected", [
    ("openai", "gpt-4o", Price(2.5, 10.0, 128000)),
    ("anthropic", "claude-3-5-sonnet-20241022", Price(3.0, 15.0, 200000)),
    ("google", "gemini-2.0-flash", Price(0.1, 0.4, 1000000)),
    ("grok", "grok-2", Price(2.0, 10.0, 32768)),  # our type `grok` is genai-prices' `x-ai`
])
def test_known_models_have_their_published_prices(type_: str, model: str, expected: Price) -> None:
    assert default_price(type_, model) == expected


@pytest.mark.parametrize("type_, model", [
    ("openai", "no-such-model-xyz"),
    ("local", "gpt-4o"),  # engines you run have no list price
    ("huggingface", "meta-llama/Llama-3.2-1B-Instruct"),
])
def test_unknown_is_none_never_free(type_: str, model: str) -> None:
    assert default_price(type_, model) is None


def test_tiered_prices_use_the_base_tier() -> None:
    price = default_price("google", "gemini-1.5-pro")  # tiered above 128k prompt tokens
    assert price is not None and price.input == 1.25 and price.output == 5.0
