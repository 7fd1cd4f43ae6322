"""What failed when a deployment did not answer: one typed hierarchy of upstream failures, and the
classifiers that build them from an HTTP status and body, a transport exception, an error event inside a
200 stream, or a `RouterError` the upstream client already raised.

Every failure *is* a `RouterError` (the existing error path answers it unchanged: status, OpenAI error body,
headers), and its class says what it means for routing:

- `deployment_fault`: it counts against the deployment's health (the circuit breaker's failures);
- `retry_other`: another deployment may be tried;
- `retry_same`: the same deployment may be tried again after a backoff (a group of one);
- `cools`: the deployment is busy rather than broken: it is kept out for `retry_after` seconds (429,
  overloaded) without counting as a health failure;
- `retry_after`: seconds the upstream asked for (`Retry-After` seconds or HTTP date, `retry-after-ms`,
  OpenAI's `x-ratelimit-reset-*`), None when it gave none.

The client's own mistakes (400, 404, 422, context length, content policy) are never the deployment's fault and
never retried on the same group; a context-length failure may go to a group with a larger window and a
content-policy refusal to a group that allows it (`ContextLengthExceeded`, `ContentPolicy`: the dispatcher
decides). Nothing here does I/O; classification runs only on the failure path.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import errno
import math
import re
import socket
import ssl
import time
from collections.abc import Mapping
from typing import ClassVar, TypeVar

import aiohttp
import orjson

from router.errors import RouterError, Scrubber, upstream_error

F = TypeVar("F", bound="UpstreamFailure")

_DEFAULT_SCRUB = Scrubber()
_HTTP_DATE = re.compile(r"[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")
_REQUEST_ID = "x-request-id"
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


class UpstreamFailure(RouterError):
    """An attempt at one deployment failed. Subclasses set what it means for routing (class attributes)."""

    kind: ClassVar[str] = "upstream_error"  # a short, fixed label (metrics, logs)
    deployment_fault: ClassVar[bool] = True
    retry_other: ClassVar[bool] = True
    retry_same: ClassVar[bool] = True
    cools: ClassVar[bool] = False
    #: whether the upstream certainly never processed the request (it may be sent elsewhere at no cost)
    unanswered: ClassVar[bool] = False
    default_status: ClassVar[int] = 502
    default_code: ClassVar[str | None] = "upstream_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None, headers: Mapping[str, str] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status if status is not None else self.default_status, message,
                         code=code if code is not None else self.default_code, param=param, type=type,
                         headers=headers)
        self.retry_after = retry_after

    @property
    def error(self) -> RouterError:
        """The error the client gets: this one (kept so a failure reads like the dispatcher's records)."""
        return self

    def cooldown(self, cap: float) -> float | None:
        """Seconds this failure alone keeps the deployment out (a busy deployment), capped; None: none."""
        return None

    def scrubbed(self: F, scrub: Scrubber) -> F:
        """This failure, its class kept, with every text a client reads scrubbed."""
        plain = RouterError.scrubbed(self, scrub)
        out = copy.copy(self)
        out.message, out.code, out.param, out.type, out.headers = (plain.message, plain.code, plain.param,
                                                                   plain.type, plain.headers)
        out.args = (plain.message,)
        return out

    @classmethod
    def from_error(cls: type[F], err: RouterError, *, status: int | None = None, code: str | None = None,
                   type: str | None = None, retry_after: float | None = None) -> F:
        """`err`'s client-facing fields, its code included (None too), under this class (`status`, `code`,
        `type` replace its own)."""
        out = cls(err.message, status=status if status is not None else err.status, param=err.param,
                  type=type if type is not None else err.type, headers=err.headers, retry_after=retry_after)
        out.code = code if code is not None else err.code
        return out


# -- transport: no HTTP answer ------------------------------------------------------------


class TransportFailure(UpstreamFailure):
    """The exchange failed below HTTP."""

    kind = "transport"


class ConnectionRefused(TransportFailure):
    """Nothing listens there (refused, host or network unreachable): the request never left."""

    kind = "refused"
    unanswered = True
    default_code = "upstream_unreachable"


class ConnectionReset(TransportFailure):
    """The upstream closed or reset the connection under the request (before or while answering)."""

    kind = "reset"
    default_code = "upstream_disconnected"


class DNSFailure(TransportFailure):
    """The upstream's name did not resolve."""

    kind = "dns"
    unanswered = True
    default_code = "upstream_unreachable"


class TLSFailure(TransportFailure):
    """The TLS handshake failed (certificate, protocol): a configuration fault, not worth a second try."""

    kind = "tls"
    retry_same = False
    unanswered = True
    default_code = "upstream_tls_error"


class UpstreamTimeout(TransportFailure):
    """The exchange ran past its total timeout."""

    kind = "timeout"
    default_status = 504
    default_code = "upstream_timeout"


class ConnectTimeout(UpstreamTimeout):
    """No connection within the connect timeout: the request never left."""

    kind = "connect_timeout"
    unanswered = True
    default_code = "upstream_connect_timeout"


class FirstByteTimeout(UpstreamTimeout):
    """Connected, but no answer (head, or a stream's first content) within the time-to-first-byte timeout."""

    kind = "first_byte_timeout"
    default_code = "upstream_first_token_timeout"

    @classmethod
    def after(cls, seconds: float, deployment: str) -> FirstByteTimeout:
        return cls(f"deployment {deployment} sent no first token within {seconds:g} s")


class IdleStreamTimeout(UpstreamTimeout):
    """A stream stayed silent longer than the idle timeout between chunks."""

    kind = "idle_timeout"
    default_code = "upstream_stream_timeout"


# -- HTTP: the upstream answered with an error ----------------------------------------------


class ServerError(UpstreamFailure):
    """A 5xx (or an answer the router could not use): the deployment's fault."""

    kind = "server_error"


class BadResponse(ServerError):
    """A 2xx that is not what was asked for (not JSON, not a completion, no event stream, too large)."""

    kind = "bad_response"
    retry_same = False
    default_code = "upstream_bad_response"


class LoopDetected(UpstreamFailure):
    """508: the request came back to a router it had passed (`router.hops`): trying again would loop again."""

    kind = "loop"
    deployment_fault = False
    retry_other = False
    retry_same = False
    default_status = 508
    default_code = "loop_detected"


class RateLimited(UpstreamFailure):
    """429: the deployment is busy for now. It cools for `retry_after` (or `DEFAULT_COOLDOWN`) seconds and
    is not counted as unhealthy: a rate limit says nothing of whether it works."""

    kind = "rate_limited"
    deployment_fault = False
    cools = True
    default_status = 429
    default_code = "rate_limit_exceeded"
    DEFAULT_COOLDOWN: ClassVar[float] = 1.0

    def cooldown(self, cap: float) -> float | None:
        return min(self.retry_after if self.retry_after is not None else self.DEFAULT_COOLDOWN, cap)


class Overloaded(RateLimited):
    """The upstream is over capacity for everyone (Anthropic's 529 `overloaded_error`): answered as 503."""

    kind = "overloaded"
    default_status = 503
    default_code = "overloaded_error"


class QuotaExhausted(UpstreamFailure):
    """A 429 that waiting will not fix (OpenAI's `insufficient_quota`, Anthropic's spend limit): the
    deployment's account is out of credit. Counted against it; another deployment may answer."""

    kind = "quota"
    retry_same = False
    default_status = 429
    default_code = "insufficient_quota"


class AuthenticationFailed(UpstreamFailure):
    """401/403 from the upstream: the deployment's own key is wrong or not allowed. It counts against the
    deployment (it fails every client), but it is not retried (as the issue asks of 401/403)."""

    kind = "authentication"
    retry_other = False
    retry_same = False
    default_status = 401
    default_code: ClassVar[str | None] = None


class BadRequest(UpstreamFailure):
    """400/404/413/422: the request itself was refused; the same request would fail anywhere."""

    kind = "bad_request"
    deployment_fault = False
    retry_other = False
    retry_same = False
    default_status = 400
    default_code: ClassVar[str | None] = None


class ContextLengthExceeded(BadRequest):
    """The prompt plus output does not fit the deployment's context window. Answered as OpenAI's 400
    `context_length_exceeded`; only a group with a larger window may take it."""

    kind = "context_length"
    default_code = "context_length_exceeded"


class ContentPolicy(BadRequest):
    """The provider's safety system refused the request (or blocked the prompt)."""

    kind = "content_policy"
    default_code = "content_policy_violation"


# -- classifiers -------------------------------------------------------------------------------

_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})
_CONTEXT_TEXT = re.compile(
    r"maximum context length|context length|context window|exceeds? the (?:available )?context|context size"
    r"|too many tokens|prompt is too long|input token count .*exceeds|exceeds the maximum number of tokens"
    r"|input is too long|tokens \+ `?max_new_tokens`? must be", re.IGNORECASE)
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "content_policy", "safety", "moderation",
                           "prohibited_content", "responsibleaipolicyviolation"})
