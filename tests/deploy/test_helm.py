"""The Helm chart (deploy/helm/llm-router), rendered and linted by Helm's own engine (helm-python-sdk),
every manifest validated against a pinned Kubernetes version's schemas (kubernetes-validate), and its
wiring checked against what the router and the agent read and serve."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import chart

from local_agent.config import AgentSettings, WorkerSpec
from router.config import Settings, load_settings
from tests.support.processes import AgentProcess, RouterProcess, free_port, run_cli

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "llm-router"
K8S_VERSION = "1.32.0"  # the kubectl on our image; the chart's kubeVersion is >=1.30
CRDS = {"ServiceMonitor", "HTTPRoute"}  # not in Kubernetes' schemas: checked structurally below
NAMESPACE = "ai"

MASTER_KEY = "sk-master-0123456789abcdef"
OPENAI_KEY = "sk-openai-fedcba9876543210"
AGENT_TOKEN = "agent-token-13579bdf02468ace"
DB_PASSWORD = "pg-pass-4f9a2c71"
REDIS_PASSWORD = "redis-pass-8e1d3b55"
LLMD_KEY = "llmd-key-a1b2c3d4e5f6"
HF_TOKEN = "hf_tokenABCDEFGH12345678"
SECRETS = [MASTER_KEY, OPENAI_KEY, AGENT_TOKEN, DB_PASSWORD, REDIS_PASSWORD, LLMD_KEY, HF_TOKEN]
LLMD_ENDPOINT = "http://llm-d-infra-inference-gateway-istio.llm-d.svc.cluster.local"
PULL = [{"name": "regcred"}]

VALUES: dict[str, dict[str, Any]] = {
    "minimal": {},
    "ha": {
        "replicaCount": 3, "imagePullSecrets": PULL,
        "secrets": {"masterKey": MASTER_KEY, "providerKeys": {"EXTERNAL_OPENAI_KEY": OPENAI_KEY}},
        "database": {"type": "postgres", "url": f"postgresql://router:{DB_PASSWORD}@pg.db.svc:5432/router"},
        "redis": {"enabled": True, "url": f"redis://:{REDIS_PASSWORD}@redis.db.svc:6379/0"},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "metrics": {"requireKey": True, "serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True, "restrictEgress": True,
                          "ingressFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}],
                          "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]},
        "config": {"ROUTER_TRUSTED_PROXIES": "10.0.0.0/8", "RATE_LIMIT_REQUESTS": 600, "CACHE_MODE": "off"},
    },
    "agents": {
        "imagePullSecrets": PULL,
        "secrets": {"agentToken": AGENT_TOKEN, "providerKeys": {"HUGGING_FACE_HUB_TOKEN": HF_TOKEN}},
        "agents": {"enabled": True, "replicas": 2, "gpus": 2, "config": {"AGENT_HEARTBEAT_INTERVAL": 5},
                   "modelCache": {"persistence": {"enabled": True, "size": "200Gi"}}},
        "database": {"sqlite": {"persistence": {"enabled": True}}},
        "networkPolicy": {"enabled": True, "ingressFrom": [{"podSelector": {}}]},
    },
    "llmd": {
        "imagePullSecrets": PULL,
        "llmd": {"endpoint": LLMD_ENDPOINT},
        "secrets": {"masterKey": MASTER_KEY, "providerKeys": {"LLMD_API_KEY": LLMD_KEY}},
    },
    "ingress": {
        "ingress": {"enabled": True, "className": "nginx", "hosts": [
            {"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"}},
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}],
                      "hostnames": ["llm.example.com"], "timeouts": {"request": "600s"}},
    },
    "existing-secret": {
        "replicaCount": 2, "secrets": {"existingSecret": "router-keys"},
        "database": {"type": "postgres"}, "redis": {"enabled": True},
        "agents": {"enabled": True},
    },
}


def render(values: dict[str, Any], name: str = "rel") -> tuple[list[dict[str, Any]], str]:
    """The manifests, in order, and the whole rendered text (NOTES.txt included)."""
    out = chart.Chart.load(str(CHART)).render(values=values, name=name, namespace=NAMESPACE)
    docs = [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
    return docs, "\n".join(out.values())


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def router_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def agent_env_names() -> set[str]:
    names = {"AGENT_CONFIG"}  # local_agent.config.config_path
    for field, info in AgentSettings.model_fields.items():
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        names |= {c.upper() for c in choices} if choices else {f"AGENT_{field.upper()}"}
    return names


@pytest.mark.parametrize("case", VALUES)
def test_lint_is_clean(case: str) -> None:
    report = chart.lint(str(CHART), VALUES[case], kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", VALUES)
def test_every_manifest_validates_against_kubernetes(case: str) -> None:
    docs, _ = render(VALUES[case])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_custom_resources_are_well_formed() -> None:
    docs, _ = render(VALUES["ha"])
    [monitor] = of_kind(docs, "ServiceMonitor")
    [service] = of_kind(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    # METRICS_REQUIRE_KEY: the scrape sends the master key from the Secret
    assert endpoint["authorization"]["credentials"] == {"name": "rel-llm-router", "key": "ROUTER_MASTER_KEY"}

    docs, _ = render(VALUES["ingress"])
    [route] = of_kind(docs, "HTTPRoute")
    [service] = of_kind(docs, "Service")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}]
    assert rule["timeouts"] == {"request": "600s"}
    [ingress] = of_kind(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}


def env_of(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str | None]:
    """Every variable the container gets: its env (None for references), then envFrom's keys."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source["secretRef"]
        found = [d for d in docs if d["kind"] in ("ConfigMap", "Secret") and d["metadata"]["name"] == ref["name"]]
        for doc in found:
            for key, value in (doc.get("data") or {}).items():
                env[key] = base64.b64decode(value).decode() if doc["kind"] == "Secret" else value
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


