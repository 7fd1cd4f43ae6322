"""Loop detection: every request a router sends upstream carries `x-llm-router-hops`, the ids of the routers
it passed through with this one's appended; a request that arrives already carrying this router's id has
come round in a loop (an agent registered at the router's own address, say) and is refused with 508.

`enter` runs at the start of a chat request and leaves the value to send in a context variable, which
`UpstreamClient.open` reads: one mechanism for every provider, with no provider's signature changed."""

from __future__ import annotations

import secrets
from contextvars import ContextVar

from starlette.types import Scope

from router.errors import RouterError

HOP_HEADER = "x-llm-router-hops"
_HOP_HEADER_RAW = HOP_HEADER.encode()
#: beyond this many routers in a chain the request is refused as a loop too (Max-Forwards' role)
MAX_HOPS = 16
#: this process's id when ROUTER_INSTANCE_ID is not set
PROCESS_ID = secrets.token_hex(6)

#: the hop header value the current request sends upstream; unset outside a chat request
outgoing: ContextVar[str | None] = ContextVar("router_hops", default=None)


def enter(scope: Scope, instance_id: str | None) -> None:
    """Refuse a request that already passed through this router (508); set the hops it sends on."""
    own = instance_id or PROCESS_ID
    received = None
    for name, value in scope["headers"]:
        if name == _HOP_HEADER_RAW:
            received = value if received is None else received + b"," + value
    if received is None:
        outgoing.set(own)
        return
    hops = [hop for hop in (part.strip() for part in received.decode("latin-1").split(",")) if hop]
    if own in hops:
        raise RouterError(508, f"This request has already passed through this router ({HOP_HEADER}: "
                          f"{', '.join(hops)}): a route loops back to it.", code="loop_detected")
    if len(hops) >= MAX_HOPS:
        raise RouterError(508, f"This request has passed through {len(hops)} routers already: a route loops.",
                          code="loop_detected")
    outgoing.set(",".join((*hops, own)))
