"""Cheap token estimates for routing (context-window fit, expected cost), from the parsed request.

No tokenizer: a token is about 4 characters of English text, each message adds a few tokens of framing
(role, separators: OpenAI's own accounting counts 3-4), an image a fixed amount (OpenAI's price of a
1024 x 1024 image in high detail, 85 in low detail), and any other non-text part (audio, file) a fixed
amount too. Tool definitions count by the length of their JSON. Text in other scripts has more tokens per
character, so prompts in them are underestimated; nothing here ever raises on odd input.
"""

from __future__ import annotations

from typing import Any

import orjson

CHARS_PER_TOKEN = 4
MESSAGE_TOKENS = 4  # framing per message
REPLY_TOKENS = 3  # the reply's priming
IMAGE_TOKENS = 765
IMAGE_LOW_TOKENS = 85
OTHER_PART_TOKENS = 1000  # audio, files: unknown without decoding them
DEFAULT_OUTPUT_TOKENS = 256


def prompt_tokens(payload: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request: a chat completion's messages (an Anthropic `system` too), a legacy
    completion's `prompt`, an embedding's `input` (token arrays count as they are)."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        for field in ("prompt", "input"):
            if field in payload:
                return _text_tokens(payload[field])
        return 0
    chars = 0
    tokens = REPLY_TOKENS + MESSAGE_TOKENS * len(messages)
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
                elif part.get("type") == "image_url":
                    image = part.get("image_url")
                    low = isinstance(image, dict) and image.get("detail") == "low"
                    tokens += IMAGE_LOW_TOKENS if low else IMAGE_TOKENS
                else:
                    tokens += OTHER_PART_TOKENS
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    for field in ("name", "arguments"):
                        if isinstance(value := function.get(field), str):
                            chars += len(value)
    system = payload.get("system")  # Anthropic's Messages
    if system is not None:
        tokens += _text_tokens(system)
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        try:
            chars += len(orjson.dumps(tools))
        except (TypeError, orjson.JSONEncodeError):
            pass
    return tokens + chars // CHARS_PER_TOKEN


def output_tokens(payload: dict[str, Any], default: int = DEFAULT_OUTPUT_TOKENS) -> int:
    """The request's output limit (max_completion_tokens, else max_tokens), else `default`."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _text_tokens(value: Any) -> int:
    """A string, a list of strings or text blocks, token ids, or lists of token ids."""
    if isinstance(value, str):
        return len(value) // CHARS_PER_TOKEN + 1
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 1
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                total += len(item["text"]) // CHARS_PER_TOKEN + 1
            else:
                total += _text_tokens(item)
        return total
    return 0
