"""The provider interface: what a backend receives and what it must answer.

`ApiProvider` forwards to a remote HTTP API; `WeightProvider` runs weights in
this process. Routing (`router.routing`) picks a provider instance per model;
the endpoint (`router.api.routed`) hands it a parsed `ChatCall` and returns
whatever `Response` it gives back (JSON, or an `SSEResponse` for streams).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import orjson
from starlette.responses import Response

from router.errors import RouterError

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.config import Settings
    from router.upstream import SSEResponse, UpstreamClient


@dataclass(slots=True)
class ChatCall:
    """One chat-completions request, parsed once.

    `body` is the client's exact bytes: pass-through providers forward them
    untouched; translating providers read `payload`.
    """

    model: str
    payload: dict[str, Any]
    body: bytes
    stream: bool
    include_usage: bool
    #: the operation (the endpoint family): "chat", "embeddings", "completions", "messages", "responses"; the
    #: dispatcher calls the provider's method of that name
    op: str = "chat"
    #: what an endpoint hands its providers besides the request (the Responses API: a stored conversation and
    #: where to store the answer); never sent upstream
    context: dict[str, Any] | None = None


class Provider(ABC):
    #: the registry `type` this class serves; also the `provider` metric label
    type: ClassVar[str]
    #: the field this upstream reads the output-token limit from ("max_tokens" or "max_completion_tokens");
    #: a request carrying only the other one gets it renamed (`router.routing.dispatch`); None: bodies pass
    #: untouched
    max_tokens_param: str | None = None

    @abstractmethod
    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        """Answer one chat completion, streaming or not, or raise `RouterError`."""

    async def embeddings(self, call: ChatCall) -> Response:
        """Answer one `/v1/embeddings` request (OpenAI's format), or raise `RouterError`."""
        raise RouterError(400, f"Deployments of type '{self.type}' do not serve embeddings.",
                          code="unsupported_operation", param="model")

    async def messages(self, call: ChatCall) -> Response | SSEResponse:
        """Answer one Anthropic Messages request (`call.payload` is one): translated to a chat completion for
        this provider and its answer back (`router.providers.anthropic_messages`); Anthropic's own deployments
        pass it through instead."""
        from router.providers.anthropic_messages import StreamTranslator, from_chat, to_chat
        from router.providers.chat_stream import rewritten
        from router.upstream import JSONAnswer, SSEResponse

        chat = self._for_chat(to_chat(call.payload), call.model)
        response = await self.chat(ChatCall(call.model, chat, orjson.dumps(chat), call.stream, call.stream))
        if isinstance(response, SSEResponse):
            response.body_iterator = rewritten(response.body_iterator, StreamTranslator(call.model))
            return response
        completion = orjson.loads(response.body)
        out = JSONAnswer(orjson.dumps(from_chat(completion, call.model)), response.status_code, {})
        out.raw_headers += [(k, v) for k, v in response.raw_headers if k not in (b"content-length", b"content-type")]
        out.usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else None
        return out

    async def responses(self, call: ChatCall) -> Response | SSEResponse:
        """Answer one OpenAI Responses request (`call.payload`): translated to a chat completion for this provider
        and its answer back (`router.providers.responses_format`); `call.context` brings the stored conversation
        of `previous_response_id` (`history`) and where to store the answer (`save`). Deployments that serve the
        Responses API themselves pass it through instead."""
        from router.providers.responses_format import conversation, from_chat, new_id, to_chat
        from router.upstream import JSONAnswer, SSEResponse

        context = call.context or {}
        if call.payload.get("previous_response_id") and context.get("history") is None:
            raise RouterError(404, f"Previous response with id '{call.payload['previous_response_id']}' not found.",
                              param="previous_response_id", code="previous_response_not_found")
        chat = self._for_chat(to_chat(call.payload, context.get("history")), call.model)
        response_id, created = new_id("resp"), int(time.time())
        save = context.get("save")
        response = await self.chat(ChatCall(call.model, chat, orjson.dumps(chat), call.stream, call.stream))
        if isinstance(response, SSEResponse):
            response.body_iterator = _as_responses(response.body_iterator, call.payload, response_id, created, chat,
                                                   save)
            return response
        completion = orjson.loads(response.body)
        answer = from_chat(completion, call.payload, response_id, created)
        if save is not None:
            save(response_id, answer, conversation(chat, answer))
        out = JSONAnswer(orjson.dumps(answer), response.status_code, {})
        out.usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else None
        return out

    def _for_chat(self, chat: dict[str, Any], model: str) -> dict[str, Any]:
        """A translated request as this provider's chat: its upstream model, the output limit in its field."""
        chat["model"] = model
        param = self.max_tokens_param
        if param is not None and param != "max_tokens" and "max_tokens" in chat:
            chat[param] = chat.pop("max_tokens")
        return chat

    async def completions(self, call: ChatCall) -> Response | SSEResponse:
        """Answer one legacy `/v1/completions` request, streaming or not, or raise `RouterError`."""
        raise RouterError(400, f"Deployments of type '{self.type}' do not serve the legacy completions API; "
                          "use /v1/chat/completions.", code="unsupported_operation", param="model")


class ApiProvider(Provider):
    """A provider reached over HTTP through the router's shared connection pool.

    Subclasses name the settings that hold their default base URL and key;
    `from_settings` builds one for the default endpoint or a registry endpoint.
    The key is sent only to the origin of the configured base URL: a registry
    entry on another host gets no key, so a provider key never leaks elsewhere.
    """

    #: environment variables of the default base URL and the key
    url_var: ClassVar[str]
    key_var: ClassVar[str | None] = None
    #: whether a request to the configured endpoint needs the key
    needs_key: ClassVar[bool] = True
    #: how the key is sent: header name and the scheme before it
    key_header: ClassVar[str] = "Authorization"
    key_scheme: ClassVar[str] = "Bearer "
    #: OpenAI-compatible servers that are not OpenAI (llama.cpp, vLLM, ...) read `max_tokens` and may ignore
    #: `max_completion_tokens`; OpenAI itself and translating providers say otherwise
    max_tokens_param: str | None = "max_tokens"

    def __init__(self, http: UpstreamClient, base_url: str, api_key: SecretStr | None = None,
                 *, key_required: bool = True, settings: Settings | None = None) -> None:
        self.http = http
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key
        self.key_required = key_required and self.key_var is not None
        self.settings = settings

    @classmethod
    def from_settings(cls, http: UpstreamClient, endpoint: str | None, settings: Settings) -> Provider:
        default = getattr(settings, cls.url_var.lower())
        base = endpoint or default
        if not base:
            return MisconfiguredProvider(cls.type, f"set {cls.url_var}")
        official = bool(default) and same_origin(base, default)
        key = getattr(settings, cls.key_var.lower()) if cls.key_var and official else None
        return cls(http, base, key, key_required=official and cls.needs_key, settings=settings)

    def extra_headers(self) -> dict[str, str]:
        """Provider-specific headers sent with every request (besides the key)."""
        return {}

    def headers(self) -> dict[str, str]:
        """The request headers, key included; built once, then only looked up."""
        headers: dict[str, str] | None = getattr(self, "_headers", None)
        if headers is None:
            headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **self.extra_headers()}
            key = self.require_key()
            if key:
                headers[self.key_header] = self.key_scheme + key
            self._headers = headers
        return headers

    def require_key(self) -> str | None:
        if self.api_key is None:
            if self.key_required:
                raise RouterError(
                    500, f"provider '{self.type}' is not configured: set {self.key_var}",
                    code="provider_not_configured")
            return None
        return self.api_key.get_secret_value()


