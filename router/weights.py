"""Hugging Face weights in the router's own process: where they are
(`HF_CACHE_DIR`), fetching them (`pull`), loading each model once, keeping a
bounded set loaded (least recently used unloaded, memory released), and
running generation on a worker thread, never on the event loop.

torch and transformers are an install extra (`pip install 'llm-router[hf]'`):
nothing here imports them until a model is loaded, so the router starts and
serves API models without them.

A model name is found, in order, as: a folder `HF_CACHE_DIR/<name>` (a
`config.json`, or a `.gguf` file inside), a file `HF_CACHE_DIR/<name>` ending
in `.gguf`, or a hub cache entry `HF_CACHE_DIR/models--<org>--<name>`. A name
whose last part ends in `.gguf` (`org/repo/file.gguf`) is that one file of
the repo `org/repo`.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.util
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from router.errors import RouterError

if TYPE_CHECKING:
    from router.config import Settings
    from router.observability import Metrics

log = logging.getLogger("router.weights")
EXTRA_HINT = "pip install 'llm-router[hf]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra() -> str | None:
    """What is missing for in-process weights, or None when torch and transformers are installed."""
    missing = [m for m in ("torch", "transformers") if not _installed(m)]
    return " and ".join(missing) if missing else None


# -- finding and fetching weights --------------------------------------------------


@dataclass(frozen=True, slots=True)
class WeightsRef:
    folder: Path
    gguf_file: str | None = None  # a GGUF file inside `folder`, loaded with transformers' gguf_file


def split_gguf(name: str) -> tuple[str, str | None]:
    """`org/repo/file.gguf` -> ("org/repo", "file.gguf"); any other name -> (name, None)."""
    head, _, last = name.rpartition("/")
    if last.endswith(".gguf") and head:
        return head, last
    return name, None


def _in_folder(folder: Path, gguf: str | None) -> WeightsRef | None:
    if gguf is not None:
        return WeightsRef(folder, gguf) if (folder / gguf).is_file() else None
    if (folder / "config.json").is_file():
        return WeightsRef(folder)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return WeightsRef(folder, ggufs[0]) if ggufs else None


def locate_folder(name: str, cache_dir: str | Path) -> WeightsRef | None:
    """Weights for `name` as a plain folder (or GGUF file) under the cache, or None."""
    plain = Path(cache_dir).expanduser() / name
    if plain.is_file() and plain.suffix == ".gguf":
        return WeightsRef(plain.parent, plain.name)
    if plain.is_dir():
        return _in_folder(plain, None)
    return None


def locate_snapshot(name: str, cache_dir: str | Path) -> WeightsRef | None:
    """Weights for `name` in the hub cache layout (`models--org--name/snapshots/...`), or None.

    A snapshot may be incomplete (an interrupted download): use it as is only
    offline; otherwise `pull` completes it."""
    repo, gguf = split_gguf(name)
    hub = Path(cache_dir).expanduser() / ("models--" + repo.replace("/", "--"))
    snapshots = hub / "snapshots"
    if not snapshots.is_dir():
        return None
    main = hub / "refs" / "main"
    candidates = [snapshots / main.read_text().strip()] if main.is_file() else []
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if snapshot.is_dir() and (ref := _in_folder(snapshot, gguf)) is not None:
            return ref
    return None


def pull(name: str, cache_dir: str | Path, token: str | None = None, endpoint: str | None = None,
         tqdm_class: Any = None) -> WeightsRef:
    """Download `name` from the hub into the cache (what is there already is kept); return it."""
    from huggingface_hub import snapshot_download

    repo, gguf = split_gguf(name)
    kwargs: dict[str, Any] = {"repo_id": repo, "cache_dir": str(Path(cache_dir).expanduser()), "token": token}
    if endpoint and "huggingface.co" not in endpoint:
        kwargs["endpoint"] = endpoint  # a mirror
    if gguf is not None:
        kwargs["allow_patterns"] = [gguf, "*.json"]
    else:  # one copy of the weights is enough: safetensors when the repo has them
        kwargs["ignore_patterns"] = ["*.pth", "*.pt", "*.msgpack", "*.h5", "original/*", "*.gguf"]
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    folder = Path(snapshot_download(**kwargs))
    ref = _in_folder(folder, gguf)
    if ref is None:
        raise FileNotFoundError(f"{name}: the download has no config.json or .gguf file")
    return ref


def _logging_tqdm() -> Any:
    """A tqdm that reports download progress to the log (every 10%) instead of a terminal."""
    from tqdm.auto import tqdm

    class LogProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._label = str(kwargs.get("desc") or "")
            self._size = float(kwargs.get("total") or 0)
            self._seen = 0.0
            self._tenth = -1
            kwargs["disable"] = True  # no terminal bar; a disabled tqdm keeps few attributes, hence ours above
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._seen += n or 0
            total = getattr(self, "total", None) or self._size
            if total:
                tenth = min(10, int(10 * self._seen / total))
                if tenth != self._tenth:
                    self._tenth = tenth
                    log.info("download %s: %d%% of %s", self._label, 10 * tenth,
                             f"{total / 1e6:.1f} MB" if total > 1000 else f"{total:.0f} files")
            return None

    return LogProgress


# -- loaded models -------------------------------------------------------------------


def pick_device(wanted: str) -> str:
    import torch

    if wanted != "auto":
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    device: str
    load_seconds: float
    context: int
    slots: asyncio.Semaphore
    executor: ThreadPoolExecutor
    waiting: int = 0
    active: int = 0
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    #: an embedding model (a sentence-transformers folder): how its token vectors pool into one ("mean", "cls",
    #: "max"), and whether that is L2-normalised; None: a generative model
    pooling: str | None = None
    normalize: bool = False


class WeightStore:
    """The models loaded in this process; at most `HF_MAX_LOADED_MODELS` of them."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, name: str, endpoint: str | None) -> LoadedModel:
        """The loaded model (loading it first if needed; concurrent callers share one load)."""
        lm = self.loaded.get(name)
        if lm is not None:
            self.loaded.move_to_end(name)
            return lm
        missing = missing_extra()
        if missing is not None:
            raise RouterError(501, f"Model '{name}' runs on Hugging Face weights in the router, which needs "
                              f"{missing}: install the extra with `{EXTRA_HINT}` and restart the router.",
                              code="provider_unavailable")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            lm = self.loaded.get(name)
            if lm is not None:
                return lm
            while len(self.loaded) >= self.settings.hf_max_loaded_models:
                self._unload(self._victim())
            try:
                lm = await asyncio.to_thread(self._load, name, endpoint)
            except FileNotFoundError as exc:
                raise RouterError(404, f"No weights for model '{name}': {exc}", param="model",
                                  code="model_not_found") from None
            except (OSError, ValueError, RuntimeError, ImportError) as exc:
                log.exception("loading %s failed", name)
                raise RouterError(500, f"Loading model '{name}' failed: {exc.__class__.__name__}: {exc}",
                                  code="model_load_failed") from None
            self.loaded[name] = lm
            self.metrics.weights_loaded.labels(name).set(1)
            self.metrics.weights_load_seconds.labels(name).observe(lm.load_seconds)
            return lm

    def _victim(self) -> str:
        """The least recently used idle model, else the least recently used one."""
        for name, lm in self.loaded.items():
            if lm.active == 0 and lm.waiting == 0:
                return name
        return next(iter(self.loaded))

    def _unload(self, name: str) -> None:
        lm = self.loaded.pop(name)
        lm.executor.shutdown(wait=False)  # running generations finish; their threads hold the model until then
        device = lm.device
        del lm
        gc.collect()
        release_memory(device)
        self.metrics.weights_loaded.labels(name).set(0)
        log.info("unloaded %s (least recently used; HF_MAX_LOADED_MODELS=%d)", name,
                 self.settings.hf_max_loaded_models)

    def close(self) -> None:
        for name in list(self.loaded):
            self._unload(name)

    def _load(self, name: str, endpoint: str | None) -> LoadedModel:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress goes to our log lines, not bars on stderr
        s = self.settings
        started = time.perf_counter()
        ref = locate_folder(name, s.hf_cache_dir)
        if ref is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            ref = locate_snapshot(name, s.hf_cache_dir)
            if ref is None:
                raise FileNotFoundError(f"not in HF_CACHE_DIR={s.hf_cache_dir} and HF_HUB_OFFLINE is set")
        if ref is None:  # the hub: fetches what the cache lacks (resuming a partial download), else uses it
            log.info("%s: fetching from the hub into %s (what is cached is kept)", name, s.hf_cache_dir)
            token = s.hugging_face_hub_token.get_secret_value() if s.hugging_face_hub_token else None
            try:
                ref = pull(name, s.hf_cache_dir, token, endpoint, _logging_tqdm())
            except Exception as exc:  # hub errors have many types; all mean "not available"
                raise FileNotFoundError(f"not in HF_CACHE_DIR={s.hf_cache_dir} and the download failed: "
                                        f"{exc.__class__.__name__}") from exc
        device = pick_device(s.hf_device)
        dtype: Any = torch.float32 if device == "cpu" and s.hf_dtype == "auto" else s.hf_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        extra = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
        log.info("loading %s from %s%s on %s", name, ref.folder, f" ({ref.gguf_file})" if ref.gguf_file else "",
                 device)
        tokenizer = AutoTokenizer.from_pretrained(ref.folder, **extra)
        pooling, normalize = sentence_transformer(ref.folder)
        if pooling is not None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(ref.folder, dtype=dtype)
            cast(Any, model).to(device)
            model.eval()
            seconds = time.perf_counter() - started
            context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 512
            log.info("loaded %s in %.1fs (%s, %s, embeddings: %s pooling%s)", name, seconds, device, model.dtype,
                     pooling, ", normalised" if normalize else "")
            concurrency = s.hf_max_concurrency
            return LoadedModel(name, model, tokenizer, device, seconds, context, asyncio.Semaphore(concurrency),
                               ThreadPoolExecutor(concurrency, thread_name_prefix=f"hf-{name}"), pooling=pooling,
                               normalize=normalize)
        model = AutoModelForCausalLM.from_pretrained(ref.folder, dtype=dtype, **extra)
        cast(Any, model).to(device)  # transformers types `to` through a decorator mypy cannot follow
        model.eval()
        seconds = time.perf_counter() - started
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 4096
        eos = model.generation_config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids |= {tokenizer.eos_token_id}
        log.info("loaded %s in %.1fs (%s, %s, context %d)", name, seconds, device, model.dtype, context)
        concurrency = s.hf_max_concurrency
        return LoadedModel(name, model, tokenizer, device, seconds, context, asyncio.Semaphore(concurrency),
                           ThreadPoolExecutor(concurrency, thread_name_prefix=f"hf-{name}"), eos_ids=eos_ids)


