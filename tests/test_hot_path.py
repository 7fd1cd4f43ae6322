"""The forwarding path's cheaper mechanisms keep their behaviour: a stream learns of its client leaving from the
server's `Disconnects` (no watcher task), and falls back to watching `receive` under any other server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message

from router.upstream import DISCONNECTS, Disconnects, SSEResponse


class Source:
    """An endless event stream that records being closed."""

    def __init__(self) -> None:
        self.closed = False
        self.sent = 0

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                self.sent += 1
                yield b'data: {"n": %d}\n\n' % self.sent
                await asyncio.sleep(0)
        finally:
            self.closed = True


def scope_with(disconnects: Disconnects | None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http"}
    if disconnects is not None:
        scope["extensions"] = {DISCONNECTS: {"connection": disconnects}}
    return scope


async def never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_a_stream_ends_when_the_server_reports_its_client_gone_without_a_watcher_task() -> None:
    source, disconnects, closed = Source(), Disconnects(), []

    async def scenario() -> int:
        response = SSEResponse(source.events())
        response.on_close.append(lambda: closed.append(True))
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)
            if len(sent) == 4:
                disconnects.lose()  # what RouterHttpProtocol.connection_lost does
            await asyncio.sleep(0)

        relay = asyncio.create_task(response(scope_with(disconnects), never, send))
        await asyncio.sleep(0)
        tasks = len(asyncio.all_tasks())  # this test's task and the relay: no watcher beside them
        await asyncio.wait_for(relay, 2)  # ends normally: a client leaving is not an error
        assert disconnects.callbacks == []
        return tasks

    assert asyncio.run(scenario()) == 2
    assert source.closed and closed == [True] and source.sent < 10


def test_a_stream_whose_client_left_before_it_began_ends_at_once() -> None:
    source, disconnects = Source(), Disconnects()
    disconnects.lose()

    async def send(message: Message) -> None:
        await asyncio.sleep(0)

    async def scenario() -> None:
        await asyncio.wait_for(SSEResponse(source.events())(scope_with(disconnects), never, send), 2)

    asyncio.run(scenario())  # an endless source: only the cancellation ends it within the 2 s
    assert source.sent == 0 or source.closed  # cancelled at its first send: the source never started


def test_without_the_extension_a_watcher_notices_the_disconnect_message() -> None:
    source = Source()
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if source.sent == 3:
            gone.set()
        await asyncio.sleep(0)

    async def scenario() -> None:
        await asyncio.wait_for(SSEResponse(source.events())(scope_with(None), receive, send), 2)

    asyncio.run(scenario())
    assert source.closed and source.sent < 10