_POLICY_TEXT = re.compile(
    r"content (?:management |filtering )?polic|safety system|content filter|"
    r"blocked (?:due to|by) (?:safety|content)|violat\w* (?:our|the) (?:usage|content) polic", re.IGNORECASE)
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "enforced_spend_limit_reached",
                          "billing_error"})
#: Gemini's `promptFeedback.blockReason` / a candidate's finish that means the safety system refused
_BLOCKED = re.compile(rb'"blockReason"\s*:\s*"([A-Z_]+)"')


def from_status(status: int, body: bytes, headers: Mapping[str, str] | None, provider_type: str,
                scrub: Scrubber | None = None, *, now: float | None = None) -> UpstreamFailure:
    """An upstream's non-2xx answer as a failure. The client reads the upstream's own message, code, type and
    param (scrubbed of keys), normalised where a client library looks: context length and content policy take
    OpenAI's codes, Anthropic's 529 becomes 503, Gemini's `status` becomes the code. Only `Retry-After` (as
    the upstream sent it, else as computed) and a well-formed `x-request-id` are passed on as headers."""
    low = _lower(headers)
    retry_after = retry_after_seconds(low, now)
    out: dict[str, str] = {}
    value = low.get("retry-after", "").strip()
    if value.isdigit() or _HTTP_DATE.fullmatch(value):
        out["retry-after"] = value
    elif retry_after is not None:
        out["retry-after"] = str(math.ceil(retry_after))
    rid = low.get(_REQUEST_ID)
    if rid is not None and len(rid) <= 200 and rid.isascii() and rid.isprintable():
        out[_REQUEST_ID] = rid
    err = upstream_error(status, body, scrub or _DEFAULT_SCRUB, provider_type, out)
    google_status = _google_status(body) if provider_type == "google" else None
    if google_status is not None:
        err.code = google_status
        err.type = _GOOGLE_TYPES.get(google_status, err.type)
    return _by_status(err, status, _body_detail(body), retry_after)


