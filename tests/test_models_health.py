"""`/v1/models`, `/v1/models/{id}`, `/health`, `/ready`."""

from __future__ import annotations

from pathlib import Path

from tests.support.openai_stub import wait_for
from tests.support.schema import assert_valid


def test_models_list_has_registry_agent_and_dummy_models(start_router, tmp_path: Path) -> None:
    router = start_router()
    added = router.cli("add-model", "meta-llama/Llama-3", "huggingface", "https://huggingface.co", "weight")
    assert added.returncode == 0
    with router.http() as http:
        assert http.post("/register", json={"name": "gpu", "endpoint": "http://127.0.0.1:5000",
                                            "models": ["agent-model"]}).status_code == 200
        assert wait_for(lambda: len(http.get("/v1/models").json()["data"]) == 3)
        body = http.get("/v1/models").json()
        assert_valid("ListModelsResponse", body)
        ids = {m["id"]: m for m in body["data"]}
        assert set(ids) == {"dummy", "meta-llama/Llama-3", "agent-model"}
        assert ids["meta-llama/Llama-3"]["owned_by"] == "huggingface"
        assert ids["agent-model"]["owned_by"] == "agent:gpu"
        one = http.get("/v1/models/meta-llama/Llama-3")
        assert one.status_code == 200
        assert_valid("Model", one.json())
        assert one.json()["id"] == "meta-llama/Llama-3"
        assert http.get("/v1/models/dummy").json()["owned_by"] == "router"
        missing = http.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    models = router.client().models.list()
    assert {m.id for m in models.data} == set(ids)


def test_health_and_ready(start_router, tmp_path: Path) -> None:
    router = start_router()
    with router.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        # the registry file becomes unreadable: not ready, yet alive and still serving from memory
        db = tmp_path / "data" / "models.db"
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        db.write_bytes(b"this is not a database" * 100)
        # /ready reads no database itself: it answers from the registry poll, which fails from now on
        assert wait_for(lambda: http.get("/ready").status_code == 503, 15)
        resp = http.get("/ready")
        assert resp.json()["error"]["code"] == "not_ready" and "registry" in resp.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "dummy", "messages": [
            {"role": "user", "content": "x"}]}).status_code == 200