@pytest.mark.parametrize("case", VALUES)
def test_every_variable_the_chart_sets_is_read(case: str) -> None:
    docs, _ = render(VALUES[case])
    router_names, agent_names = router_env_names(), agent_env_names()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in containers(doc["spec"]["template"]["spec"]):
            env = env_of(container, docs)
            if doc["kind"] == "StatefulSet":  # the agent
                # the downward API's values, used only inside the agent's own variables as $(NAME)
                helpers = {n for n in env if any(f"$({n})" in (v or "") for v in env.values())}
                # HF_TOKEN: read by the vLLM workers the agent starts (they inherit its environment)
                unknown = set(env) - agent_names - helpers - {"HF_TOKEN"}
            else:
                unknown = set(env) - router_names
            assert not unknown, f"{doc['kind']} {container['name']} sets {sorted(unknown)}, which nothing reads"
            if doc["kind"] == "Deployment":
                # and the router accepts every value given: a wrong one would stop it at start
                load_settings(**{k.lower(): v for k, v in env.items() if v is not None})


def test_the_rendered_settings_start_a_router_that_answers_the_probes(tmp_path: Path) -> None:
    docs, _ = render(VALUES["llmd"])
    [deployment] = of_kind(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {k: v for k, v in env_of(container, docs).items() if v is not None}
    # the pod's paths and bind address become this test's; everything else as rendered
    env.update({"SQLITE_DB_PATH": str(tmp_path / "data" / "models.db"), "LOG_DIR": str(tmp_path / "logs")})
    router = RouterProcess(tmp_path, env).start()
    try:
        probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
        assert probes == ["/health", "/health", "/ready"]
        with router.http() as http:
            for path in probes:
                assert http.get(path).status_code == 200, path
            # the master key from the Secret is in force
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}).status_code == 200
    finally:
        router.stop()


def test_the_rendered_agent_settings_start_an_agent_that_answers_its_probes(tmp_path: Path) -> None:
    docs, _ = render(VALUES["agents"])
    [statefulset] = of_kind(docs, "StatefulSet")
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    [config_map] = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "rel-llm-router-agent"]
    config = yaml.safe_load(config_map["data"]["agent.yaml"])
    assert [WorkerSpec.model_validate(w).model for w in config["workers"]] == ["Qwen/Qwen2.5-1.5B-Instruct"]
    env = {k: v for k, v in env_of(container, docs).items() if v is not None and "$(" not in v}
    env.pop("AGENT_CONFIG")
    env["AGENT_ROUTER_URL"] = ""  # standalone here: no router Service on this machine
    agent = AgentProcess(tmp_path, {"workers": []}, env=env).start()  # workers need a GPU: none here
    try:
        for probe in ("livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert agent.http().get(path).status_code == 200, path
    finally:
        agent.stop()


@pytest.mark.parametrize("case", VALUES)
def test_no_secret_value_appears_outside_the_secret(case: str) -> None:
    docs, text = render(VALUES[case])
    secret_data = [v for d in of_kind(docs, "Secret") for v in (d.get("data") or {}).values()]
    leaked = [s for s in SECRETS if s in text]
    assert leaked == [], f"{leaked} in the rendered manifests"
    for value in secret_data:  # the Secret carries them base64-encoded
        assert base64.b64decode(value)
    given = [s for s in SECRETS if s in repr(VALUES[case])]
    decoded = " ".join(base64.b64decode(v).decode() for v in secret_data)
    assert all(s in decoded for s in given)
    assert "stringData" not in text


@pytest.mark.parametrize("case", VALUES)
def test_every_container_requests_resources_and_every_pod_has_pull_secrets(case: str) -> None:
    docs, _ = render(VALUES[case])
    for spec in pod_specs(docs):
        for container in containers(spec):
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), container["name"]
        if VALUES[case].get("imagePullSecrets"):
            assert spec["imagePullSecrets"] == PULL