def _by_status(err: RouterError, status: int, detail: str, retry_after: float | None) -> UpstreamFailure:
    """The failure `err` (an upstream's answer of `status`) stands for; `detail`: more of its text to read."""
    code = (err.code or "").lower()
    etype = (err.type or "").lower()
    text = f"{err.message} {detail}"
    if (code in _CONTEXT_CODES or etype in _CONTEXT_CODES or _CONTEXT_TEXT.search(text)) and (
            status in (400, 413, 422) or status >= 500):  # llama.cpp has said it with a 500
        return ContextLengthExceeded.from_error(err, status=400, code="context_length_exceeded",
                                                type="invalid_request_error")
    if status in (400, 403, 422) and (code in _POLICY_CODES or etype in _POLICY_CODES or _POLICY_TEXT.search(text)):
        return ContentPolicy.from_error(err, status=400, code=err.code if code in _POLICY_CODES
                                        else ContentPolicy.default_code,
                                        type="invalid_request_error")
    if status == 529 or etype == "overloaded_error" or code == "overloaded_error":
        return Overloaded.from_error(err, status=503, code=err.code or "overloaded_error", type="server_error",
                                     retry_after=retry_after)
    if status == 429 or status == 402:
        if code in _QUOTA_CODES or etype in _QUOTA_CODES or "spend limit" in text.lower() or status == 402:
            return QuotaExhausted.from_error(err, code=err.code or QuotaExhausted.default_code)
        return RateLimited.from_error(err, retry_after=retry_after)
    if status in (401, 403, 407):
        return AuthenticationFailed.from_error(err)
    if status == 508:
        return LoopDetected.from_error(err)
    if status == 408:
        return UpstreamTimeout.from_error(err, retry_after=retry_after)
    if status >= 500:
        return ServerError.from_error(err, retry_after=retry_after)
    return BadRequest.from_error(err)


