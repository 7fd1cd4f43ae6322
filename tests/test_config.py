"""Settings: environment over .env over [tool.router] over defaults; bad values stop startup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_settings
from tests.support.processes import CONFIG_PREFIXES, clean_env

ROOT = Path(__file__).resolve().parents[1]


def limit_in_413(router) -> str:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", content=b"x" * 5000)
    assert resp.status_code == 413
    return resp.json()["error"]["message"]


def test_precedence_env_over_dotenv_over_pyproject(start_router, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.router]\nMAX_BODY_BYTES = 2000\n")
    (tmp_path / ".env").write_text("MAX_BODY_BYTES=3000\n")
    assert "limit of 4000 bytes" in limit_in_413(start_router({"MAX_BODY_BYTES": "4000"}))
    assert "limit of 3000 bytes" in limit_in_413(start_router())
    (tmp_path / ".env").unlink()
    assert "limit of 2000 bytes" in limit_in_413(start_router())


def test_smart_routing_weights_from_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROUTER_COST_WEIGHT", "ROUTER_LATENCY_WEIGHT", "ROUTER_COST_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.router]\nROUTER_COST_WEIGHT = 0.25\nROUTER_LATENCY_WEIGHT = 4\nROUTER_COST_THRESHOLD = 50\n")
    s = load_settings()
    assert (s.router_cost_weight, s.router_latency_weight, s.router_cost_threshold) == (0.25, 4.0, 50.0)
    monkeypatch.setenv("ROUTER_COST_WEIGHT", "2")
    assert load_settings().router_cost_weight == 2.0


@pytest.fixture()
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder and none of our variables in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(CONFIG_PREFIXES):
            monkeypatch.delenv(name)
    return tmp_path


def test_shipped_env_example_is_the_design_sample_and_loads(bare: Path) -> None:
    """`.env.example`, copied to `.env` as the README says, is a valid configuration with the design's values."""
    (bare / ".env").write_text((ROOT / ".env.example").read_text())
    s = load_settings()
    assert s.rate_limit_requests == 60
    assert s.sqlite_db_path == "data/models.db" and s.local_agent_url == "http://local_agent:5000"
    assert s.llmd_endpoint is None and s.hugging_face_hub_token is None  # empty means unset
    assert s.external_openai_key is not None and "sk-..." not in repr(s)
    assert (s.hf_cache_dir, s.hf_device) == ("data/hf_models", "cpu")
    assert (s.router_cost_weight, s.router_latency_weight, s.router_cost_threshold) == (1.0, 1.0, 1000)


def test_rate_limits_are_off_by_default(bare: Path) -> None:
    assert load_settings().rate_limit_requests == 0 and load_settings().rate_limit_tokens == 0


@pytest.mark.parametrize("var, value", [("AGENT_TTL", "soon"), ("ROUTER_PORT", "70000"),
                                        ("LOG_LEVEL", "LOUD"), ("UPSTREAM_TIMEOUT", "-1"),
                                        ("HF_DEVICE", "gpu"), ("HF_MAX_LOADED_MODELS", "0"),
                                        ("ROUTER_AGENT_NETWORKS", "10.0.0.0/8,bogus"),
                                        ("ROUTER_INSTANCE_ID", "has space")])
def test_invalid_value_fails_startup_naming_the_variable(tmp_path: Path, var: str, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "router.cli", "serve"], cwd=tmp_path,
                          env=clean_env(tmp_path, {var: value}), capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert var in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_load_settings_reports_every_bad_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(agent_ttl="x", max_body_bytes="y")
    assert "AGENT_TTL" in str(info.value) and "MAX_BODY_BYTES" in str(info.value)