def test_router_pod_drains_before_it_is_killed() -> None:
    docs, _ = render({})
    [deployment] = of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep < spec["terminationGracePeriodSeconds"]
    # the router's own drain after SIGTERM (its shutdown settings' defaults) must fit after the sleep
    drain = sum(f.default for name, f in Settings.model_fields.items()
                if re.search(r"shutdown|drain|grace", name) and isinstance(f.default, int | float))
    assert sleep + max(drain, 30) < spec["terminationGracePeriodSeconds"]  # 30: uvicorn's graceful timeout


def test_migration_job_is_a_hook_that_waits_for_the_database_then_migrates(tmp_path: Path) -> None:
    docs, _ = render(VALUES["ha"])
    [job] = of_kind(docs, "Job")
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "hook-failed" not in hooks["helm.sh/hook-delete-policy"]  # a failed Job stays for its logs
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] <= 1
    [container] = spec["containers"]
    # the image's `router` (Dockerfile's virtualenv): waits for the database, then migrates, or fails
    assert container["command"] == ["/opt/venv/bin/router", "migrate", "--wait", "120"]
    # run as the Job runs it, against a database that is not there: it waits, then fails loudly
    unreachable = f"postgresql://router:{DB_PASSWORD}@127.0.0.1:{free_port()}/router"
    started = time.monotonic()
    r = run_cli(tmp_path, *container["command"][1:3], "1", env={"DATABASE_URL": unreachable})
    assert r.returncode != 0 and time.monotonic() - started >= 1
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot reach" in r.stderr, r.stderr
    assert DB_PASSWORD not in r.stdout + r.stderr
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "DATABASE_URL"]
    # the release's Secret does not exist yet before install: the Job's comes as an earlier hook
    [secret] = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == ref["name"]]
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(hooks["helm.sh/hook-weight"])
    assert DB_PASSWORD in base64.b64decode(secret["data"][ref["key"]]).decode()

    docs, _ = render(VALUES["existing-secret"])
    [job] = of_kind(docs, "Job")
    [env] = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "router-keys", "key": "DATABASE_URL"}
    assert of_kind(docs, "Secret") == []
    assert of_kind(render({})[0], "Job") == []  # SQLite migrates in the router itself


def test_llmd_endpoint_is_wired() -> None:
    docs, text = render(VALUES["llmd"])
    [config_map] = of_kind(docs, "ConfigMap")
    assert config_map["data"]["LLMD_ENDPOINT"] == LLMD_ENDPOINT
    assert "router refresh-llmd" in text  # NOTES.txt says what to run next
    assert "LLMD_ENDPOINT" not in of_kind(render({})[0], "ConfigMap")[0]["data"]


