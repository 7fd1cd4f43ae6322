"""`make bench-routing`: the routing strategies, side by side, against fake deployments.

Starts fake OpenAI-compatible deployments on loopback (`bench.fake_deployment`: latency distributions,
time to first token, tokens per second, failures, prices, a concurrency beyond which requests queue),
fills a real router's registry with `router apply FILE`, and drives the same seeded workload once per
strategy (set with `router update-model GROUP --strategy S`; a fresh router process each time, so no
strategy inherits another's measurements). Three
scenarios:

- mixed: a fast expensive hosted model, a slow cheap hosted one and a free local one that queues beyond 4
  requests, under an open-loop mixed workload (streams and not, prompt and output sizes varied). One row
  per strategy: p50/p95/p99 latency and time to first token, total cost (the fakes' token counts times
  their prices), error rate, each deployment's share (from `x-router-deployment`). Target: `cost-latency`
  beats `round-robin` on p99 latency by at least 30% at no higher cost.
- ttft: `latency` among a 1 s-TTFT and a 3 s-TTFT deployment: at least 90% of 50 streams to the 1 s one.
- threshold: two hosted deployments and a local one under `round-robin` with ROUTER_COST_THRESHOLD at its
  default: every request whose expected cost is above it must land on the local deployment.
- chaos: a deployment failing 30% of requests, a hung one and a healthy one, under `cost-latency` and
  `round-robin`, with short timeouts (first token 1.5 s, whole exchange 3 s): at least 99.9% of requests
  succeed, and p99 stays within a timeout plus one healthy answer.

Prints the tables (markdown) and one PASS/FAIL line per target; exits 1 if one fails.

    python -m bench.routing [--quick] [--time-scale 1.0] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml

from bench.fake_deployment import FakeSpec, dump_specs

ROOT = Path(__file__).resolve().parents[1]
# the router's configuration variables: none leaks from the caller's shell into the simulated router
CONFIG_PREFIXES = ("ROUTER_", "SQLITE_", "REGISTRY_", "AGENT_", "LOCAL_AGENT", "OPENAI_", "EXTERNAL_", "LLMD_",
                   "ANTHROPIC_", "GOOGLE_", "OPENROUTER_", "GROK_", "VENICE_", "HF_", "HUGGING_FACE", "UPSTREAM_",
                   "MAX_BODY", "REDIS_", "CACHE_", "RATE_LIMIT", "LOG_", "PROMETHEUS_")
STRATEGIES = ("cost-latency", "latency", "cost", "least-busy", "weighted", "round-robin", "random")
WORDS = ("route", "token", "model", "latency", "cost", "queue", "stream", "deploy", "local", "price")
#: the chaos scenario's timeouts (seconds): a stream's first token, a whole non-streaming exchange
CHAOS_FIRST_TOKEN_TIMEOUT = 1.5
CHAOS_TIMEOUT = 3.0
#: ROUTER_COST_THRESHOLD's unit: thousandths of a US cent (1e-5 USD)
THRESHOLD_UNIT = 1e-5


@dataclass(frozen=True)
class Workload:
    """A fixed, seeded list of requests: open loop at `rate` per second (0: all at once), at most
    `concurrency` in flight."""

    requests: int
    rate: float
    concurrency: int
    stream_share: float = 0.5
    prompt_tokens: tuple[int, ...] = (50, 400, 1500)
    max_tokens: tuple[int, ...] = (32, 64, 128)
    seed: int = 7


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the start
    stream: bool
    max_tokens: int
    payload: dict[str, Any]
    body: bytes


@dataclass
class Outcome:
    status: int  # 0: no answer (timeout, connection error); 599: a stream that ended with an error event
    deployment: str
    stream: bool
    latency: float
    ttft: float | None = None
    renamed: bool = True  # every answer carried the group's name, not the upstream's


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    deployments: tuple[FakeSpec, ...]
    workload: Workload
    strategies: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    limit_s: float = 120.0  # per strategy run: requests still open then count as errors


@dataclass
class Row:
    """One strategy's run of one scenario."""

    strategy: str
    requests: int
    errors: int
    latency: tuple[float, float, float]  # p50, p95, p99 seconds of successful requests
    ttft: tuple[float, float, float]  # the same for successful streams
    cost: float  # USD: the fakes' billed tokens times their prices
    shares: dict[str, float]  # deployment -> share of all requests
    stream_shares: dict[str, float]
    not_renamed: int
    wrong_model: int  # requests a fake got under another name than its own
    tokens: dict[str, tuple[int, int]]  # deployment -> prompt and completion tokens it billed
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest rank of sorted values; NaN for none."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def p50_95_99(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), percentile(ordered, 95), percentile(ordered, 99)


