"""Agent configuration (YAML, TOML, environment) and the exact commands its launchers run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from local_agent.config import load_agent_settings
from local_agent.launchers import DockerLauncher, ExternalLauncher, ProcessLauncher, launcher_for
from router.config import ConfigError

YAML = """
router_url: http://router:8000
router_token: secret-token
name: gpu-box-1
endpoint: http://gpu-box-1:5000
heartbeat_interval: 5
workers:
  - model: local-llama3-8b
    launcher: docker
    weights: meta-llama/Meta-Llama-3-8B-Instruct
    port: 8001
    gpus: "0,1"
    cache_dir: /srv/hf
    args: ["--max-model-len", "8192", "--tensor-parallel-size", "2"]
    env: {HF_HUB_ENABLE_HF_TRANSFER: "1"}
  - model: local-tiny
    launcher: process
    weights: /models/tiny
    port: 8002
  - model: local-smollm2
    launcher: external
    url: http://127.0.0.1:8080/v1
    upstream_model: smollm2
"""

TOML = """
router_url = "http://router:8000"
name = "toml-agent"
[[workers]]
model = "local-a"
launcher = "process"
port = 8003
"""


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os
    for name in list(os.environ):
        if name.startswith("AGENT_") or name == "ROUTER_AGENT_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_yaml_config(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(YAML)
    s = load_agent_settings(tmp_path / "agent.yaml")
    assert (s.router_url, s.name, s.endpoint, s.heartbeat_interval) == (
        "http://router:8000", "gpu-box-1", "http://gpu-box-1:5000", 5.0)
    assert s.router_token is not None and s.router_token.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(s)
    assert [w.launcher for w in s.workers] == ["docker", "process", "external"]
    assert [w.health for w in s.workers] == ["/health", "/health", "/v1/models"]


def test_toml_config_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local_agent.toml").write_text(TOML)  # found by its default name
    monkeypatch.setenv("AGENT_NAME", "from-env")
    monkeypatch.setenv("ROUTER_AGENT_TOKEN", "shared-token")  # the router's variable works too
    s = load_agent_settings()
    assert s.name == "from-env" and s.workers[0].model == "local-a"
    assert s.router_token is not None and s.router_token.get_secret_value() == "shared-token"


@pytest.mark.parametrize("text, named", [
    ("workers:\n  - model: m\n    launcher: process\n", "needs 'port'"),
    ("workers:\n  - model: m\n    launcher: external\n", "needs 'url'"),
    ("workers:\n  - model: m\n    launcher: podman\n    port: 1\n", "WORKERS.0.LAUNCHER"),
    ("heartbeat_interval: -1\n", "HEARTBEAT_INTERVAL"),
    ("workers:\n  - {model: a, launcher: process, port: 9}\n  - {model: b, launcher: process, port: 9}\n",
     "two workers listen on 127.0.0.1:9"),
    ("workers: [unclosed\n", "invalid configuration"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path: Path, text: str, named: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_agent_settings(tmp_path / "bad.yaml")
    assert named in str(exc.value) and "\n" not in str(exc.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_agent_settings(tmp_path / "nope.yaml")


def test_docker_launcher_command(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(YAML)
    s = load_agent_settings(tmp_path / "agent.yaml")
    launcher = launcher_for(s.workers[0], "logs")
    assert isinstance(launcher, DockerLauncher)
    assert launcher.command() == [
        "docker", "run", "--rm", "--name", "local-agent-local-llama3-8b-8001",
        "--gpus", '"device=0,1"', "--ipc=host",
        "-p", "127.0.0.1:8001:8000",
        "-v", "/srv/hf:/root/.cache/huggingface",
        "-e", "HUGGING_FACE_HUB_TOKEN", "-e", "HF_HUB_ENABLE_HF_TRANSFER",
        "vllm/vllm-openai:latest",
        "--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--served-model-name", "local-llama3-8b",
        "--max-model-len", "8192", "--tensor-parallel-size", "2",
    ]
    assert launcher.base_url == "http://127.0.0.1:8001"
    all_gpus = launcher_for(s.workers[0].model_copy(update={"gpus": "all"}), "logs")
    assert all_gpus.command()[all_gpus.command().index("--gpus") + 1] == "all"  # type: ignore[attr-defined]


def test_process_and_external_launchers(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(YAML)
    s = load_agent_settings(tmp_path / "agent.yaml")
    process = launcher_for(s.workers[1], "logs")
    assert isinstance(process, ProcessLauncher)
    assert process.command() == [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", "/models/tiny", "--served-model-name", "local-tiny",
                                 "--host", "127.0.0.1", "--port", "8002"]
    external = launcher_for(s.workers[2], "logs")
    assert isinstance(external, ExternalLauncher) and external.base_url == "http://127.0.0.1:8080"