def from_exception(exc: BaseException, provider: str = "upstream", host: str = "", *,
                   during_stream: bool = False) -> UpstreamFailure | None:
    """A transport exception (aiohttp, asyncio, ssl, socket) as a failure; None for anything else
    (cancellation, programming errors), which must propagate. `during_stream`: it happened while reading a
    stream's body, after its head (a read timeout there is the idle timeout)."""
    where = f"upstream {provider}" + (f" at {host}" if host else "")
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(exc, socket.gaierror) or (
            isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, socket.gaierror)):
        return DNSFailure(f"could not resolve {where}")
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return TLSFailure(f"TLS with {where} failed: {exc.__class__.__name__}")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(f"could not connect to {where} in time")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        if during_stream:
            return IdleStreamTimeout(f"{where} stopped sending its stream")
        return FirstByteTimeout(f"{where} sent no answer in time")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamTimeout(f"{where} timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror if exc.os_error is not None and exc.os_error.strerror else "refused"
        return ConnectionRefused(f"could not connect to {where}: {reason}")
    if isinstance(exc, (ConnectionRefusedError,)) or (
            isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError)
            and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)):
        return ConnectionRefused(f"could not connect to {where}: {exc.strerror or 'refused'}")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError, aiohttp.ClientPayloadError,
                        ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or (
            isinstance(exc, aiohttp.ClientOSError) and exc.errno in _RESET_ERRNOS):
        return ConnectionReset(f"{where} closed the connection before the answer was complete")
    if isinstance(exc, aiohttp.ClientError):
        return TransportFailure(f"{where} failed: {exc.__class__.__name__}")
    return None


#: the codes `router.upstream` gives the RouterErrors it raises today, and the failure each stands for
_UPSTREAM_CODES: dict[str, type[UpstreamFailure]] = {
    "upstream_unreachable": ConnectionRefused, "upstream_disconnected": ConnectionReset,
    "upstream_timeout": UpstreamTimeout, "upstream_first_token_timeout": FirstByteTimeout,
    "upstream_connect_timeout": ConnectTimeout, "upstream_stream_timeout": IdleStreamTimeout,
    "upstream_tls_error": TLSFailure, "upstream_error": TransportFailure,
    "upstream_bad_response": BadResponse, "upstream_response_too_large": BadResponse,
    "upstream_stream_truncated": ConnectionReset, "loop_detected": LoopDetected,
}


def lift(exc: BaseException) -> UpstreamFailure | None:
    """Whatever an attempt raised, as a failure: a failure as it is; a RouterError that the upstream client
    or a provider raised (by its code, else its status and text); a transport exception (`from_exception`).
    None: not an upstream failure (cancellation, a bug), to propagate as it is."""
    if isinstance(exc, RouterError):
        return classify(exc)
    return from_exception(exc)


def classify(err: RouterError) -> UpstreamFailure:
    """A RouterError an attempt raised, as a failure: itself if it is one; else by the code the upstream
    client gives it (`upstream_unreachable`, ...), else by its status and text, as `from_status` would."""
    if isinstance(err, UpstreamFailure):
        return err
    cls = _UPSTREAM_CODES.get(err.code or "")
    if cls is not None:
        return cls.from_error(err)
    return _by_status(err, err.status, "", retry_after_seconds(_lower(err.headers)))


