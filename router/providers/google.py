"""Google Gemini: OpenAI chat completions <-> `models/{model}:generateContent`
and `:streamGenerateContent?alt=sse` (key in the `x-goog-api-key` header,
never in the URL).

Request rules (OpenAI -> Gemini):
- assistant -> `model`; system and developer messages -> `systemInstruction`;
  consecutive turns of one role merge; empty text is never sent.
- assistant `tool_calls` -> `functionCall` parts; a `tool` message ->
  a `functionResponse` named after the function its `tool_call_id` refers to
  (looked up across all earlier assistant turns), whose `response` is always a
  JSON object (non-object results are wrapped as `{"result": ...}`).
- tools -> `functionDeclarations` with the JSON Schema as `parametersJsonSchema`;
  `tool_choice` auto/none/required/named -> AUTO/NONE/ANY/ANY+allowedFunctionNames.
- `generationConfig`: `max_tokens`/`max_completion_tokens` -> maxOutputTokens,
  `stop` -> stopSequences, temperature, topP, `n` -> candidateCount, seed,
  presence/frequency penalties, `response_format` -> responseMimeType +
  responseJsonSchema.
- data-URI images -> `inlineData`; other image URLs -> `fileData`.
- Rejected with 400: `logprobs`, audio output, other part types. Other OpenAI
  parameters have no Gemini meaning and are dropped.

Response rules: text parts join (thought parts are left out); each
`functionCall` -> a tool call with a generated id; STOP -> stop, or tool_calls
when the turn called a function (even if the call and STOP came in different
chunks); MAX_TOKENS -> length; safety-like reasons -> content_filter; a
blocked prompt or a candidate without content -> a content_filter choice.
Usage comes once, at the end of a stream.
"""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator
from typing import Any

import orjson
from httpx_sse import ServerSentEvent

from starlette.responses import Response

from router.embeddings import embedding_response, inputs_of
from router.errors import RouterError, upstream_error
from router.providers.base import ChatCall
from router.upstream import JSONAnswer, pass_headers
from router.providers.translate import (
    JSON, ChunkWriter, TranslatingProvider, append_turn, bad_request, choice, completion, data_uri, function_tools,
    max_tokens_of, named_tool_choice, new_id, parse_arguments, reject_unsupported, stop_list, text_of,
    tool_call, usage_block,
)

FILTERED = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "MODEL_ARMOR",
})

# google.rpc status names of Gemini's error bodies, and OpenAI's error types for them
ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error", "FAILED_PRECONDITION": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error", "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "invalid_request_error", "RESOURCE_EXHAUSTED": "rate_limit_error",
}


