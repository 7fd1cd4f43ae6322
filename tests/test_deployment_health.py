"""Deployment health end to end: a failing deployment is ejected, `/health/deployments` and `router health`
say so and when it returns, and `/metrics` counts failures, retries, ejections and the circuit's state."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess, free_port

MSG = [{"role": "user", "content": "hi"}]
MASTER = "sk-master-health-0123456789"


@pytest.fixture()
def stub() -> Iterator[OpenAIStub]:
    s = OpenAIStub(name="healthy").start()
    yield s
    s.stop()


def group_with_a_dead_deployment(router: RouterProcess, stub: OpenAIStub) -> None:
    for args in (("--name", "dead", "--upstream-model", "gpt-4o", "shared", "openai",
                  f"http://127.0.0.1:{free_port()}", "api"),
                 ("--name", "alive", "--upstream-model", "gpt-4o", "shared", "openai", stub.url, "api")):
        done = router.cli("add-model", *args)
        assert done.returncode == 0, done.stderr


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_failing_deployment_is_ejected_and_reported(start_router, stub: OpenAIStub) -> None:
    router = start_router({"ROUTER_BREAKER_FAILURES": "2", "ROUTER_BREAKER_BASE_EJECTION": "60"})
    group_with_a_dead_deployment(router, stub)
    with router.http() as http:
        assert wait_for(lambda: http.post("/v1/chat/completions", json={
            "model": "shared", "messages": MSG, "provider": {"only": ["alive"]}}).status_code == 200)
        answers = [http.post("/v1/chat/completions", json={"model": "shared", "messages": MSG}) for _ in range(8)]
        assert all(a.status_code == 200 and a.headers["x-router-deployment"] == "alive" for a in answers)
        # two failed attempts (each followed by the other deployment), then "dead" is out: one attempt each
        assert sum(a.headers["x-router-attempts"] == "2" for a in answers) == 2
        assert [a.headers["x-router-attempts"] for a in answers[-3:]] == ["1", "1", "1"]

        health = http.get("/health/deployments")  # loopback, no master key configured: allowed
        assert health.status_code == 200
        by_name = {d["deployment"]: d for d in health.json()["data"] if d["model"] == "shared"}
        dead, alive = by_name["dead"], by_name["alive"]
        assert dead["state"] == "open" and dead["ejections"] == 1 and dead["returns_at"] is not None
        assert "refused" in dead["reason"] or "connect" in dead["reason"]
        assert alive["state"] == "closed" and alive["latency"] is not None

        text = http.get("/metrics").text
        assert metric(text, "router_deployment_state", model="shared", deployment="dead") == 2.0
        assert metric(text, "router_deployment_ejections_total", model="shared", deployment="dead") == 1.0
        assert metric(text, "router_upstream_failures_total", model="shared", deployment="dead") == 2.0
        assert metric(text, "router_retries_total", model="shared") == 2.0

    shown = router.cli("health", "--url", router.url)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "dead" in line)
    assert "open" in row and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)


def test_the_health_endpoint_needs_the_master_key_when_there_is_one(start_router, stub: OpenAIStub) -> None:
    router = start_router({"ROUTER_MASTER_KEY": MASTER})
    with router.http() as http:
        assert http.get("/health/deployments").status_code == 401
        assert http.get("/health/deployments", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        answer = http.get("/health/deployments", headers={"Authorization": f"Bearer {MASTER}"})
        assert answer.status_code == 200 and any(d["model"] == "dummy" for d in answer.json()["data"])
    shown = router.cli("health", "--url", router.url, env={"ROUTER_MASTER_KEY": MASTER})
    assert shown.returncode == 0 and "dummy" in shown.stdout and MASTER not in shown.stdout
    refused = router.cli("health", "--url", router.url, env={"ROUTER_MASTER_KEY": ""})  # no key: refused
    assert refused.returncode != 0 and "401" in refused.stderr


def test_router_health_says_in_one_line_when_no_router_answers(start_router) -> None:
    router = start_router()
    done = router.cli("health", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode != 0 and "could not reach" in done.stderr and len(done.stderr.strip().splitlines()) == 1