def sentence_transformer(folder: Path) -> tuple[str | None, bool]:
    """(pooling, normalise) of a sentence-transformers folder (its `modules.json` names a Pooling module, whose
    config says the mode, and maybe a Normalize module); (None, False) for any other model."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None, False
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pooling = kinds.get("Pooling")
    if pooling is None:
        return None, False
    try:
        config = json.loads((folder / str(pooling.get("path", "")) / "config.json").read_text())
    except (OSError, ValueError):
        config = {"pooling_mode_mean_tokens": True}
    mode = ("cls" if config.get("pooling_mode_cls_token") else "max" if config.get("pooling_mode_max_tokens")
            else "mean")
    return mode, "Normalize" in kinds


def embed(lm: LoadedModel, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
    """Vectors of `inputs` (texts, or token-id lists) and the tokens they took; on the model's thread."""
    import torch

    tokenizer = lm.tokenizer
    if inputs and isinstance(inputs[0], str):
        batch = tokenizer(inputs, padding=True, truncation=True, max_length=lm.context, return_tensors="pt")
    else:
        batch = tokenizer.pad({"input_ids": [ids[:lm.context] for ids in inputs]}, return_tensors="pt")
    batch = {k: v.to(lm.device) for k, v in batch.items()}
    mask = batch["attention_mask"]
    with torch.inference_mode():
        hidden = lm.model(**batch).last_hidden_state
        if lm.pooling == "cls":
            pooled = hidden[:, 0]
        elif lm.pooling == "max":
            pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if lm.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.float().cpu().tolist(), int(mask.sum().item())


