"""What watching a request costs (issue 13: at most 5 us per request for the metrics): a request's record made,
priced and finished through the router's real `Observer` — metrics, then the request log's queue (its writer
thread running against a real SQLite file), then the access log (its thread writing a real file) — in this
process, CPU time of every thread counted (`time.process_time`), so the writers' work is in the figure.

`python -m bench.observe` prints the table; `bench.run` prints it first."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from typing import Any

from router.config import load_settings
from router.observability import Metrics, setup_logging, stop_logging
from router.observability.observer import Observer

HEADERS = [(b"host", b"router"), (b"content-type", b"application/json"), (b"authorization", b"Bearer x")]
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 0}}


class _Priced:
    def expected_cost(self, prompt: int, completion: int) -> float:
        return (prompt * 2.5 + completion * 10.0) / 1e6


async def _measure(observer: Observer, n: int, stream: bool) -> float:
    target = _Priced()
    started = time.process_time()
    for i in range(n):
        ex = observer.begin(HEADERS, "/v1/chat/completions")
        ex.client, ex.model, ex.deployment, ex.provider, ex.status, ex.target = (
            "team-a", "gpt-4o", "openai-api.openai.com", "openai", 200, target)
        ex.stream, ex.attempts, ex.upstream_seconds = stream, 1, 0.0005
        if stream:
            ex.first_token = ex.started + 0.0002
        observer.settle(ex, USAGE, None, target)
        observer.finish(ex, time.perf_counter())
        if i % 500 == 0:
            await asyncio.sleep(0)  # the request log's flush task gets its turn, as between requests
    await asyncio.sleep(1.2)  # the writers finish what was queued: their CPU counts
    return (time.process_time() - started) / n * 1e6  # the sleeps cost no CPU


async def rows(n: int = 50_000) -> list[tuple[str, float, float]]:
    # the access lines are still written, to nowhere (opening /dev/null blocks nothing)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # noqa: ASYNC230
        return await _rows(n)


async def _rows(n: int) -> list[tuple[str, float, float]]:
    work = tempfile.mkdtemp(prefix="bench-observe-")
    out = []
    for label, env in (("metrics", {"ACCESS_LOG": "false", "REQUEST_LOG": "false"}),
                       ("metrics + request log", {"ACCESS_LOG": "false", "REQUEST_LOG": "true"}),
                       ("metrics + request log + access log", {"ACCESS_LOG": "true", "REQUEST_LOG": "true"})):
        settings = load_settings(LOG_DIR=f"{work}/logs", SQLITE_DB_PATH=f"{work}/models.db", **env)
        setup_logging(settings)
        request_log: Any = None
        if settings.request_log:
            from router.observability.request_log import RequestLog

            request_log = RequestLog.from_settings(settings, lambda n: None)
            await request_log.start()
        observer = Observer(settings, Metrics(), request_log)
        plain = await _measure(observer, n, False)
        streamed = await _measure(observer, n, True)
        if request_log is not None:
            await request_log.stop()
        stop_logging()
        out.append((label, plain, streamed))
    return out


def print_table(results: list[tuple[str, float, float]]) -> None:
    print("Per-request observability in process (CPU us per request, writer threads included):")
    print()
    print("| what | non-streaming | streaming |")
    print("|---|---:|---:|")
    for label, plain, streamed in results:
        print(f"| {label} | {plain:.1f} | {streamed:.1f} |")
    print()


if __name__ == "__main__":
    print_table(asyncio.run(rows()))
