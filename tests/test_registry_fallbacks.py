"""The registry's fallback graph as pure logic: names checked (existing, not the group itself, once, no
loop), the chain a request may follow, and who names a group (what blocks its removal)."""

from __future__ import annotations

import pytest

from router.registry import (RegistryError, fallback_chain, fallback_referrers, validate_fallback_graph,
                             validate_fallbacks)

ALIASES = {"claude": "sonnet", "local": "llama"}


def test_valid_graph_and_the_chain_the_dispatcher_follows() -> None:
    graph = {"gpt-4o": ("claude", "llama"), "sonnet": ("local", "mini"), "llama": (), "mini": ()}
    validate_fallback_graph(graph, ALIASES)
    # breadth first, each group once (llama reached through gpt-4o before sonnet's alias for it)
    assert fallback_chain("gpt-4o", graph, ALIASES) == ["gpt-4o", "sonnet", "llama", "mini"]
    assert fallback_chain("llama", graph, ALIASES) == ["llama"]
    assert fallback_referrers(["llama", "local"], graph) == ["gpt-4o", "sonnet"]
    assert fallback_referrers(["mini"], graph, exclude="sonnet") == []


@pytest.mark.parametrize("graph, fragment", [
    ({"a": ("ghost",)}, "fallback 'ghost' of model 'a' is not a model or alias"),
    ({"a": ("a",)}, "model 'a' cannot fall back to itself"),
    ({"sonnet": ("claude",)}, "model 'sonnet' cannot fall back to itself (alias 'claude')"),
    ({"a": ("llama", "llama"), "llama": ()}, "model 'a' names fallback 'llama' twice"),
    ({"a": ("llama", "local"), "llama": ()}, "names fallback 'llama' twice ('llama' and 'local')"),
    ({"a": ("b",), "b": ("a",)}, "fallbacks would loop: a -> b -> a"),
    ({"a": ("b",), "b": ("c",), "c": ("local",), "llama": ("b",)}, "fallbacks would loop: b -> c -> llama -> b"),
])
def test_bad_graphs_are_refused_naming_the_problem(graph: dict[str, tuple[str, ...]], fragment: str) -> None:
    with pytest.raises(RegistryError) as info:
        validate_fallback_graph(graph, ALIASES)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_diamond_is_not_a_loop() -> None:
    graph = {"a": ("b", "c"), "b": ("d",), "c": ("d",), "d": ()}
    validate_fallback_graph(graph, {})
    assert fallback_chain("a", graph, {}) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("value", ["a", [1], [""], {"a": 1}])
def test_fallbacks_must_be_a_list_of_names(value: object) -> None:
    with pytest.raises(RegistryError):
        validate_fallbacks(value)
    assert validate_fallbacks(None) == () and validate_fallbacks([" a ", "b"]) == ("a", "b")
