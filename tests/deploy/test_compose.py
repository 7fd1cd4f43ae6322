"""deploy/compose: validated offline by `docker-compose config` (1.29, from `.venv-tools`), then its wiring
checked on the rendered file: settings, service addresses, ports, health checks, scraping, secrets, profiles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from local_agent.config import load_agent_settings
from tests.deploy.test_images import agent_env_names, router_env_names
from tests.support.processes import RouterProcess, run_cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
# variables the vLLM worker (not the agent) reads, passed through the agent's environment to its workers
ENGINE_ENV = {"HF_TOKEN"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$")
REFERENCE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose_binary() -> str:
    local = ROOT / ".venv-tools" / "bin" / "docker-compose"
    path = str(local) if local.exists() else shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not installed: `make .venv-tools/.installed` (make test does it)")
    return path


def env_file_names(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with only `env_file` as the source of variables."""
    env = {k: v for k, v in os.environ.items() if k not in env_file_names(ENV_EXAMPLE)}
    return subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    result = compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def services(rendered: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = rendered["services"]
    return services


def mounted(service: dict[str, Any], target: str) -> Path:
    """The host file mounted at `target`."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return Path(source)
    raise AssertionError(f"nothing is mounted at {target}")


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(command)


def listen_port(name: str, service: dict[str, Any]) -> int:
    """The port the service's process listens on, read from how it is configured."""
    if service["image"].startswith("nginx"):
        found = re.search(r"^\s*listen\s+(\d+);", mounted(service, "/etc/nginx/nginx.conf").read_text(), re.M)
    elif "GF_SERVER_HTTP_PORT" in service.get("environment", {}):
        return int(service["environment"]["GF_SERVER_HTTP_PORT"])
    else:
        found = re.search(r"--port[= ](\d+)|\bport=(\d+)|--web\.listen-address=\S*:(\d+)", command_text(service))
    assert found, f"{name}: no listening port in its configuration"
    return int(next(g for g in found.groups() if g))


def health_port(service: dict[str, Any]) -> int:
    test = " ".join(service["healthcheck"]["test"])
    found = re.search(r"(?:127\.0\.0\.1|localhost):(\d+)|-p (\d+)", test)
    assert found, f"health check without an explicit port: {test}"
    return int(next(g for g in found.groups() if g))


def health_path(service: dict[str, Any]) -> str:
    found = re.search(r"http://127\.0\.0\.1:\d+(/[\w/-]*)", " ".join(service["healthcheck"]["test"]))
    assert found
    return found.group(1)


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, container port) of each published port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # the long form
            out.append((port.get("host_ip", "0.0.0.0"), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        out.append((parts[0] if len(parts) == 3 else "0.0.0.0", int(parts[-1])))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """GET a path on a real router: its status."""
    proc = RouterProcess(tmp_path_factory.mktemp("compose-router"), {"LOCAL_AGENT_URL": ""}).start()
    with proc.http() as http:
        yield lambda path: http.get(path)
    proc.stop()


def test_secrets_are_required_from_the_env_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("\n".join(f"{k}={v}" for k, v in env_file_names(ENV_EXAMPLE).items()
                             if k != "POSTGRES_PASSWORD"))
    result = compose_config(env)
    assert result.returncode != 0 and "set POSTGRES_PASSWORD in .env" in result.stderr


def one_shot(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services that run to completion (others wait for their success), not servers."""
    return {name for s in services.values() for name, how in s.get("depends_on", {}).items()
            if how["condition"] == "service_completed_successfully"}


def test_every_server_has_a_health_check_on_the_port_it_listens_on(services: dict[str, dict[str, Any]]) -> None:
    assert {"router", "lb", "postgres", "redis", "prometheus", "grafana", "agent"} <= set(services)
    assert one_shot(services) == {"migrate"}
    for name, service in services.items():
        if name in one_shot(services):
            assert service["restart"] == "no" and "ports" not in service
            continue
        port = listen_port(name, service)
        assert health_port(service) == port, f"{name}: health check on {health_port(service)}, listens on {port}"
        for _, container_port in published(service):
            assert container_port == port, f"{name}: publishes {container_port}, listens on {port}"
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in one_shot(services) or (
                how["condition"] == "service_healthy" and "healthcheck" in services[dependency]), \
                f"{name} must wait for {dependency} to be healthy"


def test_two_router_replicas_behind_one_public_port(services: dict[str, dict[str, Any]]) -> None:
    router, lb = services["router"], services["lb"]
    assert router["deploy"]["replicas"] == 2 and "ports" not in router
    public = [(name, host) for name, s in services.items() for host, _ in published(s) if host != "127.0.0.1"]
    assert public == [("lb", "0.0.0.0")], "only the load balancer is reachable from outside the host"
    nginx = mounted(lb, "/etc/nginx/nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", nginx, re.M)
    assert upstreams == [("router", str(listen_port("router", router)))]
    assert re.search(r"proxy_pass\s+http://routers;", nginx) and "proxy_buffering off;" in nginx  # streams
    assert health_path(lb) == health_path(router) == "/health"  # the balancer is healthy when a router answers
    assert "/etc/nginx/nginx.conf" in str(lb["volumes"]) and lb["depends_on"] == {
        "router": {"condition": "service_healthy"}}


def test_router_environment_is_router_settings(services: dict[str, dict[str, Any]]) -> None:
    env = services["router"]["environment"]
    assert set(env) <= router_env_names(), f"not router settings: {set(env) - router_env_names()}"


def test_router_names_postgres_and_redis_where_they_listen(services: dict[str, dict[str, Any]]) -> None:
    router = services["router"]
    env, postgres, redis = router["environment"], services["postgres"], services["redis"]
    db = urlsplit(env["DATABASE_URL"])
    assert db.scheme == "postgresql" and db.hostname == "postgres" and db.port == listen_port("postgres", postgres)
    assert db.username == postgres["environment"]["POSTGRES_USER"]
    assert db.password == postgres["environment"]["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    cache = urlsplit(env["REDIS_URL"])
    assert cache.scheme == "redis" and cache.hostname == "redis" and cache.port == listen_port("redis", redis)
    assert cache.password == redis["environment"]["REDIS_PASSWORD"]
    assert "$REDIS_PASSWORD" in command_text(redis)  # the server requires the password the router sends
    # the schema is migrated once, by `router migrate` on the same database, before any replica starts
    migrate = services["migrate"]
    assert router["depends_on"] == {"migrate": {"condition": "service_completed_successfully"},
                                    "redis": {"condition": "service_healthy"}}
    assert migrate["image"] == router["image"] and migrate["command"][:2] == ["/opt/venv/bin/router", "migrate"]
    assert migrate["environment"]["DATABASE_URL"] == env["DATABASE_URL"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_router_trusts_only_the_load_balancer(rendered: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    env = services["router"]["environment"]
    assert env["ROUTER_TRUSTED_PROXIES"] == services["lb"]["networks"]["default"]["ipv4_address"]
    subnet = rendered["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert env["ROUTER_AGENT_NETWORKS"] == subnet


def test_health_and_metrics_paths_are_served_by_the_router(services: dict[str, dict[str, Any]], served: Any) -> None:
    assert served(health_path(services["router"])).status_code == 200
    assert served("/no-such-path").status_code == 404  # the check above can fail


def test_prometheus_scrapes_every_router_on_a_path_it_serves(services: dict[str, dict[str, Any]],
                                                               served: Any) -> None:
    prometheus = services["prometheus"]
    config_path = mounted(prometheus, "/etc/prometheus/prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in command_text(prometheus)
    jobs = yaml.safe_load(config_path.read_text())["scrape_configs"]
    assert jobs
    for job in jobs:
        for sd in job["dns_sd_configs"]:  # one address per replica
            assert sd["type"] == "A"
            for host in sd["names"]:
                assert host in services and sd["port"] == listen_port(host, services[host])
        response = served(job.get("metrics_path", "/metrics"))
        assert response.status_code == 200 and "# TYPE" in response.text


def test_grafana_has_the_prometheus_datasource(services: dict[str, dict[str, Any]]) -> None:
    provisioning = mounted(services["grafana"], "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert url.port == listen_port("prometheus", services["prometheus"])


def is_reference(value: str) -> bool:
    """The whole value is one `${VAR}` (a default, if any, empty)."""
    found = REFERENCE.fullmatch(value)
    return found is not None and not (found.group(2) == "-" and found.group(3))


def test_no_secret_is_written_in_the_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    checked = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert is_reference(value), f"{name}.{key}: a secret must come from .env as ${{VAR}}"
                checked += 1
            if "://" in value and "@" in value:  # credentials inside a URL
                assert urlsplit(REFERENCE.sub("REFERENCE", value)).password == "REFERENCE", f"{name}.{key}"
                checked += 1
    assert checked >= 8


def test_env_example_declares_every_variable_and_holds_no_secret() -> None:
    example = env_file_names(ENV_EXAMPLE)
    text = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = {m.group(1) for m in REFERENCE.finditer(text)}
    assert used <= set(example), f"missing from .env.example: {used - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "" or value.startswith("change-me"), f"{key}: placeholders only in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_agent_runs_only_in_its_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["agent"]["profiles"] == ["agent"]
    assert [n for n, s in services.items() if "profiles" in s] == ["agent"]
    assert not any("agent" in s.get("depends_on", {}) for s in services.values())


def test_agent_is_wired_to_the_routers(services: dict[str, dict[str, Any]]) -> None:
    agent, router = services["agent"], services["router"]
    env = agent["environment"]
    assert set(env) <= agent_env_names() | ENGINE_ENV, f"not agent settings: {set(env) - agent_env_names()}"
    target = urlsplit(env["AGENT_ROUTER_URL"])
    assert target.hostname == "router" and target.port == listen_port("router", router)
    endpoint = urlsplit(env["AGENT_ENDPOINT"])
    assert endpoint.hostname == "agent" and endpoint.port == listen_port("agent", agent)
    assert env["AGENT_ROUTER_TOKEN"] == router["environment"]["ROUTER_AGENT_TOKEN"]
    assert agent["build"]["dockerfile"] == "deploy/docker/agent.Dockerfile"
    assert "VLLM_IMAGE" in (ROOT / agent["build"]["dockerfile"]).read_text()
    assert re.fullmatch(r"vllm/vllm-openai-cpu:v[\d.]+-x86_64", agent["build"]["args"]["VLLM_IMAGE"])


def test_agent_config_file_is_valid_with_a_cpu_worker(services: dict[str, dict[str, Any]]) -> None:
    agent = services["agent"]
    path = mounted(agent, agent["environment"]["AGENT_CONFIG"])
    settings = load_agent_settings(path)
    (worker,) = settings.workers
    assert worker.launcher == "process" and worker.engine == "vllm" and worker.port != listen_port("agent", agent)


def test_builds_point_at_the_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    for name in ("router", "agent"):
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and (ROOT / build["dockerfile"]).is_file()


def test_migrate_service_command_runs(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """The one-shot's argv is a real CLI command (here against an embedded registry)."""
    args = services["migrate"]["command"][1:]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert "schema up to date" in result.stdout
