"""Keep-alive HTTP/1.1 load generator on uvloop: N connections, each sending one
request after another for a bounded time and count, timing every request
(and, for streams, the time to the first body chunk)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    sent: int = 0  # requests sent and answered, warm-up and errors included
    cpu: float = 0.0  # CPU seconds (user + system) the measured server process spent over the run, when known

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per request (errors and warm-up included: the server did that work too)."""
        return self.cpu / self.sent if self.sent else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @staticmethod
    def pct(values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Authorization: Bearer bench-client"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connection(host: str, port: int, request: bytes, deadline: float, budget: list[int],
                      warmup_until: float, out: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    perf = time.perf_counter
    try:
        while perf() < deadline and budget[0] > 0:
            budget[0] -= 1
            t0 = perf()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            first = None
            if b"transfer-encoding: chunked" in lower:
                while True:
                    size = int((await reader.readline()).strip(), 16)
                    if size == 0:
                        await reader.readline()
                        break
                    await reader.readexactly(size + 2)
                    if first is None:
                        first = perf()
            else:
                i = lower.find(b"content-length:")
                length = int(lower[i + 15:lower.find(b"\r\n", i)])
                await reader.readexactly(length)
                first = perf()
            t1 = perf()
            if t0 < warmup_until:
                continue
            if status != 200:
                out.errors += 1
                continue
            out.latencies.append(t1 - t0)
            out.ttfb.append((first or t1) - t0)
    finally:
        writer.close()


async def run(host: str, port: int, request: bytes, concurrency: int, seconds: float,
              max_requests: int, warmup: float = 0.5) -> Result:
    out = Result()
    start = time.perf_counter()
    warm_until = start + warmup
    deadline = warm_until + seconds
    budget = [max_requests]
    await asyncio.gather(*(_connection(host, port, request, deadline, budget, warm_until, out)
                           for _ in range(concurrency)))
    out.elapsed = min(time.perf_counter(), deadline) - warm_until
    out.sent = max_requests - budget[0]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux's /proc; its threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
