"""Validation against OpenAI's official OpenAPI spec (tests/fixtures/openai-openapi.yaml; source in its README).

OpenAPI's `nullable: true` becomes "or null", as the fixtures' README says.
"""

from __future__ import annotations

import copy
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "openai-openapi.yaml"
BASE = "urn:openai-spec"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False) is True:
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _registry() -> Registry:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SPEC_PATH, encoding="utf-8") as fh:
        spec = yaml.load(fh, Loader=loader)
    spec = _nullable(spec)
    return Registry().with_resource(BASE, Resource.from_contents(spec, default_specification=DRAFT202012))


@cache
def validator(schema_name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{BASE}#/components/schemas/{schema_name}"}, registry=_registry())


def errors(schema_name: str, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(schema_name).iter_errors(copy.deepcopy(instance))]


def assert_valid(schema_name: str, instance: Any) -> None:
    found = errors(schema_name, instance)
    assert not found, f"{schema_name} violations: {found[:5]}"