def prompt_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text (4 characters each)."""
    words: list[str] = []
    length = 0
    while length < tokens * 4:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def plan(workload: Workload, model: str) -> list[Planned]:
    """The workload's requests, the same for every strategy (seeded)."""
    rng = random.Random(workload.seed)
    at, out = 0.0, []
    for _ in range(workload.requests):
        if workload.rate > 0:
            at += rng.expovariate(workload.rate)
        stream = rng.random() < workload.stream_share
        max_tokens = rng.choice(workload.max_tokens)
        payload: dict[str, Any] = {
            "model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "system", "content": "You are a routing benchmark."},
                         {"role": "user", "content": prompt_text(rng, rng.choice(workload.prompt_tokens))}]}
        if stream:
            payload["stream_options"] = {"include_usage": True}
        out.append(Planned(at, stream, max_tokens, payload, orjson.dumps(payload)))
    return out


async def send(session: aiohttp.ClientSession, url: str, group: str, p: Planned) -> Outcome:
    perf = time.perf_counter
    t0 = perf()
    async with session.post(url, data=p.body, headers={"Content-Type": "application/json"}) as resp:
        deployment = resp.headers.get("x-router-deployment", "?")
        status, first, renamed = resp.status, None, True
        if p.stream and status == 200:
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    status = 599
                    continue
                if first is None:
                    first = perf()
                renamed = renamed and event.get("model") == group
        else:
            body = await resp.read()
            if status == 200:
                renamed = orjson.loads(body).get("model") == group
    return Outcome(status, deployment, p.stream, perf() - t0, None if first is None else first - t0, renamed)


async def drive(url: str, group: str, planned: list[Planned], concurrency: int, limit_s: float) -> list[Outcome]:
    """Send each planned request at its time (at most `concurrency` at once); latency is timed from the
    send. A request without an answer within `limit_s` of the start counts as an error (status 0)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def one(p: Planned) -> Outcome:
            await asyncio.sleep(max(0.0, start + p.at - loop.time()))
            async with slots:
                t0 = loop.time()
                try:
                    async with asyncio.timeout(max(0.0, start + limit_s - t0)):
                        return await send(session, url, group, p)
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    return Outcome(0, "?", p.stream, loop.time() - t0)

        return await asyncio.gather(*(one(p) for p in planned))


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIXES)}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"})
    return env


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


async def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode} ({log}):\n{tail(log)}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up ({log}):\n{tail(log)}")


class Processes:
    """Child processes in their own sessions, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc, log

    async def start(self, argv: list[str], env: dict[str, str], health: str, name: str) -> subprocess.Popen[bytes]:
        """Spawn, then wait until GET `health` answers 200."""
        proc, log = self.spawn(argv, env, name)
        await wait_http(health, proc, log)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def models_file(scenario: Scenario, ports: dict[str, int], strategy: str) -> dict[str, Any]:
    """The registry, as `router apply` reads it."""
    # a server that queues declares how many it serves at once (`max_parallel`, vLLM's --max-num-seqs), as its
    # operator would; hosted ones declare nothing (unlimited)
    deployments = [{"name": d.name, "type": d.type, "endpoint": f"http://127.0.0.1:{ports[d.name]}",
                    "upstream_model": d.model, "input_price": d.input_price, "output_price": d.output_price}
                   | ({"max_parallel": d.concurrency} if d.concurrency else {})
                   for d in scenario.deployments]
    return {"models": {scenario.group: {"strategy": strategy, "deployments": deployments}}}


def cli(work: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"router {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")


def register(work: Path, env: dict[str, str], document: dict[str, Any]) -> None:
    """Fill the registry from the file, as a user keeps theirs: `router apply models.yaml`."""
    path = work / "models.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    cli(work, env, "apply", str(path))


async def fake_stats(session: aiohttp.ClientSession, ports: dict[str, int], action: str) -> dict[str, Any]:
    out = {}
    for name, port in ports.items():
        method = session.post if action == "reset" else session.get
        async with method(f"http://127.0.0.1:{port}/{action}") as resp:
            out[name] = await resp.json()
    return out


