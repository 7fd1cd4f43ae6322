"""Fake OpenAI-compatible deployments for the routing simulator (`bench.routing`).

Each `FakeSpec` is one upstream on its own loopback port: chat completions, streaming and not, with a
lognormal time to first token around a median (plus prefill time for long prompts), a generation speed in
tokens per second, a failure rate (HTTP 500 after the first-token time) and a concurrency at which it
saturates: beyond it requests wait in a FIFO queue, so latency grows with the queue, as a local GPU
server's does. It answers as its own `model` and counts what it served (GET /stats, POST /reset): requests,
failures, prompt and completion tokens (what a hosted API would bill), the deepest queue, and requests that
named another model (the router must rewrite `model` for it).

All fakes of a run share one process and event loop:

    python -m bench.fake_deployment SPECS.json     # [{"port": 8101, "name": "fast", ...}, ...]
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web

DEFAULT_OUTPUT_TOKENS = 128
TICK = 0.02  # seconds between stream chunks at most (faster generation sends several tokens a chunk)


@dataclass(frozen=True)
class FakeSpec:
    """One fake deployment: how it behaves, and the prices the registry is given for it."""

    name: str  # the deployment's name in the registry (`x-router-deployment`)
    model: str  # what this upstream calls the model (the registry's upstream_model)
    type: str = "openai"  # the registry type the router reaches it as (`llm-d` counts as local)
    ttft: float = 0.2  # median seconds to the first token, unloaded
    sigma: float = 0.25  # lognormal spread of the first-token time (0: fixed)
    tokens_per_s: float = 100.0  # generation speed of one request
    prefill_per_s: float = 0.0  # prompt tokens processed per second before the first token (0: free)
    failure_rate: float = 0.0  # share of requests answered 500
    hang: bool = False  # takes every request and never answers (a hung server)
    concurrency: int = 0  # requests served at once; the rest queue (0: no limit, a hosted API)
    input_price: float = 0.0  # USD per million tokens, given to the router through the registry
    output_price: float = 0.0
    seed: int = 0

    def scaled(self, factor: float) -> FakeSpec:
        """The same deployment with every duration multiplied by `factor` (speeds divided by it)."""
        return replace(self, ttft=self.ttft * factor, tokens_per_s=self.tokens_per_s / factor,
                       prefill_per_s=self.prefill_per_s / factor if self.prefill_per_s else 0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / 1_000_000


def count_prompt_tokens(payload: dict[str, Any]) -> int:
    """What the fake bills as prompt tokens: a tokenizer's rough figure (4 characters a token, 4 a message)."""
    total = 0
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += 4 + math.ceil(len(content) / 4 if isinstance(content, str) else 0)
    return total


def output_tokens(payload: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_OUTPUT_TOKENS


def first_token_time(spec: FakeSpec, rng: random.Random, prompt_tokens: int) -> float:
    """Seconds from taking a slot to the first token: lognormal around the median, plus prefill."""
    ttft = rng.lognormvariate(math.log(spec.ttft), spec.sigma) if spec.sigma > 0 else spec.ttft
    return ttft + (prompt_tokens / spec.prefill_per_s if spec.prefill_per_s else 0.0)


@dataclass
class Counters:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wrong_model: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    queued: int = 0
    max_queued: int = 0


@dataclass
class Fake:
    spec: FakeSpec
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.spec.seed)
        self.slots = asyncio.Semaphore(self.spec.concurrency) if self.spec.concurrency > 0 else None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "name": self.spec.name})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.spec.name, **asdict(self.counters)})

    async def reset(self, request: web.Request) -> web.Response:
        self.counters = Counters()
        self.rng = random.Random(self.spec.seed)
        return web.json_response({"status": "ok"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = orjson.loads(await request.read())
        c = self.counters
        c.requests += 1
        if payload.get("model") != self.spec.model:
            c.wrong_model += 1
        prompt = count_prompt_tokens(payload)
        wanted = output_tokens(payload)
        fail = self.rng.random() < self.spec.failure_rate
        ttft = first_token_time(self.spec, self.rng, prompt)
        c.queued += 1
        c.max_queued = max(c.max_queued, c.queued)
        try:
            if self.slots is not None:
                await self.slots.acquire()
        finally:
            c.queued -= 1
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)
        try:
            if self.spec.hang:
                await asyncio.sleep(3600)  # until the client gives up
            await asyncio.sleep(ttft)
            if fail:
                c.failed += 1
                return web.json_response({"error": {"message": f"{self.spec.name}: injected failure",
                                                    "type": "server_error", "param": None, "code": None}},
                                         status=500)
            if payload.get("stream"):
                return await self.stream(request, payload, prompt, wanted)
            await asyncio.sleep(wanted / self.spec.tokens_per_s)
            c.ok += 1
            c.prompt_tokens += prompt
            c.completion_tokens += wanted
            return web.Response(body=orjson.dumps(self.completion(prompt, wanted)), content_type="application/json")
        finally:
            c.in_flight -= 1
            if self.slots is not None:
                self.slots.release()

    async def stream(self, request: web.Request, payload: dict[str, Any], prompt: int,
                     wanted: int) -> web.StreamResponse:
        """The first token now, the rest at `tokens_per_s` (several a chunk when faster than one a TICK)."""
        c = self.counters
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        c.prompt_tokens += prompt  # billed once the upstream starts answering, whatever happens next
        await resp.write(self.chunk({"role": "assistant", "content": "tok"}))
        c.completion_tokens += 1
        sent, start = 1, time.monotonic()
        per_tick = max(1, round(self.spec.tokens_per_s * TICK))
        while sent < wanted:
            n = min(per_tick, wanted - sent)
            # paced against the start, so sleeps that overrun do not slow the generation down
            await asyncio.sleep(max(0.0, start + (sent + n - 1) / self.spec.tokens_per_s - time.monotonic()))
            await resp.write(self.chunk({"content": " tok" * n}))
            sent += n
            c.completion_tokens += n
        await resp.write(self.chunk({}, "stop"))
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await resp.write(self.event({**self.head("chat.completion.chunk"), "choices": [],
                                         "usage": self.usage(prompt, wanted)}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        c.ok += 1
        return resp

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.spec.name}", "object": obj, "created": int(time.time()),
                "model": self.spec.model}

    @staticmethod
    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self, prompt: int, completion: int) -> dict[str, Any]:
        text = "tok" + " tok" * (completion - 1)
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": self.usage(prompt, completion)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self.event({**self.head("chat.completion.chunk"),
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    @staticmethod
    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(data) + b"\n\n"


async def serve(specs: list[tuple[FakeSpec, int]]) -> None:
    """Serve each spec on its port until cancelled."""
    runners = []
    for spec, port in specs:
        runner = web.AppRunner(Fake(spec).app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        runners.append(runner)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def load_specs(path: Path) -> list[tuple[FakeSpec, int]]:
    items = orjson.loads(path.read_bytes())
    return [(FakeSpec(**{k: v for k, v in item.items() if k != "port"}), int(item["port"])) for item in items]


def dump_specs(specs: list[tuple[FakeSpec, int]]) -> bytes:
    return orjson.dumps([{**asdict(spec), "port": port} for spec, port in specs])


if __name__ == "__main__":
    uvloop.run(serve(load_specs(Path(sys.argv[1]))))
