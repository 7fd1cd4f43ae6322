"""The dispatcher with fake providers: filters, steering, the cost threshold, renaming, statistics hooks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from starlette.responses import Response

from router.config import Settings
from router.errors import RouterError
from router.model_rename import ModelRename
from router.providers.base import ChatCall, Provider
from router.routing.deployment import Deployment, ModelGroup
from router.routing.dispatch import Dispatcher
from router.routing.stats import DeploymentStats
from router.routing.strategies import build_strategy
from router.upstream import SSEResponse

SETTINGS = Settings(router_cost_threshold=0)


class Fake(Provider):
    """Answers as told; keeps every call it got."""

    type = "openai"

    def __init__(self, type_: str = "openai", fail: str | None = None, stream_chunks: int = 2,
                 max_tokens_param: str | None = None) -> None:
        self.type = type_  # type: ignore[misc]
        self.fail = fail
        self.stream_chunks = stream_chunks
        self.max_tokens_param = max_tokens_param
        self.calls: list[ChatCall] = []

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        self.calls.append(call)
        if self.fail == "unreachable":
            raise RouterError(502, "could not connect", code="upstream_unreachable")
        if self.fail == "400":
            raise RouterError(400, "bad", code="bad")
        if call.stream:
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(self.stream_chunks):
                    yield b'data: {"model":"' + call.model.encode() + b'","choices":[]}\n\n'
            return SSEResponse(chunks())
        return Response(orjson.dumps({"model": call.model, "choices": []}), media_type="application/json")


def deployment(id_: str, provider: Provider | None = None, group: str = "g", upstream: str | None = None,
               **fields: object) -> Deployment:
    upstream = upstream or group
    type_ = provider.type if provider is not None else "openai"
    return Deployment(id=id_, group=group, type=type_, provider=provider or Fake(), upstream_model=upstream,
                      rename=ModelRename(group, upstream) if upstream != group else None, stats=DeploymentStats(),
                      local=type_ == "local", **fields)  # type: ignore[arg-type]


def group(*deployments: Deployment, strategy: str = "round-robin") -> ModelGroup:
    return ModelGroup("g", list(deployments), build_strategy(strategy, SETTINGS))


def call(stream: bool = False, **extra: object) -> ChatCall:
    payload = {"model": "g", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    return ChatCall("g", payload, orjson.dumps(payload), stream, False)


def send(g: ModelGroup, c: ChatCall, dispatcher: Dispatcher | None = None) -> Response | SSEResponse:
    return asyncio.run((dispatcher or Dispatcher(SETTINGS)).send(g, c))


async def drain(response: SSEResponse, stop_after: int | None = None) -> list[bytes]:
    """Run the response as the server would; `stop_after`: the client leaves after that many chunks."""
    sent: list[bytes] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, object]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send_(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])  # type: ignore[arg-type]
            if stop_after is not None and len(sent) >= stop_after:
                gone.set()
                await asyncio.sleep(0.01)  # the watcher cancels us here

    await response({"type": "http"}, receive, send_)  # type: ignore[arg-type]
    return sent


def header(response: Response | SSEResponse) -> str:
    return dict(response.raw_headers)[b"x-router-deployment"].decode()


# -- pass-through, renaming, header ---------------------------------------------------------------

def test_a_request_needing_no_change_is_the_same_call() -> None:
    fake = Fake()
    c = call()
    response = send(group(deployment("a", fake)), c)
    assert fake.calls[0] is c  # byte for byte: not even a copy
    assert header(response) == "a"


def test_rename_both_ways_json_and_stream() -> None:
    fake = Fake()
    d = deployment("a", fake, upstream="up-model")
    response = send(group(d), call())
    assert fake.calls[0].model == "up-model" and orjson.loads(fake.calls[0].body)["model"] == "up-model"
    assert orjson.loads(bytes(response.body))["model"] == "g"  # type: ignore[union-attr]
    stream = send(group(d), call(stream=True))
    assert isinstance(stream, SSEResponse)
    chunks = asyncio.run(drain(stream))
    assert chunks and all(b'"model":"g"' in c for c in chunks)


def test_provider_object_is_removed_except_for_openrouter() -> None:
    plain, router_ = Fake(), Fake("openrouter")
    steer = {"order": ["b"], "allow_fallbacks": True}
    send(group(deployment("a", plain)), call(provider=steer))
    assert "provider" not in orjson.loads(plain.calls[0].body) and "provider" not in plain.calls[0].payload
    c = call(provider=steer)
    send(group(deployment("b", router_)), c)
    assert router_.calls[0] is c


def test_max_tokens_param_per_deployment() -> None:
    llama = Fake(max_tokens_param="max_tokens")
    send(group(deployment("a", llama)), call(max_completion_tokens=5))
    assert orjson.loads(llama.calls[0].body)["max_tokens"] == 5


# -- steering -------------------------------------------------------------------------------------

def test_only_ignore_order_and_max_price() -> None:
    a = deployment("a", input_price=1.0, output_price=2.0)
    b = deployment("b", Fake("anthropic"), input_price=10.0, output_price=20.0)
    c = deployment("c")  # unknown price
    g = group(a, b, c)
    assert {header(send(g, call(provider={"only": ["anthropic"]}))) for _ in range(4)} == {"b"}
    assert {header(send(g, call(provider={"ignore": ["A", "b"]}))) for _ in range(4)} == {"c"}
    assert {header(send(g, call(provider={"order": ["c", "a"]}))) for _ in range(4)} == {"c"}
    assert {header(send(g, call(provider={"max_price": {"prompt": 5}}))) for _ in range(4)} == {"a"}
    with pytest.raises(RouterError) as info:
        send(g, call(provider={"only": ["nobody"]}))
    assert info.value.status == 503 and "excluded by 'provider'" in info.value.message


def test_sort_price_picks_the_cheapest() -> None:
    a = deployment("a", input_price=5.0, output_price=5.0)
    b = deployment("b", input_price=1.0, output_price=1.0)
    g = group(a, b, strategy="round-robin")
    assert {header(send(g, call(provider={"sort": "price"}))) for _ in range(4)} == {"b"}


@pytest.mark.parametrize("steer, param", [
    ("x", "provider"), ({"only": "a"}, "provider.only"), ({"sort": "fastest"}, "provider.sort"),
    ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"), ({"allow_fallbacks": 1}, "provider.allow_fallbacks"),
])
def test_bad_provider_object_is_400(steer: object, param: str) -> None:
    with pytest.raises(RouterError) as info:
        send(group(deployment("a")), call(provider=steer))
    assert info.value.status == 400 and info.value.param == param


# -- filters, threshold ---------------------------------------------------------------------------

def test_context_window_skips_and_400_when_nothing_fits() -> None:
    small, big = deployment("small", context_window=100), deployment("big", context_window=100_000)
    long = call(messages=[{"role": "user", "content": "x" * 2000}])
    assert {header(send(group(small, big), long)) for _ in range(3)} == {"big"}
    with pytest.raises(RouterError) as info:
        send(group(small), long)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"


def test_own_rpm_takes_the_deployment_out_until_it_refills() -> None:
    now = [1000.0]
    dispatcher = Dispatcher(SETTINGS, clock=lambda: now[0])
    limited, other = deployment("limited", rpm=2), deployment("other")
    g = group(limited, other, strategy="round-robin")
    seen = [header(send(g, call(provider={"order": ["limited"]}), dispatcher)) for _ in range(4)]
    assert seen == ["limited", "limited", "other", "other"]
    now[0] += 30  # one request's worth back
    assert header(send(g, call(provider={"order": ["limited"]}), dispatcher)) == "limited"


def test_cost_threshold_moves_expensive_requests_to_a_healthy_local_deployment() -> None:
    dispatcher = Dispatcher(Settings(router_cost_threshold=1000))  # $0.01
    pricey = deployment("pricey", input_price=1000.0, output_price=1000.0)  # ~$0.26 for this request
    live = [True]
    local = deployment("agent-gpu", Fake("local"), live=lambda: live[0])
    g = group(pricey, local, strategy="cost")  # cost alone picks pricey: local's price is unknown
    assert header(send(g, call(), dispatcher)) == "agent-gpu"
    cheap = deployment("cheap", input_price=0.01, output_price=0.01)
    assert header(send(group(cheap, local, strategy="cost"), call(), dispatcher)) == "cheap"
    live[0] = False  # no local deployment healthy: the normal choice
    assert header(send(g, call(), dispatcher)) == "pricey"


# -- statistics hooks, skipping ------------------------------------------------------------------

def test_unreachable_is_skipped_and_every_attempt_recorded_once() -> None:
    down = deployment("down", Fake(fail="unreachable"))
    up = deployment("up")
    response = send(group(down, up), call(provider={"order": ["down"]}))
    assert header(response) == "up"
    for d in (down, up):
        assert d.stats.in_flight == 0 and d.stats.negative_ends == 0
    assert up.stats.samples(False) == 1


def test_a_sample_taken_in_a_queue_is_scaled_back_to_the_deployment_s_own_speed() -> None:
    """A request sent to a full deployment (max_parallel 2, 3 in flight: it waits behind 2 of them) records
    its time divided by (3 + 1) / 2, so the estimate does not count a queue that the strategies count again
    from the requests in flight (and that has drained by then)."""
    ticks = iter([0.0, 0.0, 4.0])  # clock: picked and started at 0, answered at 4 s
    d = deployment("local", max_parallel=2)
    for _ in range(3):
        d.stats.begin()
    send(group(d), call(), Dispatcher(SETTINGS, clock=lambda: next(ticks)))
    assert d.stats.in_flight == 3 and d.stats.expected_latency(False, 10.0) == pytest.approx(2.0)
    free = deployment("hosted")  # unlimited (the default): 100 in flight change nothing
    for _ in range(100):
        free.stats.begin()
    ticks = iter([0.0, 0.0, 4.0])
    send(group(free), call(), Dispatcher(SETTINGS, clock=lambda: next(ticks)))
    assert free.stats.expected_latency(False, 10.0) == pytest.approx(4.0)


def test_errors_carry_the_header_and_end_the_attempt() -> None:
    bad = deployment("bad", Fake(fail="400"))
    with pytest.raises(RouterError) as info:
        send(group(bad), call())
    assert info.value.headers == {"x-router-deployment": "bad", "x-router-attempts": "1"}
    assert bad.stats.in_flight == 0 and bad.stats.negative_ends == 0


def test_none_answering_names_each_one() -> None:
    a, b = deployment("a", Fake(fail="unreachable")), deployment("b", Fake(fail="unreachable"))
    with pytest.raises(RouterError) as info:
        send(group(a, b), call())
    assert info.value.status == 503 and info.value.code == "no_deployment_available"
    assert "deployment a: could not connect" in info.value.message and "deployment b" in info.value.message


@pytest.mark.parametrize("stop_after", [None, 1])
def test_stream_in_flight_back_to_zero_whether_finished_or_abandoned(stop_after: int | None) -> None:
    d = deployment("s", Fake(stream_chunks=5))

    async def run() -> list[bytes]:
        response = await Dispatcher(SETTINGS).send(group(d), call(stream=True))
        assert isinstance(response, SSEResponse) and d.stats.in_flight == 1
        return await drain(response, stop_after)

    chunks = asyncio.run(run())
    assert (len(chunks) == 5) if stop_after is None else (len(chunks) < 5)
    assert d.stats.in_flight == 0 and d.stats.negative_ends == 0
    assert d.stats.samples(True) == 1  # time to first token, recorded once


def test_cancelled_while_waiting_for_the_upstream_ends_the_attempt() -> None:
    class Hanging(Fake):
        async def chat(self, call: ChatCall) -> Response | SSEResponse:
            await asyncio.sleep(10)
            raise AssertionError

    d = deployment("h", Hanging())

    async def run() -> None:
        task = asyncio.create_task(Dispatcher(SETTINGS).send(group(d), call()))
        await asyncio.sleep(0.01)
        assert d.stats.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert d.stats.in_flight == 0 and d.stats.negative_ends == 0


def test_disabled_and_dead_are_left_out() -> None:
    off = deployment("off", enabled=False)
    dead = deployment("dead", live=lambda: False)
    on = deployment("on")
    assert {header(send(group(off, dead, on), call())) for _ in range(4)} == {"on"}