def from_stream_event(chunk: bytes) -> UpstreamFailure | None:
    """The failure an upstream reported inside a 200 stream, if `chunk` (one or more whole SSE lines) holds
    one: OpenAI-compatible `data: {"error": {...}}` (vLLM's `{"object": "error", ...}` too), Anthropic's
    `event: error` / `{"type": "error", "error": {...}}`, Gemini's `{"error": {"code", "status"}}` and a
    prompt blocked by its safety system (`promptFeedback.blockReason`). None for ordinary chunks: a bytes
    search decides that, nothing is parsed."""
    if b'"error"' not in chunk and b"blockReason" not in chunk:
        return None
    for line in chunk.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if b'"error"' in data:
            failure = _event_failure(data)
            if failure is not None:
                return failure
        elif b"blockReason" in data and (match := _BLOCKED.search(data)) is not None:
            reason = match.group(1).decode()
            return ContentPolicy(f"the upstream's safety system blocked the prompt ({reason})", code="content_filter")
    return None


def _event_failure(data: bytes) -> UpstreamFailure | None:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    error = event.get("error")
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        if event.get("object") != "error":
            return None
        error = event  # vLLM's older form: the error object is the event
    message = error.get("message")
    message = _DEFAULT_SCRUB(message) if isinstance(message, str) and message else "the upstream reported an error"
    etype = error.get("type") if isinstance(error.get("type"), str) else None
    raw_code = error.get("code")
    status_name = error.get("status") if isinstance(error.get("status"), str) else None  # Gemini's
    status = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
    if status is None:
        status = _ANTHROPIC_STATUS.get(etype or "", 0) or _GOOGLE_STATUS.get(status_name or "", 0) or 502
    if not 400 <= status <= 599:
        status = 502
    code = status_name or (str(raw_code) if isinstance(raw_code, str) else None) or etype
    err = RouterError(status, message, code=code, type=etype,
                      param=error.get("param") if isinstance(error.get("param"), str) else None)
    return _by_status(err, status, "", None)


#: Anthropic's error `type`s and the HTTP status each stands for (its stream has no status of its own)
_ANTHROPIC_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "overloaded_error": 529, "billing_error": 402, "timeout_error": 504,
}
#: google.rpc status names: the HTTP status and OpenAI's error type for each
_GOOGLE_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_GOOGLE_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error", "FAILED_PRECONDITION": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error", "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "invalid_request_error", "RESOURCE_EXHAUSTED": "rate_limit_error",
}


def _google_status(body: bytes) -> str | None:
    try:
        value = orjson.loads(body)["error"]["status"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _body_detail(body: bytes) -> str:
    """Error fields beyond the message that say what failed (llama.cpp's `type`, Anthropic's `details`)."""
    if len(body) > 65536:
        return ""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return ""
    parts = [str(err.get(k)) for k in ("type", "code", "reason") if err.get(k) is not None]
    details = err.get("details")
    if isinstance(details, dict):
        parts += [str(v) for v in details.values() if isinstance(v, str)]
    elif isinstance(details, list):
        parts += [str(d.get("reason")) for d in details if isinstance(d, dict) and d.get("reason")]
    return " ".join(parts)


def _lower(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers else {}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float | None:
    """OpenAI's `x-ratelimit-reset-*` form ("1s", "6m0s", "20ms", "1h2m3.5s") in seconds; None if not one."""
    value = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(value) and pos else None


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds an upstream asks to wait, from lower-cased `headers`: `retry-after-ms`, `Retry-After` (seconds
    or an HTTP date, against `now`, wall-clock seconds), else OpenAI's `x-ratelimit-reset-requests`/`-tokens`
    (the one whose remaining count is 0; both unknown: the longer). None when none says."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
            if math.isfinite(value) and value >= 0:
                return value / 1000
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is not None:
        raw = raw.strip()
        try:
            value = float(raw)
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            when = _http_date(raw)
            if when is not None:
                return max(0.0, when - (time.time() if now is None else now))
    resets = []
    for kind in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_duration(reset) if reset is not None else None
        if seconds is not None:
            resets.append((headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0", seconds))
    exhausted = [s for spent, s in resets if spent]
    if exhausted:
        return max(exhausted)
    return max((s for _, s in resets), default=None)


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