def test_agents_announce_to_the_router_service_with_the_token() -> None:
    docs, _ = render(VALUES["agents"])
    [service] = [d for d in of_kind(docs, "Service") if d["spec"].get("clusterIP") != "None"]
    [statefulset] = of_kind(docs, "StatefulSet")
    spec = statefulset["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    port = service["spec"]["ports"][0]["port"]
    assert env["AGENT_ROUTER_URL"]["value"] == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
    token = env["AGENT_ROUTER_TOKEN"]["valueFrom"]["secretKeyRef"]
    [secret] = of_kind(docs, "Secret")
    assert base64.b64decode(secret["data"][token["key"]]).decode() == AGENT_TOKEN
    assert token["name"] == secret["metadata"]["name"]
    assert re.fullmatch(r"http://\$\(POD_IP\):\d+", env["AGENT_ENDPOINT"]["value"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert statefulset["spec"]["replicas"] == 2
    # the router's NetworkPolicy lets the agents in, and only the router reaches the agents
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    agent_labels = spec and statefulset["spec"]["selector"]["matchLabels"]
    assert any(peer.get("podSelector", {}).get("matchLabels") == agent_labels
               for rule in policies["rel-llm-router"]["spec"]["ingress"] for peer in rule.get("from", []))
    [rule] = policies["rel-llm-router-agent"]["spec"]["ingress"]
    [deployment] = of_kind(docs, "Deployment")
    assert rule["from"] == [{"podSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}]


def test_several_replicas_share_postgres_and_are_protected() -> None:
    docs, _ = render(VALUES["ha"])
    [deployment] = of_kind(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [pdb] = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    [config_map] = of_kind(docs, "ConfigMap")
    assert "SQLITE_DB_PATH" not in config_map["data"]
    assert of_kind(render({})[0], "PodDisruptionBudget") == []  # one replica: a PDB would block drains


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": 2}, "database.type=postgres"),
    ({"autoscaling": {"enabled": True}}, "database.type=postgres"),
    ({"database": {"type": "postgres"}}, "database.url"),
    ({"agents": {"enabled": True}}, "secrets.agentToken"),
    ({"redis": {"enabled": True}}, "redis.url"),
    ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs"),
    ({"config": {"ROUTER_MASTER_KEY": MASTER_KEY}}, "ROUTER_MASTER_KEY"),  # keys never in the ConfigMap
    ({"config": {"ROUTER_PORT": "9000"}}, "ROUTER_PORT"),  # the chart wires it
    ({"database": {"type": "mysql"}}, "database"),
    ({"replicas": 2}, "replicas"),  # a misspelt key is refused, not ignored
])
def test_values_that_cannot_work_are_refused_with_a_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        render(values)


def test_the_chart_runs_what_the_images_hold() -> None:
    from tests.deploy.dockerfile import parse

    root = CHART.parents[2]
    docs, _ = render(VALUES["agents"])
    router_image, agent_image = parse(root / "Dockerfile").final, parse(root / "deploy/docker/agent.Dockerfile").final
    [deployment] = of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["command"] == router_image.exec_form("CMD")[:2]  # `router serve`, as the image runs it
    assert f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == \
        router_image.last("USER")
    assert str(container["ports"][0]["containerPort"]) in (router_image.last("EXPOSE") or "").split()
    [statefulset] = of_kind(docs, "StatefulSet")
    spec = statefulset["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["command"] == agent_image.exec_form("CMD")
    assert f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == \
        agent_image.last("USER")
    assert str(container["ports"][0]["containerPort"]) in (agent_image.last("EXPOSE") or "").split()


def test_llmd_files_name_each_other() -> None:
    """deploy/llm-d: the router's endpoint is the Gateway's Service, the route joins Gateway and pool, and
    the pool selects the model servers."""
    folder = CHART.parents[1] / "llm-d"
    load = lambda name: yaml.safe_load((folder / name).read_text())  # noqa: E731
    readme = (folder / "README.md").read_text()
    releases = dict(re.findall(r"helm upgrade --install (\w+) (\S+)", readme))
    assert releases.keys() >= {"infra", "gaie", "ms"}
    gateway = "infra-inference-gateway"  # llm-d-infra names its Gateway RELEASE-inference-gateway
    route = load("httproute.yaml")
    assert route["spec"]["parentRefs"][0]["name"] == gateway
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "gaie")  # the inferencepool chart's release
    gaie, ms = load("gaie-values.yaml"), load("ms-values.yaml")
    assert gaie["inferencePool"]["modelServers"]["matchLabels"].items() <= ms["modelArtifacts"]["labels"].items()
    port = gaie["inferencePool"]["targetPorts"][0]["number"]
    assert port == backend["port"] == ms["routing"]["servicePort"]
    assert port in [p["containerPort"] for c in ms["decode"]["containers"] for p in c["ports"]]
    assert load("infra-values.yaml")["gateway"]["gatewayClassName"] == gaie["provider"]["name"] == "istio"

    values = load("router-values.yaml")
    # Istio's Service for a Gateway is GATEWAY-istio; the namespace is the README's
    assert values["llmd"]["endpoint"] == f"http://{gateway}-istio.llm-d.svc.cluster.local"
    docs, _ = render(values)
    [config_map] = of_kind(docs, "ConfigMap")
    assert config_map["data"]["LLMD_ENDPOINT"] == values["llmd"]["endpoint"]