def finish_reason(reason: str | None, called_function: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FILTERED:
        return "content_filter"
    return "tool_calls" if called_function else "stop"


class GoogleProvider(TranslatingProvider):
    type = "google"
    url_var = "GOOGLE_BASE_URL"
    key_var = "EXTERNAL_GOOGLE_KEY"
    key_header = "x-goog-api-key"  # never in the URL, where it would end up in logs
    key_scheme = ""

    def build_request(self, call: ChatCall) -> tuple[str, bytes, dict[str, str]]:
        model = call.model.removeprefix("google/").removeprefix("models/")
        action = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        return (f"{self.base_url}/v1beta/models/{model}:{action}",
                orjson.dumps(to_gemini(call.payload)), self.headers())

    def build_completion(self, data: JSON, call: ChatCall) -> bytes:
        choices = []
        candidates = data.get("candidates") or []
        for position, candidate in enumerate(candidates):
            texts, calls = candidate_parts(candidate)
            index = candidate.get("index", position)
            if not texts and not calls:  # no content: blocked or emptied by a filter
                choices.append(choice(index, None, [], "content_filter"))
                continue
            choices.append(choice(index, "".join(texts) or None, calls,
                                  finish_reason(candidate.get("finishReason"), bool(calls))))
        if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
            choices.append(choice(0, None, [], "content_filter"))
        cid = "chatcmpl-" + data["responseId"] if data.get("responseId") else new_id()
        return completion(cid, data.get("modelVersion") or call.model, choices,
                          usage_of(data.get("usageMetadata") or {}))

    async def embeddings(self, call: ChatCall) -> Response:
        """`batchEmbedContents`, one request per input text. Gemini reports no tokens for embeddings: the
        usage is an estimate (about 4 characters a token)."""
        inputs = inputs_of(call.payload)
        if not all(isinstance(text, str) for text in inputs):
            raise RouterError(400, "Gemini deployments embed text, not token arrays.", param="input",
                              code="invalid_value")
        model = call.model.removeprefix("google/").removeprefix("models/")
        dimensions = call.payload.get("dimensions")
        extra = {"outputDimensionality": dimensions} if dimensions is not None else {}
        body = orjson.dumps({"requests": [{"model": f"models/{model}", "content": {"parts": [{"text": text}]},
                                           **extra} for text in inputs]})
        url = f"{self.base_url}/v1beta/models/{model}:batchEmbedContents"
        resp = await self.http.open(self.type, url, body, self.headers())
        data = await self.http.read(self.type, url, resp)
        if resp.status >= 400:
            raise self.build_error(resp.status, data, pass_headers(resp))
        try:
            vectors = [[float(v) for v in e["values"]] for e in orjson.loads(data)["embeddings"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RouterError(502, f"upstream {self.type} sent embeddings the router could not read: "
                              f"{exc.__class__.__name__}", code="upstream_bad_response") from None
        if len(vectors) != len(inputs):
            raise RouterError(502, f"upstream {self.type} sent {len(vectors)} embeddings for {len(inputs)} inputs",
                              code="upstream_bad_response")
        tokens = sum(len(text) // 4 + 1 for text in inputs)  # about 4 characters a token
        encoding = call.payload.get("encoding_format", "float")
        out = JSONAnswer(embedding_response(vectors, call.model, tokens, encoding), 200, {})
        out.usage = {"prompt_tokens": tokens, "total_tokens": tokens, "estimated": True}
        return out

    def build_error(self, status: int, body: bytes, headers: dict[str, str]) -> RouterError:
        err = upstream_error(status, body, self.http.scrub, self.type, headers)
        try:
            status_name = orjson.loads(body)["error"]["status"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return err
        err.code = status_name
        err.type = ERROR_TYPES.get(status_name, err.type)
        return err

    async def translate_stream(self, events: AsyncIterator[ServerSentEvent], call: ChatCall,
                               out: ChunkWriter) -> AsyncIterator[bytes]:
        started: set[int] = set()  # candidates whose role chunk was sent
        produced: set[int] = set()  # candidates that sent text or a function call
        called: dict[int, int] = {}  # candidate -> tool calls so far
        finished: set[int] = set()
        usage: JSON = {}
        async for event in events:
            if not event.data:
                continue
            data = orjson.loads(event.data)
            if "error" in data:
                err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
                raise RouterError(int(err.get("code") or 502), self.http.scrub(str(err.get("message"))),
                                  code=err.get("status"))
            if data.get("responseId"):
                out.base["id"] = "chatcmpl-" + data["responseId"]
            if data.get("modelVersion"):
                out.base["model"] = data["modelVersion"]
            usage = data.get("usageMetadata") or usage  # cumulative: the last one holds the totals
            candidates = data.get("candidates") or []
            if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
                yield out.delta({"role": "assistant"})
                yield out.delta({}, "content_filter")
                finished.add(0)
            for position, candidate in enumerate(candidates):
                index = candidate.get("index", position)
                if index not in started:
                    started.add(index)
                    yield out.delta({"role": "assistant"}, index=index)
                texts, calls = candidate_parts(candidate)
                text = "".join(texts)
                if text or calls:
                    produced.add(index)
                if text:
                    yield out.delta({"content": text}, index=index)
                if calls:
                    first = called.get(index, 0)
                    called[index] = first + len(calls)
                    yield out.delta({"tool_calls": [{"index": first + k, **c} for k, c in enumerate(calls)]},
                                    index=index)
                reason = candidate.get("finishReason")
                if reason and index not in finished:
                    finished.add(index)
                    final = (finish_reason(reason, bool(called.get(index))) if index in produced
                             else "content_filter")  # a candidate that ends without any content
                    yield out.delta({}, final, index=index)
        if not finished:
            raise RouterError(502, "upstream google closed the stream before a finish reason",
                              code="upstream_stream_truncated")
        if out.include_usage:
            yield out.usage(usage_of(usage))
        yield out.done()


# -- requests --------------------------------------------------------------------


def image_part(url: str) -> JSON:
    inline = data_uri(url)
    if inline:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def user_parts(content: Any, param: str) -> list[JSON]:
    if isinstance(content, str) or content is None:
        return [{"text": content}] if content and content.strip() else []
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for {param}: expected a string or an array of parts.", param)
    parts: list[JSON] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request("image_url.url is required.", f"{param}[{i}].image_url")
            parts.append(image_part(url))
        else:
            raise bad_request(f"Content parts of type {kind!r} are not supported by google.", f"{param}[{i}]")
    return parts


def function_response(content: Any, param: str) -> JSON:
    text = text_of(content, param)
    try:
        value = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}


def to_gemini(payload: JSON) -> JSON:
    reject_unsupported(payload, "google")
    system: list[JSON] = []
    contents: list[JSON] = []
    names: dict[str, Any] = {}  # tool_call_id -> function name, from every earlier assistant turn

    def add(role: str, parts: list[JSON]) -> None:
        append_turn(contents, role, parts, "parts")

    for i, message in enumerate(payload["messages"]):
        role, param = message["role"], f"messages[{i}]"
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content, f"{param}.content")
            if text.strip():
                system.append({"text": text})
        elif role == "user":
            add("user", user_parts(content, f"{param}.content"))
        elif role == "assistant":
            text = text_of(content, f"{param}.content")
            parts: list[JSON] = [{"text": text}] if text.strip() else []
            for j, call in enumerate(message.get("tool_calls") or []):
                fn = call.get("function") or {}
                if isinstance(call.get("id"), str):
                    names[call["id"]] = fn.get("name")
                parts.append({"functionCall": {
                    "name": fn.get("name"),
                    "args": parse_arguments(fn.get("arguments"), f"{param}.tool_calls[{j}].function.arguments")}})
            add("model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise bad_request(f"tool_call_id {call_id!r} does not match a tool call of an earlier "
                                  "assistant message.", f"{param}.tool_call_id")
            add("user", [{"functionResponse": {"name": name,
                                               "response": function_response(content, f"{param}.content")}}])
        else:
            raise bad_request(f"Messages with role {role!r} are not supported by google; use 'tool'.",
                              f"{param}.role")

    body: JSON = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = function_tools(payload)
    if tools:
        body["tools"] = [{"functionDeclarations": [declaration(fn) for fn in tools]}]
        config = tool_config(payload.get("tool_choice"))
        if config:
            body["toolConfig"] = config
    generation = generation_config(payload)
    if generation:
        body["generationConfig"] = generation
    return body


def declaration(fn: JSON) -> JSON:
    out: JSON = {"name": fn["name"]}
    if isinstance(fn.get("description"), str) and fn["description"]:
        out["description"] = fn["description"]
    if isinstance(fn.get("parameters"), dict) and fn["parameters"].get("properties"):
        out["parametersJsonSchema"] = fn["parameters"]
    return out


def tool_config(choice_: Any) -> JSON | None:
    name = named_tool_choice(choice_)
    if name is not None:
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    modes = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
    if choice_ is None:
        return None
    if choice_ not in modes:
        raise bad_request("tool_choice must be 'auto', 'required', 'none' or a named function.", "tool_choice")
    return {"functionCallingConfig": {"mode": modes[choice_]}}


def generation_config(payload: JSON) -> JSON:
    out: JSON = {}
    max_tokens = max_tokens_of(payload)
    if max_tokens:
        out["maxOutputTokens"] = max_tokens
    stops = stop_list(payload.get("stop"))
    if stops:
        out["stopSequences"] = stops
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        value = payload.get(ours)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise bad_request(f"'{ours}' must be a number.", ours)
            out[theirs] = value
    n = payload.get("n")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad_request("'n' must be a positive integer.", "n")
        if n > 1:
            out["candidateCount"] = n
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        out["responseMimeType"] = "application/json"
        if fmt["type"] == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema is required.", "response_format")
            out["responseJsonSchema"] = schema
    return out


# -- responses -------------------------------------------------------------------


def candidate_parts(candidate: JSON) -> tuple[list[str], list[JSON]]:
    texts: list[str] = []
    calls: list[JSON] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if "functionCall" in part:
            fc = part["functionCall"]
            calls.append(tool_call(fc.get("id") or new_id("call_"), fc["name"], fc.get("args") or {}))
        elif isinstance(part.get("text"), str) and not part.get("thought"):
            texts.append(part["text"])
    return texts, calls


def usage_of(meta: JSON) -> JSON:
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    thoughts = meta.get("thoughtsTokenCount") or 0
    completion_tokens = (meta.get("candidatesTokenCount") or 0) + thoughts
    return usage_block(prompt, completion_tokens, cached=meta.get("cachedContentTokenCount") or 0,
                       reasoning=thoughts)
