"""The runtime types of routing, shared by the route table, the strategies, the statistics and the
dispatcher.

A *model group* is a public model name; it is served by one or more *deployments*, each a place that can
answer it (a provider type at an endpoint, the name that provider knows the model by, prices, a context
window, limits). A strategy chooses one deployment per request from the candidates the dispatcher leaves
after filtering (enabled, healthy, allowed, within limits, context fits).

Nothing here does I/O; `Deployment` objects are built once per registry snapshot (`RouteTable.rebuild`)
and keep their `DeploymentStats` across rebuilds (the stats are looked up by `Deployment.id`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router.model_rename import ModelRename
    from router.providers.base import Provider
    from router.routing.stats import DeploymentStats

#: provider types whose deployments count as local for `ROUTER_COST_THRESHOLD` (the request goes to one of
#: them when the chosen deployment's expected cost is above the threshold)
LOCAL_TYPES = frozenset({"local", "huggingface", "llm-d"})

DEFAULT_STRATEGY = "cost-latency"


@dataclass(slots=True, eq=False)
class Deployment:
    """One place that serves a model group."""

    id: str  # stable label: unique within its group, safe in headers and metric labels (never a key or URL
    #          credentials); `x-router-deployment` carries it
    group: str  # the public model name
    type: str  # provider type (registry `type`)
    provider: Provider
    upstream_model: str  # what the provider calls the model (the group name unless renamed)
    rename: ModelRename | None  # set when upstream_model != group: request and answers are rewritten
    stats: DeploymentStats
    input_price: float | None = None  # USD per million input tokens; None: unknown (never treated as free)
    output_price: float | None = None  # USD per million output tokens; None: unknown
    context_window: int | None = None  # tokens (prompt + output); None: unknown (never filters)
    weight: float = 1.0  # for the `weighted` strategy
    rpm: int | None = None  # this deployment's own limits (None: none)
    tpm: int | None = None
    timeout: float | None = None  # seconds for the whole exchange; None: UPSTREAM_TIMEOUT
    enabled: bool = True
    local: bool = False  # a local deployment (LOCAL_TYPES): the cost threshold's destination
    #: requests it serves at once before queueing them (a local server's batch); inf: unlimited (a hosted
    #: API); the registry's `max_parallel`, else 1 for local types and inf for hosted ones
    max_parallel: float = math.inf
    first_token_timeout: float | None = None  # seconds to a stream's first content (None: the setting's)
    #: the upstream client's timeouts for one request (aiohttp.ClientTimeout: total, connect, and for streams
    #: the idle time between chunks), built once with the table; None: the client's defaults
    request_timeout: object = None
    stream_timeout: object = None
    #: False while it may not take traffic (an agent whose heartbeats lapsed); None: always healthy
    live: Callable[[], bool] | None = field(default=None, repr=False)

    def healthy(self) -> bool:
        return self.live is None or self.live()

    def expected_cost(self, prompt_tokens: int, output_tokens: int) -> float | None:
        """USD for a request of this size; None when a price is unknown."""
        if self.input_price is None or self.output_price is None:
            return None
        return (prompt_tokens * self.input_price + output_tokens * self.output_price) / 1_000_000


@dataclass(slots=True, eq=False)
class ModelGroup:
    """A public model name and the deployments that serve it."""

    name: str
    deployments: list[Deployment]
    strategy: Strategy
    rpm: int | None = None  # the group's own limits, across all clients (the rate limiter's model limits)
    tpm: int | None = None
    fallbacks: tuple[str, ...] = ()  # groups tried in order once its own deployments are exhausted
    content_policy_fallbacks: bool = False  # a content-policy refusal goes to the fallbacks too


@dataclass(slots=True)
class RequestFacts:
    """What strategies and filters know about one request, computed once by the dispatcher."""

    prompt_tokens: int  # estimated (router.routing.estimate)
    output_tokens: int  # max_tokens / max_completion_tokens, else an expected default
    stream: bool
    #: OpenRouter's `provider.sort` for this request ("price", "latency", "throughput"), overriding the
    #: group's strategy; None: the group's
    sort: str | None = None


class Strategy(Protocol):
    """Chooses one deployment among `candidates` (never empty; all enabled, healthy and fitting)."""

    name: str

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment: ...
