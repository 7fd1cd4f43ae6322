"""The agent's announcer against a router that closes kept-alive connections as they are reused (uvicorn closes
idle ones after 5 s; the race is made certain here): every heartbeat still lands, nothing is re-registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.openai_stub import wait_for
from tests.support.processes import AgentProcess
from tests.support.server import ClosingKeepAliveServer


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_heartbeats_survive_connections_closed_under_them(tmp_path: Path, reset: bool) -> None:
    router = ClosingKeepAliveServer(reset=reset).start()  # answers one request per connection, drops the next
    agent = AgentProcess(tmp_path, {"name": "agent-1", "router_url": router.url, "heartbeat_interval": 0.1,
                                    "workers": []})
    try:
        agent.start()
        assert wait_for(lambda: router.answered >= 10, timeout=20)  # 1 registration, then heartbeats
        status = agent.workers()["router"]
        assert status["registrations"] == 1, status  # no spurious re-registration
        assert status["last_error"] is None and status["heartbeats"] >= 9, status
        assert router.dropped >= 4  # the connections really were closed under requests
        assert "failed" not in agent.output()  # and no contact was logged as failed
    finally:
        agent.stop()
        router.stop()