async def run_scenario(scenario: Scenario, work: Path, procs: Processes) -> list[Row]:
    """Start the scenario's fakes and fill the registry; per strategy: set the group's strategy, start a
    router (fresh measurements), drive the workload, stop it."""
    folder = work / scenario.name
    folder.mkdir()
    ports = {d.name: free_port() for d in scenario.deployments}
    specs = folder / "fakes.json"
    specs.write_bytes(dump_specs([(d, ports[d.name]) for d in scenario.deployments]))
    fakes = await procs.start([sys.executable, "-m", "bench.fake_deployment", str(specs)], base_env(),
                              f"http://127.0.0.1:{next(iter(ports.values()))}/health", f"{scenario.name}-fakes")
    env = {**base_env(), "SQLITE_DB_PATH": str(folder / "models.db"), "LOG_DIR": str(folder / "logs"),
           **scenario.env}
    planned = plan(scenario.workload, scenario.group)
    rows = []
    try:
        register(folder, env, models_file(scenario, ports, scenario.strategies[0]))
        async with aiohttp.ClientSession() as session:
            for strategy in scenario.strategies:
                cli(folder, env, "update-model", scenario.group, "--strategy", strategy)
                port = free_port()
                router = await procs.start(
                    [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"], env, f"http://127.0.0.1:{port}/health", f"{scenario.name}-router")
                try:
                    await fake_stats(session, ports, "reset")
                    outcomes = await drive(f"http://127.0.0.1:{port}/v1/chat/completions", scenario.group, planned,
                                           scenario.workload.concurrency, scenario.limit_s)
                    stats = await fake_stats(session, ports, "stats")
                finally:
                    procs.stop(router)
                rows.append(summarize(strategy, scenario, outcomes, stats))
    finally:
        procs.stop(fakes)
    return rows


def summarize(strategy: str, scenario: Scenario, outcomes: list[Outcome], stats: dict[str, Any]) -> Row:
    ok = [o for o in outcomes if o.status == 200]
    streams = [o for o in outcomes if o.stream]
    by = Counter(o.deployment for o in outcomes)
    by_stream = Counter(o.deployment for o in streams)
    cost = sum(d.cost(stats[d.name]["prompt_tokens"], stats[d.name]["completion_tokens"])
               for d in scenario.deployments)
    return Row(strategy, len(outcomes), len(outcomes) - len(ok),
               p50_95_99([o.latency for o in ok]), p50_95_99([o.ttft for o in ok if o.ttft is not None]),
               cost, {name: n / len(outcomes) for name, n in by.items()},
               {name: n / len(streams) for name, n in by_stream.items()} if streams else {},
               sum(not o.renamed for o in ok), sum(s["wrong_model"] for s in stats.values()),
               {name: (s["prompt_tokens"], s["completion_tokens"]) for name, s in stats.items()}, outcomes)


# --- report ------------------------------------------------------------------------------------------------


def fmt(values: tuple[float, float, float]) -> str:
    return " / ".join("–" if math.isnan(v) else f"{v:.2f}" for v in values)


def table(scenario: Scenario, rows: list[Row]) -> str:
    names = [d.name for d in scenario.deployments]
    head = ["strategy", "latency p50 / p95 / p99 (s)", "TTFT p50 / p95 / p99 (s)", "cost (USD)", "errors",
            *(f"{n} share" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.strategy, fmt(r.latency), fmt(r.ttft), f"{r.cost:.4f}", f"{r.error_rate:.1%}",
                 *(f"{r.shares.get(n, 0.0):.0%}" for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(scenario: Scenario) -> str:
    w = scenario.workload
    load = f"{w.rate:g} requests/s (Poisson)" if w.rate > 0 else f"closed loop, {w.concurrency} at once"
    parts = [f"### {scenario.name}: {w.requests} requests, {load}, {w.stream_share:.0%} streams, seed {w.seed}"]
    for d in scenario.deployments:
        if d.hang:
            parts.append(f"- `{d.name}` ({d.type}): takes every request and never answers")
            continue
        parts.append(f"- `{d.name}` ({d.type}): TTFT {d.ttft:g} s (σ {d.sigma:g}), {d.tokens_per_s:g} tokens/s, "
                     f"{d.failure_rate:.1%} failures, " + (f"saturates at {d.concurrency}, " if d.concurrency
                                                           else "") + f"${d.input_price:g} / ${d.output_price:g} "
                     "per M tokens in / out")
    return "\n".join(parts)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


def check_mixed(rows: list[Row]) -> Check:
    by = {r.strategy: r for r in rows}
    cl, rr = by["cost-latency"], by["round-robin"]
    gain = 1 - cl.latency[2] / rr.latency[2] if rr.latency[2] > 0 else math.nan
    return Check("cost-latency vs round-robin", gain >= 0.30 and cl.cost <= rr.cost,
                 f"p99 {cl.latency[2]:.2f} s vs {rr.latency[2]:.2f} s ({gain:.0%} lower, target ≥ 30%), "
                 f"cost ${cl.cost:.4f} vs ${rr.cost:.4f} (target: no higher)")


def check_chaos(rows: list[Row]) -> Check:
    """One deployment failing 30% of requests and one hung: at least 99.9% of requests succeed while a healthy
    one remains, and p99 stays bounded by the timeouts (a request that met the hung deployment waited out a
    timeout, then was answered elsewhere: timeout + a healthy answer, 1.5 s at most here)."""
    details, passed = [], True
    for r in rows:
        ok = 1 - r.error_rate
        bound = CHAOS_TIMEOUT + 1.5
        ttft_bound = CHAOS_FIRST_TOKEN_TIMEOUT + 1.5
        good = ok >= 0.999 and r.latency[2] <= bound and r.ttft[2] <= ttft_bound
        passed = passed and good
        details.append(f"{r.strategy}: {ok:.1%} succeeded, p99 {r.latency[2]:.2f} s (≤ {bound:g}), "
                       f"TTFT p99 {r.ttft[2]:.2f} s (≤ {ttft_bound:g})")
    return Check("chaos: failures and a hung deployment absorbed", passed, "; ".join(details))


def check_ttft(rows: list[Row], fast: str) -> Check:
    row = rows[0]
    share = row.stream_shares.get(fast, 0.0)
    return Check("latency strategy finds the faster first token", share >= 0.9 and row.errors == 0,
                 f"{share:.0%} of {row.requests} streams to `{fast}` (target ≥ 90%), {row.errors} errors")


def check_threshold(scenario: Scenario, row: Row, planned: list[Planned], threshold: float) -> Check:
    """Every request whose expected cost on the (equally priced) hosted deployments is above the threshold
    must have been answered by a local deployment; the rest go where the strategy puts them."""
    from router.routing.estimate import output_tokens, prompt_tokens

    hosted = next(d for d in scenario.deployments if d.type not in ("local", "llm-d", "huggingface"))
    local = {d.name for d in scenario.deployments if d.type in ("local", "llm-d", "huggingface")}
    over = under_hosted = under = missed = 0
    for p, o in zip(planned, row.outcomes, strict=True):
        cost = hosted.cost(prompt_tokens(p.payload), output_tokens(p.payload)) / THRESHOLD_UNIT
        if cost > threshold:
            over += 1
            missed += o.deployment not in local or o.status != 200
        else:
            under += 1
            under_hosted += o.deployment not in local and o.status == 200
    passed = missed == 0 and over > 0 and under_hosted > 0
    return Check("cost threshold is exact", passed,
                 f"{over - missed} of {over} requests over {threshold:g} (×1e-5 USD) on a local deployment; "
                 f"{under_hosted} of {under} under it answered by hosted ones")


# --- scenarios ---------------------------------------------------------------------------------------------


def scenarios(quick: bool, scale: float) -> list[Scenario]:
    """The three scenarios; `quick` shrinks the counts (a smoke run), `scale` multiplies every duration
    (and divides the arrival rate)."""
    mixed = Scenario(
        "mixed", "sim-mixed",
        (FakeSpec("fast", "fast-large", ttft=0.3, sigma=0.3, tokens_per_s=150, failure_rate=0.005,
                  input_price=1.0, output_price=4.0, seed=1),
         FakeSpec("cheap", "cheap-small", ttft=1.5, sigma=0.5, tokens_per_s=25, failure_rate=0.01,
                  input_price=0.4, output_price=1.6, seed=2),
         FakeSpec("local", "local-8b", type="llm-d", ttft=0.15, sigma=0.2, tokens_per_s=80, prefill_per_s=4000,
                  concurrency=4, seed=3)),
        Workload(requests=30 if quick else 120, rate=6.0, concurrency=64),
        STRATEGIES, {"ROUTER_COST_THRESHOLD": "0"})
    ttft = Scenario(
        "ttft", "sim-ttft",
        (FakeSpec("ttft-1s", "ttft-fast", ttft=1.0, sigma=0.05, tokens_per_s=400, input_price=1.0,
                  output_price=2.0, seed=4),
         FakeSpec("ttft-3s", "ttft-slow", ttft=3.0, sigma=0.05, tokens_per_s=400, input_price=1.0,
                  output_price=2.0, seed=5)),
        Workload(requests=50, rate=0, concurrency=2, stream_share=1.0, prompt_tokens=(50,), max_tokens=(16,)),
        ("latency",), {"ROUTER_COST_THRESHOLD": "0"})
    threshold = Scenario(
        "threshold", "sim-threshold",
        (FakeSpec("hosted-a", "big-a", ttft=0.05, sigma=0.1, tokens_per_s=2000, input_price=5.0, output_price=60.0,
                  seed=6),
         FakeSpec("hosted-b", "big-b", ttft=0.05, sigma=0.1, tokens_per_s=2000, input_price=5.0, output_price=60.0,
                  seed=7),
         FakeSpec("local", "local-8b", type="llm-d", ttft=0.05, sigma=0.1, tokens_per_s=2000, concurrency=8,
                  seed=8)),
        # output dominates the cost: 50 tokens ≈ 300e-5 USD, 400 tokens ≈ 2400e-5 USD; threshold 1000
        Workload(requests=20 if quick else 60, rate=0, concurrency=4, prompt_tokens=(20, 200),
                 max_tokens=(50, 400)),
        ("round-robin",), {"ROUTER_COST_THRESHOLD": "1000"})
    chaos = Scenario(
        "chaos", "sim-chaos",
        (FakeSpec("flaky", "flaky-m", ttft=0.2, sigma=0.2, tokens_per_s=300, failure_rate=0.3, input_price=1.0,
                  output_price=2.0, seed=11),
         FakeSpec("hung", "hung-m", hang=True, input_price=0.5, output_price=1.0, seed=12),
         FakeSpec("healthy", "healthy-m", ttft=0.3, sigma=0.2, tokens_per_s=300, input_price=2.0, output_price=4.0,
                  seed=13)),
        Workload(requests=60 if quick else 300, rate=10.0, concurrency=64, prompt_tokens=(50, 400),
                 max_tokens=(32, 64)),
        ("cost-latency", "round-robin"),
        {"ROUTER_COST_THRESHOLD": "0", "UPSTREAM_FIRST_TOKEN_TIMEOUT": str(CHAOS_FIRST_TOKEN_TIMEOUT),
         "UPSTREAM_TIMEOUT": str(CHAOS_TIMEOUT)})
    return [rescale(s, scale) for s in (mixed, ttft, threshold, chaos)]


def rescale(s: Scenario, scale: float) -> Scenario:
    if scale == 1.0:
        return s
    w = s.workload
    return replace(s, deployments=tuple(d.scaled(scale) for d in s.deployments),
                   workload=replace(w, rate=w.rate / scale), limit_s=s.limit_s * max(scale, 0.25))


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="router-bench-routing-"))
    procs = Processes(work)
    results: dict[str, Any] = {}
    checks: list[Check] = []
    started = time.monotonic()
    try:
        for scenario in scenarios(args.quick, args.time_scale):
            if args.only and scenario.name not in args.only:
                continue
            if args.strategies:
                scenario = replace(scenario, strategies=tuple(x for x in scenario.strategies if x in args.strategies))
            rows = await run_scenario(scenario, work, procs)
            print(describe(scenario), "", table(scenario, rows), "", sep="\n", flush=True)
            results[scenario.name] = [{k: v for k, v in asdict(r).items() if k != "outcomes"}
                                      | {"error_rate": r.error_rate} for r in rows]
            for r in rows:
                if r.not_renamed or r.wrong_model:
                    print(f"note: {r.strategy}: {r.not_renamed} answers carried an upstream model name, "
                          f"{r.wrong_model} requests reached a fake under the wrong name")
            if scenario.name == "mixed":
                checks.append(check_mixed(rows))
            elif scenario.name == "ttft":
                checks.append(check_ttft(rows, scenario.deployments[0].name))
            elif scenario.name == "chaos":
                checks.append(check_chaos(rows))
            else:
                checks.append(check_threshold(scenario, rows[0], plan(scenario.workload, scenario.group),
                                              float(scenario.env["ROUTER_COST_THRESHOLD"])))
    finally:
        procs.stop_all()
    for check in checks:
        print(check.line())
    print(f"({time.monotonic() - started:.0f} s; logs in {work})")
    if args.json:
        args.json.write_bytes(orjson.dumps({"scenarios": results, "checks": [asdict(c) for c in checks]},
                                           option=orjson.OPT_INDENT_2))
    return 0 if all(c.passed for c in checks) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer requests per scenario")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every latency (and divide arrival rates) by this")
    parser.add_argument("--only", nargs="*", choices=("mixed", "ttft", "threshold", "chaos"), help="run only these")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--strategies", nargs="*", choices=STRATEGIES,
                        help="run only these strategies (the targets need cost-latency and round-robin)")
    sys.exit(uvloop.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
