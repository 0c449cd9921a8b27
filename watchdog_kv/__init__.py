"""watchdog_kv: fault tolerance and hang detection for vLLM V1.

Installed with pip, the package registers itself in every vLLM process through
the ``vllm.general_plugins`` entry point. ``import watchdog_kv`` arms the same
registration explicitly; it runs in this process as soon as ``vllm`` is
imported (at once if it already is), and never in a process that does not use
vLLM. Configuration is by ``WATCHDOG_KV_*`` environment variables
(docs/configuration.md).
"""

from __future__ import annotations

import wrapt

from watchdog_kv.config import ConfigError, Settings
from watchdog_kv.plugin import Registration, current, register, unregister

__all__ = ["ConfigError", "Registration", "Settings", "current", "register", "unregister"]


def _on_vllm_import(_module: object) -> None:
    register()


wrapt.register_post_import_hook(_on_vllm_import, "vllm")
