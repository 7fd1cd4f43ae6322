"""Token estimates from the parsed request: text / 4 plus framing, fixed amounts for images and files."""

from __future__ import annotations

import pytest

from router.routing.estimate import (
    DEFAULT_OUTPUT_TOKENS, IMAGE_LOW_TOKENS, IMAGE_TOKENS, MESSAGE_TOKENS, OTHER_PART_TOKENS, REPLY_TOKENS,
    output_tokens, prompt_tokens,
)

FRAMING = REPLY_TOKENS + MESSAGE_TOKENS


def test_text_counts_a_token_per_four_characters_plus_framing() -> None:
    payload = {"messages": [{"role": "system", "content": "a" * 400}, {"role": "user", "content": "b" * 4000}]}
    assert prompt_tokens(payload) == REPLY_TOKENS + 2 * MESSAGE_TOKENS + 1100


def test_parts_images_files_tool_calls_and_tools() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    low = {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "low"}}
    audio = {"type": "input_audio", "input_audio": {"data": "B" * 50_000, "format": "wav"}}
    payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "c" * 40}, image, low, audio]}]}
    assert prompt_tokens(payload) == FRAMING + 10 + IMAGE_TOKENS + IMAGE_LOW_TOKENS + OTHER_PART_TOKENS

    call = {"id": "1", "type": "function", "function": {"name": "f" * 8, "arguments": "{" + "x" * 31}}
    with_calls = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    assert prompt_tokens(with_calls) == FRAMING + 10
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with_tools = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert prompt_tokens(with_tools) > prompt_tokens({"messages": [{"role": "user", "content": "hi"}]}) + 10


@pytest.mark.parametrize("payload", [
    {}, {"messages": "nope"}, {"messages": [None, 3, {"content": 5}, {"content": [None, "x", {"type": "?"}]}]},
    {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}, {"function": {"name": 3}}]}]},
])
def test_odd_shapes_never_raise(payload: dict) -> None:
    assert prompt_tokens(payload) >= 0


def test_output_tokens_prefers_max_completion_tokens_then_max_tokens_then_default() -> None:
    assert output_tokens({"max_completion_tokens": 100, "max_tokens": 50}) == 100
    assert output_tokens({"max_tokens": 50}) == 50
    assert output_tokens({}) == DEFAULT_OUTPUT_TOKENS == 256
    assert output_tokens({}, default=64) == 64
    for bad in (True, -1, 0, "100", 1.5, None):
        assert output_tokens({"max_tokens": bad}) == DEFAULT_OUTPUT_TOKENS
