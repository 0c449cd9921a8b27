"""The router: an OpenAI-compatible front door doing the prefill -> decode hand-off."""

from watchdog_kv.router.app import Backends, RouterServer, build_app
from watchdog_kv.router.handoff import Backend, HandoffError

__all__ = ["Backend", "Backends", "HandoffError", "RouterServer", "build_app"]
