"""The dispatcher's retries, fallbacks and stream failover, with scripted fake providers, a fake sleep and a
seeded random generator (no real waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from starlette.responses import Response

from router.auth import Client
from router.config import Settings
from router.errors import RouterError
from router.providers.base import ChatCall, Provider
from router.registry import ClientKey
from router.routing.deployment import Deployment, ModelGroup
from router.routing.dispatch import Dispatcher
from router.routing.failures import classify
from router.routing.stats import DeploymentStats
from router.routing.strategies import build_strategy
from router.upstream import SSEResponse

SETTINGS = Settings(router_cost_threshold=0, router_num_retries=2, router_retry_after_cap=5.0)
CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def error_event(message: str, code: str = "server_error") -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "code": code}}) + b"\n\n"


class Scripted(Provider):
    """Plays one step per call (the last one repeats): "ok", an HTTP status as int, "unreachable",
    "context", "policy", "stream-error-first" (an error event before any content), "stream-error-after"
    (content, then an error event), "slow" (no first token for a long time)."""

    type = "openai"

    def __init__(self, *steps: object, retry_after: str | None = None) -> None:
        self.steps = list(steps) or ["ok"]
        self.retry_after = retry_after
        self.calls: list[ChatCall] = []

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        step = self.steps[min(len(self.calls), len(self.steps) - 1)]
        self.calls.append(call)
        if step == "unreachable":
            raise RouterError(502, "could not connect", code="upstream_unreachable")
        if step == "context":
            raise RouterError(400, "This model's maximum context length is 8192 tokens", code="context_length_exceeded")
        if step == "policy":
            raise RouterError(400, "Your request was rejected by the content policy", code="content_policy_violation")
        if isinstance(step, int):
            headers = {"retry-after": self.retry_after} if self.retry_after is not None else None
            raise RouterError(step, f"upstream said {step}", code=f"e{step}", headers=headers)
        if call.stream:
            return SSEResponse(self._stream(str(step), call.model))
        return Response(orjson.dumps({"model": call.model, "choices": [{"index": 0}]}), media_type="application/json")

    async def _stream(self, step: str, model: str) -> AsyncIterator[bytes]:
        yield ROLE
        if step == "slow":
            await asyncio.sleep(30)
        if step == "stream-error-first":
            yield error_event("overloaded, try later")
            return
        yield CONTENT.replace(b'"choices"', b'"model":"' + model.encode() + b'","choices"')
        if step == "stream-error-after":
            yield error_event("broke midway")
            return
        yield DONE


def deployment(id_: str, provider: Provider, group: str = "g", **fields: object) -> Deployment:
    return Deployment(id=id_, group=group, type="openai", provider=provider, upstream_model=group, rename=None,
                      stats=DeploymentStats(), **fields)  # type: ignore[arg-type]


def group(*deployments: Deployment, name: str = "g", fallbacks: tuple[str, ...] = (),
          policy: bool = False) -> ModelGroup:
    return ModelGroup(name, list(deployments), build_strategy("round-robin", SETTINGS), fallbacks=fallbacks,
                      content_policy_fallbacks=policy)


def call(stream: bool = False, model: str = "g", **extra: object) -> ChatCall:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    return ChatCall(model, payload, orjson.dumps(payload), stream, False)


class Harness:
    """A dispatcher whose sleeps are recorded, not slept, and whose fallbacks resolve from `groups`."""

    def __init__(self, *groups: ModelGroup, settings: Settings = SETTINGS) -> None:
        self.groups = {g.name: g for g in groups}
        self.sleeps: list[float] = []
        self.dispatcher = Dispatcher(settings, resolve=self.resolve, sleep=self.sleep)

    def resolve(self, name: str) -> ModelGroup:
        if name not in self.groups:
            raise RouterError(404, f"no model {name}", code="model_not_found")
        return self.groups[name]

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def send(self, g: ModelGroup, c: ChatCall, client: Client | None = None,
             then: tuple[ModelGroup, ...] = ()) -> Response | SSEResponse:
        return asyncio.run(self.dispatcher.send(g, c, client, then))


def headers(response: Response | SSEResponse) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in response.raw_headers}


async def body(response: SSEResponse) -> bytes:
    sent: list[bytes] = []

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send_(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))  # type: ignore[arg-type]

    await response({"type": "http"}, receive, send_)  # type: ignore[arg-type]
    return b"".join(sent)


# -- classification --------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, kind, retry", [
    (RouterError(502, "x", code="upstream_unreachable"), "refused", True),
    (RouterError(504, "x", code="upstream_timeout"), "timeout", True),
    (RouterError(500, "x"), "server_error", True),
    (RouterError(429, "x", headers={"retry-after": "7"}), "rate_limited", True),
    (RouterError(529, "x", code="overloaded_error"), "overloaded", True),
    (RouterError(502, "x", code="upstream_bad_response"), "bad_response", True),
    (RouterError(400, "prompt is too long: 300000 tokens > 200000 maximum"), "context_length", False),
    (RouterError(400, "x", code="content_policy_violation"), "content_policy", False),
    (RouterError(400, "x"), "bad_request", False),
    (RouterError(401, "x"), "authentication", False),
    (RouterError(403, "x"), "authentication", False),
    (RouterError(404, "x"), "bad_request", False),
    (RouterError(422, "x"), "bad_request", False),
    (RouterError(508, "x", code="loop_detected"), "loop", False),
])
def test_each_failure_is_classified(error: RouterError, kind: str, retry: bool) -> None:
    """What the dispatcher decides on (`failures.classify`): whether another deployment may be tried (a
    context-length failure goes on only to larger windows, by the dispatcher's own rule)."""
    failure = classify(error)
    assert (failure.kind, failure.retry_other) == (kind, retry)
    if kind == "rate_limited":
        assert failure.retry_after == 7.0


# -- retries across deployments ---------------------------------------------------------------------------

def test_a_deployment_fault_moves_to_the_next_deployment() -> None:
    bad, good = Scripted(500), Scripted("ok")
    a, b = deployment("a", bad), deployment("b", good)
    h = Harness(group(a, b))
    response = h.send(h.groups["g"], call())
    assert headers(response)["x-router-deployment"] == "b" and headers(response)["x-router-attempts"] == "2"
    assert len(bad.calls) == 1 and len(good.calls) == 1 and h.sleeps == []  # another deployment: no backoff
    for d in (a, b):
        assert d.stats.in_flight == 0


def test_the_attempt_budget_is_one_plus_num_retries_and_the_error_names_each_attempt() -> None:
    providers = [Scripted(503) for _ in range(5)]
    h = Harness(group(*(deployment(f"d{i}", p) for i, p in enumerate(providers))))
    with pytest.raises(RouterError) as info:
        h.send(h.groups["g"], call())
    assert sum(len(p.calls) for p in providers) == 3  # 1 + ROUTER_NUM_RETRIES, never more
    assert info.value.status == 503 and info.value.headers and info.value.headers["x-router-attempts"] == "3"
    assert info.value.message.startswith("3 attempts failed") and info.value.message.count("upstream said 503") == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_the_clients_own_mistakes_are_never_retried(status: int) -> None:
    first, second = Scripted(status), Scripted("ok")
    h = Harness(group(deployment("a", first), deployment("b", second)))
    with pytest.raises(RouterError) as info:
        h.send(h.groups["g"], call())
    assert info.value.status == status and len(first.calls) == 1 and second.calls == []
    assert info.value.headers and info.value.headers["x-router-attempts"] == "1"


def test_a_group_of_one_is_tried_again_after_a_backoff_with_jitter() -> None:
    flaky = Scripted(502, 502, "ok")
    h = Harness(group(deployment("only", flaky)))
    response = h.send(h.groups["g"], call())
    assert headers(response)["x-router-attempts"] == "3" and len(flaky.calls) == 3
    assert len(h.sleeps) == 2 and 0 <= h.sleeps[0] <= 0.25 and 0 <= h.sleeps[1] <= 0.5


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    for given, slept in (("2", 2.0), ("3600", 5.0)):  # ROUTER_RETRY_AFTER_CAP is 5 here
        h = Harness(group(deployment("only", Scripted(429, "ok", retry_after=given))))
        h.send(h.groups["g"], call())
        assert h.sleeps == [slept]


def test_no_retries_when_num_retries_is_zero() -> None:
    bad, good = Scripted(500), Scripted("ok")
    h = Harness(group(deployment("a", bad), deployment("b", good)),
                settings=Settings(router_cost_threshold=0, router_num_retries=0))
    with pytest.raises(RouterError):
        h.send(h.groups["g"], call())
    assert len(bad.calls) == 1 and good.calls == []


# -- fallbacks -----------------------------------------------------------------------------------------------

def test_fallback_groups_are_tried_in_order_once_the_group_is_exhausted_and_the_body_names_them() -> None:
    main = group(deployment("m", Scripted(500)), name="big", fallbacks=("gone", "mid", "small"))
    mid_provider, small_provider = Scripted("ok"), Scripted("ok")
    mid = group(deployment("x", mid_provider, group="mid"), name="mid")
    small = group(deployment("y", small_provider, group="small"), name="small")
    h = Harness(main, mid, small)  # "gone" no longer exists: passed over
    response = h.send(main, call(model="big"))
    assert headers(response)["x-router-deployment"] == "x" and small_provider.calls == []
    sent = mid_provider.calls[0]
    assert sent.model == "mid" and orjson.loads(sent.body)["model"] == "mid"
    assert orjson.loads(bytes(response.body))["model"] == "mid"  # type: ignore[union-attr]


def test_a_fallback_the_key_may_not_use_is_passed_over() -> None:
    main = group(deployment("m", Scripted(500)), name="big", fallbacks=("secret", "open"))
    secret_provider, open_provider = Scripted("ok"), Scripted("ok")
    h = Harness(main, group(deployment("s", secret_provider, group="secret"), name="secret"),
                group(deployment("o", open_provider, group="open"), name="open"))
    key = ClientKey("team", "h", "p", None, None, frozenset({"big", "open"}), None, 0.0, None)
    response = h.send(main, call(model="big"), Client("key:team", "team", key))
    assert headers(response)["x-router-deployment"] == "o" and secret_provider.calls == []


def test_context_length_goes_only_to_fallbacks_with_a_larger_window() -> None:
    main = group(deployment("m", Scripted("context"), context_window=8192), deployment("m2", Scripted("ok"),
                 context_window=8192), name="small", fallbacks=("same", "large"))
    same_provider, large_provider = Scripted("ok"), Scripted("ok")
    h = Harness(main, group(deployment("s", same_provider, group="same", context_window=8192), name="same"),
                group(deployment("l", large_provider, group="large", context_window=128000), name="large"))
    response = h.send(main, call(model="small"))
    assert headers(response)["x-router-deployment"] == "l"
    assert same_provider.calls == [] and len(large_provider.calls) == 1
    assert len(main.deployments[1].provider.calls) == 0  # type: ignore[attr-defined] # same window: not tried


def test_content_policy_goes_to_fallbacks_only_when_the_group_allows_it() -> None:
    for allowed, expect_fallback in ((False, False), (True, True)):
        other = Scripted("ok")
        main = group(deployment("m", Scripted("policy")), name="strict", fallbacks=("lenient",), policy=allowed)
        h = Harness(main, group(deployment("l", other, group="lenient"), name="lenient"))
        if expect_fallback:
            assert headers(h.send(main, call(model="strict")))["x-router-deployment"] == "l"
        else:
            with pytest.raises(RouterError) as info:
                h.send(main, call(model="strict"))
            assert info.value.code == "content_policy_violation" and other.calls == []


def test_the_clients_models_list_is_tried_in_order() -> None:
    first = group(deployment("a", Scripted(503)), name="first")
    second_provider = Scripted("ok")
    second = group(deployment("b", second_provider, group="second"), name="second")
    h = Harness(first, second)
    response = h.send(first, call(model="first", models=["first", "second"]), then=(second,))
    assert headers(response)["x-router-deployment"] == "b"
    assert "models" not in orjson.loads(second_provider.calls[0].body)  # the router follows the list itself


# -- streams -------------------------------------------------------------------------------------------------

def run_stream(h: Harness, g: ModelGroup) -> tuple[dict[str, str], bytes]:
    async def go() -> tuple[dict[str, str], bytes]:
        response = await h.dispatcher.send(g, call(stream=True))
        assert isinstance(response, SSEResponse)
        return headers(response), await body(response)
    return asyncio.run(go())


def test_a_stream_failing_before_its_first_content_moves_on_and_the_client_sees_one_clean_stream() -> None:
    failing, good = Scripted("stream-error-first"), Scripted("ok")
    h = Harness(group(deployment("a", failing), deployment("b", good)))
    head, content = run_stream(h, h.groups["g"])
    assert head["x-router-deployment"] == "b" and head["x-router-attempts"] == "2"
    assert b"overloaded" not in content and content.count(ROLE) == 1 and content.endswith(DONE)


def test_a_stream_failing_after_content_ends_with_an_error_event_and_nothing_twice() -> None:
    broken, good = Scripted("stream-error-after"), Scripted("ok")
    h = Harness(group(deployment("a", broken), deployment("b", good)))
    head, content = run_stream(h, h.groups["g"])
    assert head["x-router-deployment"] == "a" and good.calls == []
    assert content.count(b'"content":"Hi"') == 1 and content.endswith(error_event("broke midway"))


def test_no_first_token_within_the_timeout_moves_on() -> None:
    slow, good = Scripted("slow"), Scripted("ok")
    a = deployment("a", slow, first_token_timeout=0.05)
    h = Harness(group(a, deployment("b", good)))
    head, content = run_stream(h, h.groups["g"])
    assert head["x-router-deployment"] == "b" and content.endswith(DONE)
    assert a.stats.in_flight == 0


def test_every_stream_attempt_failing_is_a_proper_http_error() -> None:
    h = Harness(group(deployment("a", Scripted("stream-error-first")), deployment("b", Scripted(503))))
    with pytest.raises(RouterError) as info:
        run_stream(h, h.groups["g"])
    assert info.value.status in (502, 503) and info.value.headers
    assert info.value.headers["x-router-attempts"] == "2"
