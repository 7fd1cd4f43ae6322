"""The failure hierarchy and its classifiers, on the error bodies providers really send (samples from their
documentation and from public issue reports, quoted below), transport exceptions raised by real sockets,
and error events inside 200 streams."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl

import aiohttp
import orjson
import pytest

from router.errors import RouterError, Scrubber
from router.routing import failures as f
from tests.support.processes import free_port

J = orjson.dumps

# OpenAI (platform docs, error codes; bodies as the API returns them)
OPENAI_CONTEXT = J({"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 8227 "
               "tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
OPENAI_RATE = J({"error": {
    "message": "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
               "Used 29000, Requested 1500. Please try again in 1.5s.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}})
OPENAI_QUOTA = J({"error": {"message": "You exceeded your current quota, please check your plan and billing "
                                       "details.", "type": "insufficient_quota", "param": None,
                            "code": "insufficient_quota"}})
OPENAI_KEY = J({"error": {"message": "Incorrect API key provided: sk-proj-abcdefghijklmnop1234. You can find "
                                     "your API key at https://platform.openai.com/account/api-keys.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
OPENAI_POLICY = J({"error": {"code": "content_policy_violation", "message": "Your request was rejected as a result "
                             "of our safety system.", "param": None, "type": "invalid_request_error"}})
AZURE_FILTER = J({"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                            "content management policy.", "type": None, "param": "prompt", "code": "content_filter",
                            "status": 400}})
OPENAI_500 = J({"error": {"message": "The server had an error while processing your request. Sorry about that!",
                          "type": "server_error", "param": None, "code": None}})
# vLLM's OpenAI server (serving_chat.py ValueError, answered as 400)
VLLM_CONTEXT = J({"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you "
                  "requested 8203 tokens (7691 in the messages, 512 in the completion). Please reduce the length "
                  "of the messages or completion.", "type": "BadRequestError", "param": None, "code": 400})
# llama.cpp server (ggml-org/llama.cpp#15780): first as a 500, later as a 400
LLAMACPP_CONTEXT = J({"error": {"code": 500, "message": "the request exceeds the available context size. try "
                                "increasing the context size or enable context shift",
                                "type": "exceed_context_size_error", "n_prompt_tokens": 1407, "n_ctx": 256}})
# Hugging Face TGI (422)
TGI_CONTEXT = J({"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 "
                 "`inputs` tokens and 200 `max_new_tokens`", "error_type": "validation"})
# Anthropic (docs: errors; the body shape every error has)
ANTHROPIC_OVERLOADED = J({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
                          "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
ANTHROPIC_TOO_LONG = J({"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "prompt is too long: 208656 tokens > 200000 maximum"},
                        "request_id": "req_011CWdepJvA2D819tdYYq4h7"})
ANTHROPIC_RATE = J({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has "
                                               "exceeded your per-minute rate limit"}})
ANTHROPIC_SPEND = J({"type": "error", "error": {"type": "rate_limit_error", "message": "You have reached your "
                                                "specified workspace spend limit.",
                                                "details": {"error_code": "enforced_spend_limit_reached"}}})
ANTHROPIC_AUTH = J({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
ANTHROPIC_POLICY = J({"type": "error", "error": {"type": "invalid_request_error",
                                                 "message": "Output blocked by content filtering policy"}})
# Gemini (google.rpc error bodies)
GEMINI_CONTEXT = J({"error": {"code": 400, "message": "The input token count (1200293) exceeds the maximum number of "
                              "tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}})
GEMINI_EXHAUSTED = J({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                                "status": "RESOURCE_EXHAUSTED"}})
GEMINI_UNAVAILABLE = J({"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                                  "status": "UNAVAILABLE"}})


@pytest.mark.parametrize("status, body, provider, cls, client_status, code", [
    (400, OPENAI_CONTEXT, "openai", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (400, VLLM_CONTEXT, "local", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (500, LLAMACPP_CONTEXT, "local", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (422, TGI_CONTEXT, "huggingface", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (400, ANTHROPIC_TOO_LONG, "anthropic", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (400, GEMINI_CONTEXT, "google", f.ContextLengthExceeded, 400, "context_length_exceeded"),
    (400, OPENAI_POLICY, "openai", f.ContentPolicy, 400, "content_policy_violation"),
    (400, AZURE_FILTER, "openai", f.ContentPolicy, 400, "content_filter"),
    (400, ANTHROPIC_POLICY, "anthropic", f.ContentPolicy, 400, "content_policy_violation"),
    (429, OPENAI_RATE, "openai", f.RateLimited, 429, "rate_limit_exceeded"),
    (429, ANTHROPIC_RATE, "anthropic", f.RateLimited, 429, None),  # the upstream's own code (none) is kept
    (429, GEMINI_EXHAUSTED, "google", f.RateLimited, 429, "RESOURCE_EXHAUSTED"),
    (429, OPENAI_QUOTA, "openai", f.QuotaExhausted, 429, "insufficient_quota"),
    (429, ANTHROPIC_SPEND, "anthropic", f.QuotaExhausted, 429, "insufficient_quota"),
    (529, ANTHROPIC_OVERLOADED, "anthropic", f.Overloaded, 503, "overloaded_error"),
    (401, OPENAI_KEY, "openai", f.AuthenticationFailed, 401, "invalid_api_key"),
    (401, ANTHROPIC_AUTH, "anthropic", f.AuthenticationFailed, 401, None),
    (403, J({"error": {"message": "denied"}}), "openai", f.AuthenticationFailed, 403, None),
    (500, OPENAI_500, "openai", f.ServerError, 500, None),
    (503, GEMINI_UNAVAILABLE, "google", f.ServerError, 503, "UNAVAILABLE"),
    (502, b"<html>Bad Gateway</html>", "openai", f.ServerError, 502, None),
    (404, J({"error": {"message": "The model `gpt-5x` does not exist", "code": "model_not_found"}}), "openai",
     f.BadRequest, 404, "model_not_found"),
    (422, J({"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}), "local", f.BadRequest, 422, None),
])
def test_from_status_classifies_real_bodies(status: int, body: bytes, provider: str, cls: type[f.UpstreamFailure],
                                           client_status: int, code: str | None) -> None:
    failure = f.from_status(status, body, {}, provider)
    assert type(failure) is cls
    assert isinstance(failure, RouterError)  # the error path answers it as it is
    assert (failure.status, failure.code) == (client_status, code)
    assert orjson.loads(failure.body())["error"]["message"]  # the upstream's own words reach the client


def test_what_each_class_means_for_routing() -> None:
    cls: type[f.UpstreamFailure]
    table = {cls: (cls.deployment_fault, cls.retry_other, cls.retry_same) for cls in (
        f.ConnectionRefused, f.ConnectionReset, f.DNSFailure, f.TLSFailure, f.ConnectTimeout, f.FirstByteTimeout,
        f.IdleStreamTimeout, f.ServerError, f.RateLimited, f.Overloaded, f.QuotaExhausted, f.AuthenticationFailed,
        f.BadRequest, f.ContextLengthExceeded, f.ContentPolicy)}
    for cls in (f.ConnectionRefused, f.ConnectionReset, f.DNSFailure, f.ConnectTimeout, f.FirstByteTimeout,
                f.IdleStreamTimeout, f.ServerError):
        assert table[cls] == (True, True, True), cls
    assert table[f.TLSFailure] == (True, True, False)  # a certificate does not fix itself in a second
    assert table[f.QuotaExhausted] == (True, True, False)
    for cls in (f.RateLimited, f.Overloaded):  # busy, not broken: cooled, never counted as unhealthy
        assert table[cls] == (False, True, True) and cls.cools
    assert table[f.AuthenticationFailed] == (True, False, False)  # the deployment's key, never retried
    for cls in (f.BadRequest, f.ContextLengthExceeded, f.ContentPolicy):  # the client's: never retried
        assert table[cls] == (False, False, False)
    assert f.ConnectionRefused.unanswered and f.ConnectTimeout.unanswered and not f.ConnectionReset.unanswered


def test_keys_echoed_by_an_upstream_are_scrubbed_and_the_class_survives_scrubbing() -> None:
    secret = "my-deployment-secret-123"
    body = J({"error": {"message": f"Incorrect API key provided: {secret} and sk-proj-abcdefghijklmnop",
                        "type": "invalid_request_error", "code": "invalid_api_key"}})
    failure = f.from_status(401, body, {"x-request-id": f"req_{secret}"}, "openai", Scrubber([secret]))
    assert secret not in failure.body().decode() and "sk-proj-abcdefghijklmnop" not in failure.body().decode()
    assert secret not in str(failure.headers)
    again = f.RateLimited("key sk-live-abcdefghijkl leaked", retry_after=3.0).scrubbed(Scrubber())
    assert type(again) is f.RateLimited and again.retry_after == 3.0 and "abcdefghijkl" not in again.message


def test_only_retry_after_and_a_request_id_are_passed_on() -> None:
    failure = f.from_status(429, OPENAI_RATE, {"Retry-After": "7", "X-Request-Id": "req_1", "Set-Cookie": "a=b",
                                               "x-ratelimit-remaining-requests": "0"}, "openai")
    assert failure.headers == {"retry-after": "7", "x-request-id": "req_1"}
    assert failure.retry_after == 7.0


@pytest.mark.parametrize("headers, seconds", [
    ({"retry-after": "11"}, 11.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
    ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "20ms", "x-ratelimit-remaining-tokens": "100"}, 360.0),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "1m2.5s"}, 62.5),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "-3"}, None),
    ({}, None),
])
def test_retry_after_forms(headers: dict[str, str], seconds: float | None) -> None:
    assert f.retry_after_seconds(headers) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert f.retry_after_seconds({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now) == 30.0
    assert f.retry_after_seconds({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now) == 0.0
    failure = f.from_status(429, OPENAI_RATE, {"retry-after": email.utils.formatdate(now + 9, usegmt=True)},
                            "openai", now=now)
    assert failure.retry_after == 9.0 and failure.headers is not None and "GMT" in failure.headers["retry-after"]


def test_computed_retry_after_is_told_to_the_client_in_whole_seconds() -> None:
    failure = f.from_status(429, OPENAI_RATE, {"x-ratelimit-reset-tokens": "1.2s",
                                               "x-ratelimit-remaining-tokens": "0"}, "openai")
    assert failure.retry_after == pytest.approx(1.2) and failure.headers == {"retry-after": "2"}


def test_cooldowns_are_capped_and_a_429_without_one_still_cools_briefly() -> None:
    assert f.RateLimited("x", retry_after=500).cooldown(cap=30) == 30
    assert f.RateLimited("x").cooldown(cap=30) == f.RateLimited.DEFAULT_COOLDOWN
    assert f.Overloaded("x", retry_after=2).cooldown(cap=30) == 2
    assert f.ServerError("x").cooldown(cap=30) is None


@pytest.mark.parametrize("duration, seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5),
                                               ("", None), ("5", None), ("1x", None), ("s1", None)])
def test_parse_duration(duration: str, seconds: float | None) -> None:
    assert f.parse_duration(duration) == seconds


# -- transport exceptions, raised by real sockets -------------------------------------------------


def _post(url: str, timeout: aiohttp.ClientTimeout) -> BaseException:
    async def go() -> BaseException:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with session.post(url, data=b"{}") as resp:
                    await resp.read()
            except BaseException as exc:  # noqa: BLE001 - the exception is the result
                return exc
        raise AssertionError("no exception")

    return asyncio.run(go())


def test_a_closed_port_is_refused() -> None:
    exc = _post(f"http://127.0.0.1:{free_port()}/", aiohttp.ClientTimeout(total=5))
    failure = f.from_exception(exc, "openai", "127.0.0.1")
    assert type(failure) is f.ConnectionRefused and failure.code == "upstream_unreachable"
    assert failure.status == 502 and "openai" in failure.message


def test_an_unresolvable_name_is_a_dns_failure() -> None:
    exc = _post("http://no-such-host.invalid/", aiohttp.ClientTimeout(total=10))
    assert type(f.from_exception(exc)) is f.DNSFailure


def test_timeouts_by_phase() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        read = _post(url, aiohttp.ClientTimeout(total=5, sock_read=0.2))
        assert type(f.from_exception(read)) is f.FirstByteTimeout
        assert type(f.from_exception(read, during_stream=True)) is f.IdleStreamTimeout
        total = _post(url, aiohttp.ClientTimeout(total=0.2))
        assert type(f.from_exception(total)) is f.UpstreamTimeout
    assert type(f.from_exception(aiohttp.ConnectionTimeoutError())) is f.ConnectTimeout


def test_resets_tls_and_what_is_not_a_failure() -> None:
    assert type(f.from_exception(aiohttp.ServerDisconnectedError())) is f.ConnectionReset
    assert type(f.from_exception(ConnectionResetError(104, "reset"))) is f.ConnectionReset
    assert type(f.from_exception(ssl.SSLCertVerificationError("bad cert"))) is f.TLSFailure
    assert f.from_exception(asyncio.CancelledError()) is None
    assert f.from_exception(KeyError("bug")) is None


def test_lift_reads_what_the_upstream_client_raises_today() -> None:
    assert type(f.lift(RouterError(502, "x", code="upstream_unreachable"))) is f.ConnectionRefused
    assert type(f.lift(RouterError(502, "x", code="upstream_disconnected"))) is f.ConnectionReset
    assert type(f.lift(RouterError(504, "x", code="upstream_timeout"))) is f.UpstreamTimeout
    assert type(f.lift(RouterError(502, "x", code="upstream_bad_response"))) is f.BadResponse
    limited = f.lift(RouterError(429, "slow down", headers={"Retry-After": "4"}))
    assert type(limited) is f.RateLimited and limited.retry_after == 4.0
    overloaded = f.lift(RouterError(503, "Overloaded", type="overloaded_error"))
    assert type(overloaded) is f.Overloaded
    assert type(f.lift(RouterError(400, "prompt is too long: 5 tokens > 4 maximum"))) is f.ContextLengthExceeded
    assert type(f.lift(RouterError(400, "'n' must be 1", param="n"))) is f.BadRequest
    assert type(f.lift(RouterError(500, "boom"))) is f.ServerError
    loop = f.classify(RouterError(508, "a route loops back", code="loop_detected"))
    assert type(loop) is f.LoopDetected and not (loop.retry_other or loop.deployment_fault)
    same = f.ServerError("x")
    assert f.lift(same) is same
    assert f.lift(asyncio.CancelledError()) is None


# -- errors inside 200 streams ---------------------------------------------------------------------


def test_ordinary_chunks_are_not_failures() -> None:
    chunk = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
             b'{"content":"the error was mine"},"finish_reason":null}]}\n\n')
    assert f.from_stream_event(chunk) is None
    assert f.from_stream_event(b"data: [DONE]\n\n") is None
    assert f.from_stream_event(b'data: {"content": "an \\"error\\" quoted"}\n\n') is None


@pytest.mark.parametrize("chunk, cls, code", [
    (b'data: {"error": {"message": "This model\'s maximum context length is 4096 tokens.", '
     b'"type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}\n\n',
     f.ContextLengthExceeded, "context_length_exceeded"),
    (b'data: {"error": {"object": "error", "message": "This model\'s maximum context length is 2048 tokens. '
     b'However, you requested 2100 tokens.", "type": "BadRequestError", "param": null, "code": 400}}\n\n',
     f.ContextLengthExceeded, "context_length_exceeded"),
    (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n',
     f.Overloaded, "overloaded_error"),
    (b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}\n\n',
     f.ServerError, "api_error"),
    (b'data: {"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}\n\n',
     f.RateLimited, "RESOURCE_EXHAUSTED"),
    (b'data: {"error": {"message": "upstream connect error", "type": "server_error"}}\n\n', f.ServerError,
     "server_error"),
    (b'data: {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}, "usageMetadata": {}}\r\n\r\n',
     f.ContentPolicy, "content_filter"),
])
def test_errors_inside_a_200_stream(chunk: bytes, cls: type[f.UpstreamFailure], code: str) -> None:
    failure = f.from_stream_event(chunk)
    assert type(failure) is cls and failure.code == code


def test_a_stream_error_after_content_is_found_in_a_chunk_of_several_lines() -> None:
    chunk = (b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
             b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n')
    failure = f.from_stream_event(chunk)
    assert isinstance(failure, f.ServerError) and failure.message == "boom"
