"""Routing: model groups served by deployments, chosen per request.

- `deployment.py`: the runtime types every part shares (`Deployment`, `ModelGroup`, `RequestFacts`, the
  `Strategy` interface);
- `table.py`: `RouteTable`, model name (or alias) -> `ModelGroup`, built from the registry snapshot and the
  agents' announcements, plus the design's prefix rules;
- `strategies.py`: the strategies behind one interface; `stats.py`: per-deployment statistics (in flight,
  decaying latency averages), shared through Redis when configured; `estimate.py`: prompt-token estimates;
- `dispatch.py`: the dispatcher that filters, picks, sends, renames, and records.
"""

from router.routing.table import PREFIX_RULES, RouteTable

__all__ = ["PREFIX_RULES", "RouteTable"]
