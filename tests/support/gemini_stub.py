"""A Gemini API server on loopback, for tests.

Each request body is validated strictly against the official `google-genai`
SDK's types (its pydantic models forbid unknown keys); answers and stream
chunks are `GenerateContentResponse` objects of that SDK, serialised with
their wire (camelCase) names.

What it answers depends on the model (see `script`); each script is a list of
stream chunks, and the non-streaming answer is those chunks merged.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from google.genai import types as t
from pydantic import TypeAdapter, ValidationError

from tests.support.server import ThreadedServer, sse_response

TOP_LEVEL: dict[str, TypeAdapter[Any]] = {
    "contents": TypeAdapter(list[t.Content]),
    "systemInstruction": TypeAdapter(t.Content),
    "tools": TypeAdapter(list[t.Tool]),
    "toolConfig": TypeAdapter(t.ToolConfig),
    "generationConfig": TypeAdapter(t.GenerationConfig),
    "safetySettings": TypeAdapter(list[t.SafetySetting]),
}
USAGE = t.GenerateContentResponseUsageMetadata(prompt_token_count=12, candidates_token_count=6,
                                               thoughts_token_count=2, total_token_count=20)


def request_errors(body: dict[str, Any]) -> list[str]:
    errors = [f"unknown field {k!r}" for k in body if k not in TOP_LEVEL]
    for key, adapter in TOP_LEVEL.items():
        if key in body:
            try:
                adapter.validate_python(body[key])
            except ValidationError as exc:
                errors += [f"{key}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    if not body.get("contents"):
        errors.append("contents is required")
    return errors


def text(s: str) -> t.Part:
    return t.Part(text=s)


def call(name: str, args: dict[str, Any]) -> t.Part:
    return t.Part(function_call=t.FunctionCall(name=name, args=args))


def chunk(parts: list[t.Part] | None, finish: str | None = None, usage: bool = False,
          index: int = 0) -> t.GenerateContentResponse:
    candidate = t.Candidate(index=index, finish_reason=t.FinishReason(finish) if finish else None,
                            content=t.Content(role="model", parts=parts) if parts is not None else None)
    return t.GenerateContentResponse(candidates=[candidate], usage_metadata=USAGE if usage else None,
                                     model_version="gemini-stub-001", response_id="resp_stub")


def script(model: str, candidate_count: int) -> list[t.GenerateContentResponse]:
    if model == "gemini-tools":  # the call and STOP arrive in different chunks
        return [chunk([text("Let me check.")]), chunk([call("get_weather", {"city": "Paris"})]),
                chunk([call("get_time", {"tz": "CET"})]), chunk([], "STOP", usage=True)]
    if model == "gemini-max":
        return [chunk([text("Hello")]), chunk([text(" wor")], "MAX_TOKENS", usage=True)]
    if model.startswith("gemini-filter-"):  # a candidate without content, stopped by a filter
        return [chunk(None, model.removeprefix("gemini-filter-").upper(), usage=True)]
    if model == "gemini-blocked":  # the prompt itself is blocked: no candidates at all
        return [t.GenerateContentResponse(
            prompt_feedback=t.GenerateContentResponsePromptFeedback(block_reason=t.BlockedReason.SAFETY),
            usage_metadata=USAGE, model_version="gemini-stub-001", response_id="resp_stub")]
    if model == "gemini-thinking":
        return [chunk([t.Part(text="Let me think...", thought=True)]), chunk([text("42")], "STOP", usage=True)]
    if candidate_count > 1:
        return [t.GenerateContentResponse(candidates=[
            t.Candidate(index=i, finish_reason=t.FinishReason.STOP,
                        content=t.Content(role="model", parts=[text(f"Answer {i}")])) for i in range(candidate_count)],
            usage_metadata=USAGE, model_version="gemini-stub-001", response_id="resp_stub")]
    return [chunk([text("Hello ")]), chunk([text("from gemini")]), chunk([], "STOP", usage=True)]


def merged(chunks: list[t.GenerateContentResponse]) -> t.GenerateContentResponse:
    if len(chunks) == 1:
        return chunks[0]
    parts: list[t.Part] = []
    finish = None
    for c in chunks:
        cand = (c.candidates or [None])[0]
        if cand is not None and cand.content is not None:
            parts += cand.content.parts or []
        if cand is not None and cand.finish_reason:
            finish = cand.finish_reason
    return t.GenerateContentResponse(
        candidates=[t.Candidate(index=0, finish_reason=finish, content=t.Content(role="model", parts=parts))],
        usage_metadata=USAGE, model_version="gemini-stub-001", response_id="resp_stub")


def wire(response: t.GenerateContentResponse) -> bytes:
    return response.model_dump_json(by_alias=True, exclude_none=True).encode()


class GeminiStub(ThreadedServer):
    name = "google"

    def __init__(self, key: str, model_ids: list[str] | None = None) -> None:
        super().__init__()
        self.key = key
        self.model_ids = model_ids or ["gemini-3-pro", "gemini-3-flash", "text-embedding-005"]

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self._generate)
        app.router.add_get("/v1beta/models", self._models)

    def _error(self, code: int, status: str, message: str) -> web.Response:
        headers = {"retry-after": "13"} if code == 429 else None
        return web.json_response({"error": {"code": code, "message": message, "status": status}}, status=code,
                                 headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        self.record(request, b"")
        if request.headers.get("x-goog-api-key") != self.key:
            return self._error(403, "PERMISSION_DENIED", "API key not valid.")
        start = int(request.query.get("pageToken", "0"))  # pages of two
        models = [{"name": f"models/{m}", "supportedGenerationMethods":
                   ["embedContent"] if "embedding" in m else ["generateContent", "countTokens"]}
                  for m in self.model_ids[start:start + 2]]
        body: dict[str, Any] = {"models": models}
        if start + 2 < len(self.model_ids):
            body["nextPageToken"] = str(start + 2)
        return web.json_response(body)

    def _embed(self, model: str, body: dict[str, Any]) -> web.Response:
        """`batchEmbedContents`: each request checked against the REST shape (its content with the SDK's
        `Content`); deterministic vectors, `outputDimensionality` long (else 6)."""
        errors = [f"unknown field {k!r}" for k in body if k != "requests"]
        answers = []
        for i, item in enumerate(body.get("requests") or []):
            errors += [f"requests[{i}]: unknown field {k!r}" for k in item
                       if k not in ("model", "content", "taskType", "title", "outputDimensionality")]
            if item.get("model") != f"models/{model}":
                errors.append(f"requests[{i}].model must be models/{model}")
            try:
                content = TypeAdapter(t.Content).validate_python(item.get("content"))
            except ValidationError as exc:
                errors.append(f"requests[{i}].content: {exc.errors()[0]['msg']}")
                continue
            text = "".join(p.text or "" for p in content.parts or [])
            size = item.get("outputDimensionality") or 6
            answers.append({"values": [((sum(map(ord, text)) * (k + 2)) % 89) / 89.0 for k in range(size)]})
        if not body.get("requests"):
            errors.append("requests is required")
        if errors:
            self.violations.extend(errors)
            return self._error(400, "INVALID_ARGUMENT", "; ".join(errors))
        return web.json_response({"embeddings": answers})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        received = self.record(request, raw)
        if "key" in received.query:
            self.violations.append("API key sent in the URL")
        if request.headers.get("x-goog-api-key") != self.key:
            return self._error(400, "INVALID_ARGUMENT",
                               f"API key not valid: {request.headers.get('x-goog-api-key')}")
        model, _, action = request.match_info["call"].partition(":")
        body = orjson.loads(raw)
        if action == "batchEmbedContents":
            return self._embed(model, body)
        errors = request_errors(body)
        if errors:
            self.violations.extend(errors)
            return self._error(400, "INVALID_ARGUMENT", "; ".join(errors))
        if model.startswith("gemini-error-"):
            code = int(model.rsplit("-", 1)[1])
            status = {429: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT", 500: "INTERNAL"}.get(code, "UNKNOWN")
            return self._error(code, status, f"stub says {code}")
        count = (body.get("generationConfig") or {}).get("candidateCount") or 1
        chunks = script(model, count)
        if action == "generateContent":
            return web.Response(body=wire(merged(chunks)), content_type="application/json")
        if action != "streamGenerateContent" or request.query.get("alt") != "sse":
            return self._error(404, "NOT_FOUND", f"unknown action {action}")
        newline = b"\r\n" if model == "gemini-crlf" else b"\n"
        events = [b"data: " + wire(c) + newline + newline for c in chunks]
        if model == "gemini-midstream-error":
            events = events[:1] + [b"data: " + orjson.dumps({"error": {"code": 500, "message": "Internal error",
                                                                       "status": "INTERNAL"}}) + b"\n\n"]
        elif model == "gemini-truncated":
            events = events[:1]
        return await sse_response(request, events)
