"""The Grafana dashboard (deploy/grafana/llm-router.json): a well-formed dashboard whose every PromQL
expression parses (PyPI `promql-parser`) and whose every metric exists in a real scrape of a router after real
traffic (streams and not, a cache hit, failures, a rate-limited request); compose provisions it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-router.json"
#: Grafana's variables, as a query would see them
VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$deployment": ".*"}
MSG = [{"role": "user", "content": "hi"}]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(dash: dict) -> Iterator[str]:
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def concrete(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(concrete(expr)), visit)
    return names


def families(scrape: str) -> set[str]:
    """Metric names a scrape has: declared families, and each histogram's and counter's series names."""
    found = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            found.add(name)
            if kind == "histogram":
                found |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind == "counter":
                found.add(name + "_total" if not name.endswith("_total") else name)
        elif line and not line.startswith("#"):
            found.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return found


def test_the_dashboard_is_well_formed() -> None:
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and {"model", "deployment"} <= set(variables)
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("requests", "error", "duration", "first token", "tokens", "spend", "cache", "rate-limit", "budget",
                  "circuit", "agent", "redis", "request log"):
        assert topic in titles, topic


def test_every_expression_parses_and_a_broken_one_does_not() -> None:
    exprs = list(expressions(dashboard()))
    assert len(exprs) > 30
    for expr in exprs:
        promql_parser.parse(concrete(expr))
    with pytest.raises(Exception):  # noqa: B017 - the parser's own error type is not exported
        promql_parser.parse("sum(rate(x[5m])")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, openai_stub: OpenAIStub) -> str:
    from tests.support.processes import RouterProcess

    router = RouterProcess(tmp_path_factory.mktemp("dash"), {
        "OPENAI_BASE_URL": openai_stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "RATE_LIMIT_REQUESTS": "8"}).start()
    try:
        with router.http() as http:
            for body in ({"model": "gpt-4o", "messages": MSG}, {"model": "gpt-4o", "messages": MSG, "stream": True},
                         {"model": "gpt-4o", "messages": MSG, "temperature": 0},
                         {"model": "gpt-4o", "messages": MSG, "temperature": 0},  # a cache hit
                         {"model": "gpt-error-500", "messages": MSG}):
                http.post("/v1/chat/completions", json=body)
            assert wait_for(lambda: http.post("/v1/chat/completions", json={"model": "dummy", "messages": MSG})
                            .status_code == 429, 10)
            return http.get("/metrics").text
    finally:
        router.stop()


def test_every_metric_the_dashboard_reads_is_in_a_real_scrape(scraped: str) -> None:
    present = families(scraped)
    dash = dashboard()
    wanted = set()
    for expr in expressions(dash):
        wanted |= metric_names(expr)
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            wanted.add(re.match(r"label_values\((\w+),", variable["definition"]).group(1))  # type: ignore[union-attr]
    missing = sorted(wanted - present)
    assert not missing, f"the dashboard reads metrics no router exposes: {missing}"
    assert "router_no_such_metric_total" not in present  # the check can fail


def test_compose_provisions_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "compose.yaml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((ROOT / "deploy" / "compose" / "grafana" / "provisioning" / "dashboards"
                               / "llm-router.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"../grafana:{path}:ro" in volumes
