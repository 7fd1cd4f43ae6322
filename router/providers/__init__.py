"""Provider classes by registry `type`, and the one factory that builds them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.providers.base import ApiProvider, Provider, UnimplementedProvider, WeightProvider, same_origin
from router.providers.openai import OpenAIProvider

if TYPE_CHECKING:
    from router.config import Settings
    from router.upstream import UpstreamClient

__all__ = ["ApiProvider", "Provider", "WeightProvider", "build_provider"]


def build_provider(type_: str, http: UpstreamClient, endpoint: str | None, settings: Settings) -> Provider:
    """A provider of `type_` for `endpoint` (None: the type's configured default)."""
    if type_ == "openai":
        default = settings.openai_base_url
        base = endpoint or default
        official = same_origin(base, default)
        return OpenAIProvider(http, base, settings.external_openai_key if official else None,
                              key_required=official)
    return UnimplementedProvider(type_)