async def _as_responses(source: AsyncIterator[bytes], request: dict[str, Any], response_id: str, created: int,
                        chat: dict[str, Any], save: Any) -> AsyncIterator[bytes]:
    """A chat stream as the Responses API's events; the finished response stored when asked."""
    from router.providers.chat_stream import rewritten
    from router.providers.responses_format import StreamTranslator, conversation

    translator = StreamTranslator(request, response_id, created)
    async for out in rewritten(source, translator):
        yield out
    if translator.final is not None and save is not None:
        save(response_id, translator.final, conversation(chat, translator.final))


class WeightProvider(Provider):
    """A provider that loads model weights and runs inference inside the router."""


class MisconfiguredProvider(Provider):
    """Stands for a provider whose endpoint is not configured; names what to set."""

    def __init__(self, type: str, remedy: str) -> None:
        self.type = type  # type: ignore[misc]
        self.remedy = remedy

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        raise RouterError(500, f"provider '{self.type}' is not configured: {self.remedy}",
                          code="provider_not_configured")


def normalize_base_url(url: str) -> str:
    """Accept a base URL with or without a trailing `/v1` (and slashes)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3].rstrip("/")
    return url


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(normalize_base_url(a)), urlsplit(normalize_base_url(b))
    return (pa.scheme, pa.netloc) == (pb.scheme, pb.netloc)
