"""Bad requests get clear 4xx answers the client can read: duplicate keys, non-string roles, bodies over
the limit (413, not a reset), bodies that never finish (408); `/v1/models` authenticates like chat and
shows a key only its models; `/ready` counts what is served; `owned_by` tells OpenAI from look-alikes."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest

from router.api.body import duplicate_key
from tests.support.processes import RouterProcess

MESSAGES = [{"role": "user", "content": "hi"}]


def slow_duplicate_key(body: bytes) -> str | None:
    seen: set[str] = set()
    for key, _ in json.loads(body, object_pairs_hook=lambda pairs: pairs):
        if key in seen:
            return key
        seen.add(key)
    return None


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"model":"dummy","messages":[],"model":"allowed"}', "model"),
    (b'{"model": "dummy", "messages": [], "model" : "allowed"}', "model"),  # whitespace before the colon
    (b'{"\\u006dodel":"dummy","model":"allowed"}', "model"),  # a key spelled with escapes
    (b'{"model":"a","mod\\u0065l":"b"}', "model"),
    (b'{"model":"a","messages":[{"role":"user","content":"the \\"model\\" is"}]}', None),  # text in a value
    (b'{"model":"a","x":{"model":"b","model":"c"}}', None),  # nested duplicates are not top-level ones
    (b'{"model":"a","user":"u","messages":[{"role":"user","content":"x"}]}', None),  # a value equal to a key
    (b'{"model":"a","user":"u","messages":[{"role":"user"\n}]}', None),
    (b'{"model":"a","user":"u","user":"v","messages":[{"role":"user"}]}', "user"),
    (b'{"a/b":1,"a\\/b":2}', "a/b"),
    (b'{"":1,"":2}', ""),
    (b'{"k,":1, "k,":2}', "k,"),
    (b'{"model":"say \\"model","model":"x"}', "model"),
])
def test_duplicate_keys_are_found_on_tricky_bodies(body: bytes, expected: str | None) -> None:
    assert slow_duplicate_key(body) == expected
    assert duplicate_key(body, orjson.loads(body)) == expected


def test_duplicate_check_cost_per_request() -> None:
    """A typical SDK body (1.5 KB, 6 keys) is checked in microseconds."""
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "system", "content": "x" * 500},
                                                       {"role": "user", "content": "y" * 800}],
                       "temperature": 0.2, "max_tokens": 100, "stream": True, "user": "u-1"}).encode()
    payload = orjson.loads(body)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        assert duplicate_key(body, payload) is None
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, per_call  # measured 2-6 us on a loaded 2-core machine


def post(router: RouterProcess, body: bytes, headers: dict[str, str] | None = None) -> Any:
    with router.http() as http:
        return http.post("/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json", **(headers or {})})


def test_duplicate_top_level_key_is_refused(router: RouterProcess) -> None:
    resp = post(router, b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"model":"dummy"}')
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "duplicate_key" and resp.json()["error"]["param"] == "model"
    # the same with keys on: the allow-list is never checked against one value while another is sent
    assert post(router, orjson.dumps({"model": "dummy", "messages": MESSAGES})).status_code == 200


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 1, True, None])
def test_a_role_that_is_not_a_string_is_a_400(router: RouterProcess, role: object) -> None:
    resp = post(router, orjson.dumps({"model": "dummy", "messages": [{"role": role, "content": "x"}]}))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "messages[0].role"


def test_too_large_body_is_answered_not_reset(router: RouterProcess) -> None:
    """2 MB against the 64 KB limit: urllib (sends everything, then reads) gets the 413 and its error body."""
    body = orjson.dumps({"model": "dummy", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]})
    request = urllib.request.Request(router.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 413
    assert caught.value.headers["connection"] == "close"
    assert json.loads(caught.value.read())["error"]["code"] == "request_too_large"


def test_too_large_chunked_body_is_answered_not_reset(router: RouterProcess) -> None:
    def chunks() -> Any:
        for _ in range(32):
            yield b"x" * 65536

    with router.http() as http:
        resp = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def raw_response(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while time.monotonic() < deadline:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def test_a_body_that_stalls_gets_408_and_the_connection_closes(start_router) -> None:
    router = start_router({"REQUEST_BODY_TIMEOUT": "1"})
    body = orjson.dumps({"model": "dummy", "messages": MESSAGES})
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        started = time.monotonic()
        answer = raw_response(sock, started + 8)  # ends when the router closes the connection
    assert 0.9 < time.monotonic() - started < 5
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "request_timeout"


def test_models_need_a_key_and_show_only_the_allowed(start_router) -> None:
    router = start_router({"ROUTER_MASTER_KEY": "sk-master-0123456789"})
    created = router.cli("create-key", "--name", "tenant", "--models", "dummy")
    assert created.returncode == 0, created.stderr
    key = next(w for w in created.stdout.split() if w.startswith("sk-router-"))
    assert router.cli("add-model", "gpt-other", "openai", "https://api.openai.com", "api").returncode == 0
    deadline = time.monotonic() + 5
    with router.http() as http:
        for path in ("/v1/models", "/v1/models/dummy"):
            assert http.get(path).status_code == 401
            wrong = http.get(path, headers={"Authorization": "Bearer sk-router-wrong"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        tenant = {"Authorization": f"Bearer {key}"}
        master = {"Authorization": "Bearer sk-master-0123456789"}

        def master_sees() -> set[str]:
            return {m["id"] for m in http.get("/v1/models", headers=master).json()["data"]}

        while time.monotonic() < deadline and (http.get("/v1/models", headers=tenant).status_code != 200
                                               or "gpt-other" not in master_sees()):
            time.sleep(0.1)  # the key and the model reach the router's snapshot within a poll
        assert {"dummy", "gpt-other"} <= master_sees()
        listed = http.get("/v1/models", headers=tenant)
        assert [m["id"] for m in listed.json()["data"]] == ["dummy"]
        assert http.get("/v1/models/gpt-other", headers=tenant).status_code == 404
        assert http.get("/v1/models/dummy", headers=tenant).status_code == 200


def test_ready_counts_served_models_and_owned_by_names_lookalikes(start_router) -> None:
    router = start_router({"OPENAI_BASE_URL": "https://api.openai.com"})
    with router.http() as http:
        assert http.get("/ready").json()["models"] == 1  # dummy is served
        assert router.cli("add-model", "smol", "openai", "http://127.0.0.1:9/v1", "api").returncode == 0
        assert router.cli("add-model", "gpt-4o", "openai", "https://api.openai.com/v1", "api").returncode == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and http.get("/ready").json()["models"] != 3:
            time.sleep(0.1)
        assert http.get("/ready").json()["models"] == 3
        owners = {m["id"]: m["owned_by"] for m in http.get("/v1/models").json()["data"]}
    assert owners == {"dummy": "router", "smol": "openai-compatible", "gpt-4o": "openai"}


def test_max_completion_tokens_becomes_max_tokens_for_compatible_servers(start_router, stub) -> None:
    """llama.cpp ignores `max_completion_tokens`: an `openai` entry away from OpenAI's origin gets `max_tokens`;
    OpenAI itself gets the bytes untouched; a per-model option changes the field."""
    router = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": "sk-test-upstream-0123456789abcdef"})
    compatible = stub.url.replace("127.0.0.1", "localhost") + "/v1"  # another origin: not "OpenAI"
    assert router.cli("add-model", "smol", "openai", compatible, "api").returncode == 0

    def sent(model: str, **fields: object) -> dict[str, Any]:
        stub.reset()
        body = orjson.dumps({"model": model, "messages": MESSAGES, **fields})
        deadline = time.monotonic() + 5
        while True:  # the new entry reaches the router's snapshot within a poll
            post(router, body)
            if stub.requests and (stub.last().json()["model"] == model or time.monotonic() > deadline):
                break
            time.sleep(0.1)
        received = stub.last()
        if model == "gpt-4o" and fields == {"max_completion_tokens": 5}:
            assert received.body == body  # passed through byte for byte
        return received.json()

    got = sent("smol", max_completion_tokens=5)
    assert got.get("max_tokens") == 5 and "max_completion_tokens" not in got
    both = sent("smol", max_completion_tokens=5, max_tokens=7)
    assert (both["max_tokens"], both["max_completion_tokens"]) == (7, 5)  # both given: untouched
    official = sent("gpt-4o", max_completion_tokens=5)
    assert official.get("max_completion_tokens") == 5 and "max_tokens" not in official

    changed = router.cli("set-model-option", "smol", "--max-tokens-param", "max_completion_tokens")
    assert changed.returncode == 0, changed.stderr
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "max_tokens" in sent("smol", max_completion_tokens=5):
        time.sleep(0.1)
    assert sent("smol", max_completion_tokens=5) == {"model": "smol", "messages": MESSAGES,
                                                     "max_completion_tokens": 5}
    assert "max_completion_tokens" in sent("smol", max_tokens=5)
    bad = router.cli("set-model-option", "smol", "--max-tokens-param", "tokens")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
