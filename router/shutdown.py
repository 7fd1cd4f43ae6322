"""Graceful shutdown of `router serve`: SIGTERM drains a worker instead of dropping what it serves.

uvicorn already stops well once told to: it closes the listener, asks every connection to close after its
answer, waits `timeout_graceful_shutdown` for requests to finish, then cancels them. `Drain` adds what a load
balancer needs in front of that. On SIGTERM it marks the worker draining at once (`/ready` answers 503
`shutting_down`, every answer carries `connection: close`), keeps accepting connections for
`SHUTDOWN_DELAY` seconds (so the balancer or Kubernetes sees the 503, or drops the endpoint, before
connections are refused), then passes the signal to uvicorn's own handler. `SHUTDOWN_GRACE_PERIOD` seconds
later it cuts whatever is still open (`RouterHttpProtocol.cut_all`: a 503, or a final error event for a
stream), just before uvicorn's own deadline. SIGINT (Ctrl+C) skips the delay. A second signal exits at once.

`serve` is `uvicorn.run` for `router serve`: the same Config, Server and worker supervisor, with a
`Supervisor` that passes SIGTERM/SIGINT on to the workers at once (each worker drains as above) and lets go
of its own copy of the listening socket, so the listener closes when the last worker closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from router.server import RouterHttpProtocol

log = logging.getLogger("router.shutdown")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: seconds uvicorn's own deadline (`timeout_graceful_shutdown`) lies beyond the grace period: a backstop only
UVICORN_MARGIN = 1


class Drain:
    """One worker's shutdown: the `draining` flag `/ready` reads, and the timeline from the first signal."""

    def __init__(self, delay: float, grace: float) -> None:
        self.delay = delay
        self.grace = grace
        self.draining = False  # a stop signal came: /ready answers 503
        self.cut = False  # the grace period is over: what is still running was cut and is cancelled
        self._previous: dict[int, Any] = {}  # the handlers taken over, given back by `uninstall`
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT over from the uvicorn server running this app (its `handle_exit`), to
        stop it later. Called in the lifespan: the main thread, inside uvicorn's signal capture. Nothing
        happens where no uvicorn server handles them (in-process tests, other threads, other servers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            server = getattr(previous, "__self__", None)
            if isinstance(server, uvicorn.Server):
                self._server = server
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        """Give the signals back (the lifespan's end: uvicorn has stopped serving)."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: the operator wants it gone now
            os.write(2, b"router: second stop signal: exiting now, cutting every open request\n")
            os._exit(0)
        self.draining = True  # /ready is 503 from this instant
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._begin, sig)  # the rest on the loop, not in a signal handler

    def _begin(self, sig: int) -> None:
        RouterHttpProtocol.begin_drain()
        delay = self.delay if sig == signal.SIGTERM else 0.0
        log.info("%s: draining: /ready answers 503; new connections accepted for %gs more, then in-flight "
                 "requests get %gs to finish", signal.Signals(sig).name, delay, self.grace)
        assert self._loop is not None
        self._timer = self._loop.call_later(delay, self._close)

    def _close(self) -> None:
        # what uvicorn's handler does, without noting the signal to raise again once stopped (that would kill
        # a worker by SIGTERM before its queued log lines are written): close the listener, let requests finish
        assert self._server is not None and self._loop is not None
        self._server.should_exit = True
        self._timer = self._loop.call_later(self.grace, self._cut)

    def _cut(self) -> None:
        self._timer = None
        self.cut = True
        cut = RouterHttpProtocol.cut_all()
        if cut:
            log.warning("grace period (%gs) over: cut %d request(s) still running", self.grace, cut)


def uvicorn_grace(grace: float) -> int:
    """uvicorn's `timeout_graceful_shutdown` for our grace period: a little later, so `Drain` cuts first."""
    return math.ceil(grace) + UVICORN_MARGIN


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor, stopping its workers as `Drain` expects.

    uvicorn's notices a signal at its next half-second poll and then sends each worker SIGTERM; a second
    signal, while it waits for the workers, it never reads. This one passes each SIGTERM/SIGINT on as it
    comes (a worker's `/ready` turns 503 at once; a second one makes the workers exit at once), and closes
    its own copy of the listening socket, which otherwise keeps accepting connections no worker answers."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.stopping = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)
        self.signal_queue.append(sig)  # uvicorn's loop then logs it and stops

    def keep_subprocess_alive(self) -> None:
        if not self.stopping:  # a worker that drained and left is not replaced
            super().keep_subprocess_alive()

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()  # the workers hold their own copies: the listener closes with the last of them
        if not self.stopping:  # stopping for another reason (a worker failed to start): uvicorn's SIGTERM
            super().terminate_all()


def _after_server(sig: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the stop signal it handled once it has stopped: the stop was clean, exit 0."""


def serve(app: str, **options: Any) -> None:
    """Run the router as `uvicorn.run(app, **options)` does, with `Supervisor` for several workers."""
    config = uvicorn.Config(app, **options)
    if config.workers > 1:
        Supervisor(config, sockets=[config.bind_socket()]).run()
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _after_server)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
