"""`router refresh-llmd`: the models an llm-d gateway lists become routable `llm-d` deployments."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support.openai_stub import OpenAIStub
from tests.support.processes import free_port, run_cli

GATEWAY_KEY = "sk-llmd-gateway-0123456789abcdef"


def test_refresh_llmd_registers_the_gateway_models_and_routes_to_them(tmp_path: Path, start_router) -> None:
    gateway = OpenAIStub(name="llm-d", key=GATEWAY_KEY, model_ids=["meta-llama/Llama-3.1-8B-Instruct"]).start()
    env = {"LLMD_ENDPOINT": gateway.url, "LLMD_API_KEY": GATEWAY_KEY}
    try:
        r = run_cli(tmp_path, "refresh-llmd", env=env)
        assert r.returncode == 0, r.stderr
        assert "added meta-llama/Llama-3.1-8B-Instruct" in r.stdout
        assert gateway.last().path == "/v1/models"
        assert gateway.last().headers["Authorization"] == f"Bearer {GATEWAY_KEY}"
        exported = run_cli(tmp_path, "export").stdout
        [deployment] = yaml.safe_load(exported)["models"]["meta-llama/Llama-3.1-8B-Instruct"]["deployments"]
        assert (deployment["type"], deployment["kind"], deployment["endpoint"]) == ("llm-d", "weight", gateway.url)
        assert GATEWAY_KEY not in r.stdout + r.stderr + exported

        gateway.model_ids.append("Qwen/Qwen3-0.6B")
        r = run_cli(tmp_path, "refresh-llmd", env=env)
        assert r.returncode == 0, r.stderr
        assert "added Qwen/Qwen3-0.6B" in r.stdout and "1 unchanged" in r.stdout

        router = start_router(env, workdir=tmp_path)
        with router.http() as http:
            answer = http.post("/v1/chat/completions", json={
                "model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from llm-d"
        assert answer.json()["model"] == "Qwen/Qwen3-0.6B"
        assert gateway.last().path == "/v1/chat/completions"
        assert gateway.last().headers["Authorization"] == f"Bearer {GATEWAY_KEY}"
    finally:
        gateway.stop()


def test_refresh_llmd_without_a_key_sends_none(tmp_path: Path) -> None:
    gateway = OpenAIStub(name="llm-d", model_ids=["granite-3b"]).start()
    try:
        r = run_cli(tmp_path, "refresh-llmd", env={"LLMD_ENDPOINT": gateway.url + "/v1/"})
        assert r.returncode == 0, r.stderr
        assert "added granite-3b" in r.stdout
        assert "Authorization" not in gateway.last().headers
    finally:
        gateway.stop()


def test_refresh_llmd_failures_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "add-model", "keep-me", "llm-d", "http://127.0.0.1:9", "weight").returncode == 0
    before = run_cli(tmp_path, "export").stdout
    for env, expected in (({}, "LLMD_ENDPOINT is not set"),
                          ({"LLMD_ENDPOINT": "ftp://gateway"}, "LLMD_ENDPOINT"),
                          ({"LLMD_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "could not reach")):
        r = run_cli(tmp_path, "refresh-llmd", env={"LLMD_ENDPOINT": "", **env})
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, r.stderr
    assert run_cli(tmp_path, "export").stdout == before