def release_memory(device: str) -> None:
    """Hand freed memory back: the CUDA cache, or glibc's heap on Linux."""
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- generation (runs on the model's worker thread) ------------------------------------


@dataclass(slots=True)
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None


@dataclass(slots=True)
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextEmitter:
    """Turns generated token ids into text pieces as they come.

    Decodes the whole continuation each time and emits the new suffix, so
    characters split across tokens come out whole; holds back any tail that
    could still become a stop sequence, and cuts the text at a stop sequence
    (which is not emitted, as OpenAI does)."""

    def __init__(self, tokenizer: Any, stop: list[str], emit: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emit = emit
        self.ids: list[int] = []
        self.text = ""  # decoded so far (after the stop cut)
        self.sent = 0  # characters of `text` emitted
        self.stopped = False

    def add(self, ids: list[int]) -> None:
        if self.stopped:
            return
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a character is still incomplete
        hold = 0
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                text, self.stopped = text[:at], True
        if not self.stopped:
            for s in self.stop:  # the longest tail that is the start of a stop sequence waits
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        self.text = text
        self._flush(len(text) - hold)

    def finish(self) -> None:
        """Generation ended: what was held back goes out (an incomplete character as U+FFFD)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self._flush(len(self.text))

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent:upto])
            self.sent = upto


def generate(lm: LoadedModel, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event,
             emit: Callable[[str], None] | None = None) -> Generated:
    """One completion, on the calling (worker) thread; `emit` gets text pieces as they are made."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    text = TextEmitter(lm.tokenizer, sampling.stop, emit)
    room = lm.context - len(prompt_ids)  # >= 1: the provider refuses longer prompts
    max_new = min(sampling.max_tokens or room, room)

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            text.add(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = text.stopped or cancelled.is_set()
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new,
                               "pad_token_id": lm.tokenizer.pad_token_id or next(iter(lm.eos_ids), None)}
    if sample:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    inputs = torch.tensor([prompt_ids], device=lm.device)
    with torch.inference_mode():
        out = lm.model.generate(inputs, attention_mask=torch.ones_like(inputs), streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([Stop()]), **options)
    new_ids = out[0, len(prompt_ids):].tolist()
    text.finish()
    if text.stopped or (new_ids and new_ids[-1] in lm.eos_ids):
        finish = "stop"
    else:
        finish = "length" if len(new_ids) >= max_new else "stop"
    return Generated(text.text, finish, len(prompt_ids), len(new_ids))
