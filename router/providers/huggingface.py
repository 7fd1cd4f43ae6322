"""`huggingface`: models whose weights run inside the router (kind `weight`).

A request is checked and its sampling parameters read here; the model comes
from the process's `WeightStore` (loaded on first use, once); the prompt is
the tokenizer's chat template; generation runs on the model's worker thread,
at most `HF_MAX_CONCURRENCY` at a time per model, with up to `HF_MAX_QUEUE`
more waiting (beyond that: 503). Streams send each piece of text as the model
makes it; a client that leaves stops the generation at the next token.
Answers carry real token counts and `finish_reason` `stop` or `length`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from starlette.responses import Response

from router.embeddings import embedding_response, inputs_of
from router.errors import RouterError
from router.providers.base import ChatCall, WeightProvider
from router.providers.translate import (
    ChunkWriter, bad_request, choice, completion, max_tokens_of, new_id, reject_unsupported, stop_list, text_of,
    usage_block,
)
from router.upstream import JSONAnswer, SSEResponse
from router.weights import Generated, LoadedModel, Sampling, WeightStore, embed, generate

log = logging.getLogger("router.providers.huggingface")
JSON = dict[str, Any]


def _number(payload: JSON, name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number from {low:g} to {high:g}.", name)
    return float(value)


def sampling_of(payload: JSON) -> Sampling:
    reject_unsupported(payload, "huggingface")
    if payload.get("tools"):
        raise bad_request("'tools' are not supported by huggingface models in the router.", "tools")
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise bad_request("'response_format' other than text is not supported by huggingface models.",
                          "response_format")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("'seed' must be an integer.", "seed")
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("'top_p' must be greater than 0.", "top_p")
    return Sampling(max_tokens=max_tokens_of(payload), temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
                    top_p=top_p, stop=stop_list(payload.get("stop")) or [], seed=seed)


def messages_of(payload: JSON) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": text_of(m.get("content"), f"messages[{i}].content")}
            for i, m in enumerate(payload["messages"])]


def prompt_ids(lm: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to the messages, tokenized (runs on a thread)."""
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RouterError(400, f"Model '{lm.name}' has no chat template, so it cannot serve chat completions.",
                          code="model_not_chat")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError, raise_exception() in templates
        raise RouterError(400, f"Model '{lm.name}' chat template refused these messages: {exc}",
                          param="messages", code="invalid_value") from None
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


class HuggingFaceProvider(WeightProvider):
    type = "huggingface"

    def __init__(self, store: WeightStore, endpoint: str | None = None) -> None:
        self.store = store
        self.endpoint = endpoint  # the hub (or a mirror) to download from when the weights are not local

    async def embeddings(self, call: ChatCall) -> Response:
        """Embeddings in this process, from a sentence-transformers model (pooling and normalisation as its
        folder says), on the model's thread; `prompt_tokens` are the tokens the inputs took."""
        if call.payload.get("dimensions") is not None:
            raise RouterError(400, f"Model '{call.model}' has a fixed number of dimensions; 'dimensions' is not "
                              "supported for it.", param="dimensions", code="invalid_value")
        lm = await self.store.acquire(call.model, self.endpoint)
        if lm.pooling is None:
            raise RouterError(400, f"Model '{call.model}' generates text; it does not make embeddings.",
                              param="model", code="unsupported_operation")
        await lm.slots.acquire()
        lm.active += 1
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                lm.executor, embed, lm, inputs_of(call.payload))
        except RuntimeError:  # the executor was shut down (the model unloaded meanwhile)
            raise RouterError(503, f"Model '{lm.name}' was unloaded; retry.", code="model_overloaded",
                              headers={"Retry-After": "1"}) from None
        finally:
            lm.active -= 1
            lm.slots.release()
        encoding = call.payload.get("encoding_format", "float")
        out = JSONAnswer(embedding_response(vectors, call.model, tokens, encoding), 200, {})
        out.usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return out

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        sampling = sampling_of(call.payload)
        messages = messages_of(call.payload)
        lm = await self.store.acquire(call.model, self.endpoint)
        if lm.pooling is not None:
            raise RouterError(400, f"Model '{call.model}' makes embeddings; use /v1/embeddings.", param="model",
                              code="unsupported_operation")
        if lm.waiting >= self.store.settings.hf_max_queue:
            raise RouterError(503, f"Model '{call.model}' is busy: {lm.waiting} requests are waiting. Retry shortly.",
                              code="model_overloaded", headers={"Retry-After": "1"})
        ids = await asyncio.to_thread(prompt_ids, lm, messages)
        if len(ids) >= lm.context:
            raise RouterError(400, f"The prompt is {len(ids)} tokens; model '{lm.name}' has a context of "
                              f"{lm.context}.", param="messages", code="context_length_exceeded")
        if call.stream:
            return SSEResponse(self._stream(lm, ids, sampling, call))
        cancelled = threading.Event()
        try:
            done = await self._start(lm, ids, sampling, cancelled)
            gen: Generated = await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(completion(new_id(), call.model, [choice(0, gen.text, [], gen.finish_reason)],
                                   usage_block(gen.prompt_tokens, gen.completion_tokens)),
                        media_type="application/json")

    async def _start(self, lm: LoadedModel, ids: list[int], sampling: Sampling, cancelled: threading.Event,
                     emit: Callable[[str], None] | None = None) -> Future[Generated]:
        """Wait for a slot of the model, then start generating on its thread."""
        waiting = self.store.metrics.weights_waiting.labels(lm.name)
        lm.waiting += 1
        waiting.inc()
        try:
            await lm.slots.acquire()
        finally:
            lm.waiting -= 1
            waiting.dec()
        lm.active += 1
        loop = asyncio.get_running_loop()

        def freed() -> None:
            lm.active -= 1
            lm.slots.release()

        def release(_: object) -> None:  # on the generation thread when it ends
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(freed)

        try:
            done = lm.executor.submit(generate, lm, ids, sampling, cancelled, emit)
        except RuntimeError:  # the model was unloaded meanwhile (executor shut down)
            release(None)
            raise RouterError(503, f"Model '{lm.name}' was unloaded; retry.", code="model_overloaded",
                              headers={"Retry-After": "1"}) from None
        done.add_done_callback(release)
        return done

    async def _stream(self, lm: LoadedModel, ids: list[int], sampling: Sampling,
                      call: ChatCall) -> AsyncIterator[bytes]:
        out = ChunkWriter(call.model, call.include_usage)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(piece: str) -> None:  # on the generation thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        try:
            yield out.delta({"role": "assistant", "content": "", "refusal": None})
            done = await self._start(lm, ids, sampling, cancelled, emit)
            done.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
            while (piece := await pieces.get()) is not None:
                yield out.delta({"content": piece})
            gen = done.result()
            yield out.delta({}, gen.finish_reason)
            yield out.usage(usage_block(gen.prompt_tokens, gen.completion_tokens))
            yield out.done()
        except RouterError as err:
            yield err.sse_event()
        except Exception:
            log.exception("generation failed for %s", lm.name)
            yield RouterError(500, f"Generation failed for model '{lm.name}'.", code="generation_failed").sse_event()
        finally:
            cancelled.set()
