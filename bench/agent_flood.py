"""Chat latency on `dummy` while agent registrations flood the router (issue 9, item 3).

    .venv/bin/python -m bench.agent_flood [--registrations 3000] [--env AGENT_REGISTER_RPM=1000000]

Starts a router on loopback, measures chat p50/p99 alone, then again while one thread registers agents
with new names (three models each) as fast as it can, bounded in count and in time (60 s)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.support.processes import RouterProcess

BODY = {"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}


def chat_latencies(url: str, stop: threading.Event, limit: int) -> list[float]:
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while len(out) < limit and not stop.is_set():
            started = time.perf_counter()
            http.post("/v1/chat/completions", json=BODY).raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
    return out


def flood(url: str, count: int, done: threading.Event, result: dict[str, int]) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            resp = http.post("/register", json={"name": f"flood-{i}", "endpoint": "http://127.0.0.1:9",
                                                "models": [f"m{i}-a", f"m{i}-b", "shared-model"]})
            result[str(resp.status_code)] = result.get(str(resp.status_code), 0) + 1
    done.set()


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"n={len(ms)} p50={statistics.median(ms):.2f} ms p99={ms[int(len(ms) * 0.99) - 1]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registrations", type=int, default=3000)
    parser.add_argument("--env", action="append", default=[])
    args = parser.parse_args()
    env = {"LOCAL_AGENT_URL": "", **dict(e.split("=", 1) for e in args.env)}
    router = RouterProcess(Path(tempfile.mkdtemp(prefix="flood-")), env).start()
    try:
        print("alone:       ", summary(chat_latencies(router.url, threading.Event(), 2000)))
        done, result = threading.Event(), {}
        started = time.monotonic()
        thread = threading.Thread(target=flood, args=(router.url, args.registrations, done, result))
        thread.start()
        during = chat_latencies(router.url, done, 100_000)
        thread.join()
        elapsed = time.monotonic() - started
        print("during flood:", summary(during))
        print(f"registrations: {sum(result.values())} in {elapsed:.1f} s, by status {result}")
    finally:
        router.stop()


if __name__ == "__main__":
    main()
