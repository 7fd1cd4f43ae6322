"""What the router tells about itself: metrics (`metrics`), logs (`logs`), the per-request record that
feeds them (`exchange`), the request log (`requestlog`) and tracing (`tracing`)."""

from router.observability.logs import LineFormatter, console_handler, escape_controls, setup_logging, stop_logging
from router.observability.metrics import Metrics

__all__ = ["LineFormatter", "Metrics", "console_handler", "escape_controls", "setup_logging", "stop_logging"]
