"""Provider classes by registry `type`, and the one factory that builds them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.providers.anthropic import AnthropicProvider
from router.providers.base import ApiProvider, Provider, WeightProvider
from router.providers.google import GoogleProvider
from router.providers.grok import GrokProvider, GroqProvider
from router.providers.llmd import LlmdProvider
from router.providers.openai import OpenAIProvider
from router.providers.openrouter import OpenRouterProvider
from router.providers.venice import VeniceProvider

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.config import Settings
    from router.upstream import UpstreamClient

__all__ = ["ApiProvider", "Provider", "WeightProvider", "build_provider", "API_PROVIDERS"]

API_PROVIDERS: dict[str, type[ApiProvider]] = {
    cls.type: cls for cls in (OpenAIProvider, AnthropicProvider, GoogleProvider, OpenRouterProvider,
                              GrokProvider, GroqProvider, VeniceProvider, LlmdProvider)
}


def build_provider(type_: str, http: UpstreamClient, endpoint: str | None, settings: Settings,
                   max_tokens_param: str | None = None, key: SecretStr | None = None) -> Provider:
    """An API provider of `type_` for `endpoint` (None: the type's configured default); `max_tokens_param`
    overrides the provider's choice (a registry entry's option); `key` (a deployment's `key_env`) is sent to
    that endpoint instead of the type's default key, which only ever goes to the default origin."""
    provider = API_PROVIDERS[type_].from_settings(http, endpoint, settings)
    if key is not None and isinstance(provider, ApiProvider):
        provider.api_key = key
        provider.key_required = True
    if max_tokens_param is not None:
        provider.max_tokens_param = max_tokens_param
    return provider
