"""What ``watchdog-kv serve`` asks for, and the servers that makes.

:class:`ServeOptions` are the command's options. :func:`plan` turns them into
one :class:`~watchdog_kv.supervisor.servers.ServerSpec` per server, before
anything starts: N prefill and M decode servers (``prefill-0``..,
``decode-0``..), or one plain data-parallel server (``dp-0``). Ports the
operator fixed are checked free (a taken one is a
:class:`~watchdog_kv.supervisor.ports.PortInUseError` naming it); every other
port is chosen free. Each server's OpenMP threads get their own core, round
robin over the cores this process may use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from watchdog_kv.config import Settings
from watchdog_kv.supervisor import ports
from watchdog_kv.supervisor.servers import ServerSpec

__all__ = ["ServeOptions", "plan"]


@dataclass(frozen=True)
class ServeOptions:
    model: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    prefill_port: int | None = None
    decode_port: int | None = None
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 20.0
    max_model_len: int = 512
    vllm_args: tuple[str, ...] = ()
    kv_lease_s: float | None = None
    run_dir: Path | None = None
    data_parallel_size: int = 1  # > 1: one plain data-parallel server, no hand-off
    prefills: int = 1  # prefill servers (0: decodes compute every prompt themselves)
    decodes: int = 1
    backend: str = "local"  # "local" child processes, or "ray" actors on a cluster
    ray_address: str | None = None
    placement_timeout_s: float = 60.0


def plan(opts: ServeOptions, settings: Settings) -> list[ServerSpec]:
    """Check ports and build the server specs; raises before anything starts."""
    taken = {opts.port}
    cores = sorted(os.sched_getaffinity(0))
    if opts.data_parallel_size > 1:
        return [_plan_data_parallel(opts, settings, taken, cores)]
    wanted = [
        ("prefill", i, opts.prefill_port if i == 0 else None) for i in range(opts.prefills)
    ] + [("decode", i, opts.decode_port if i == 0 else None) for i in range(opts.decodes)]
    specs: list[ServerSpec] = []
    for index, (role, i, fixed) in enumerate(wanted):
        name = f"{role}-{i}"
        port = _http_port(opts.host, fixed, name, taken)
        side = ports.free_port(opts.host, taken)
        specs.append(
            ServerSpec(
                name=name,
                role=role,
                model=opts.model,
                served_model_name=opts.served_model_name,
                host=opts.host,
                port=port,
                side_channel_port=side,
                max_model_len=opts.max_model_len,
                extra_args=opts.vllm_args,
                cpu_bind=str(cores[index % len(cores)]),
                kv_lease_s=opts.kv_lease_s,
                otel=settings.otel,
                vllm_traces=settings.vllm_traces,
                plugin_enabled=settings.enabled,
            )
        )
    return specs


def _http_port(host: str, fixed: int | None, name: str, taken: set[int]) -> int:
    """The operator's port for server ``name`` (checked free), else a free one."""
    if fixed is None:
        return ports.free_port(host, taken)
    ports.check_free(host, fixed, f"{name} HTTP")
    taken.add(fixed)
    return fixed


def _plan_data_parallel(
    opts: ServeOptions, settings: Settings, taken: set[int], cores: list[int]
) -> ServerSpec:
    """One vLLM server with --data-parallel-size N behind one API server."""
    size = opts.data_parallel_size
    port = _http_port(opts.host, opts.decode_port, "dp-0", taken)
    return ServerSpec(
        name="dp-0",
        role="plain",
        model=opts.model,
        served_model_name=opts.served_model_name,
        host=opts.host,
        port=port,
        side_channel_port=ports.free_port(opts.host, taken),
        max_model_len=opts.max_model_len,
        extra_args=(
            "--data-parallel-size",
            str(size),
            "--data-parallel-rpc-port",
            str(ports.free_port(opts.host, taken)),
            *opts.vllm_args,
        ),
        # one core per rank's OpenMP threads ("|" separates ranks)
        cpu_bind="|".join(str(cores[i % len(cores)]) for i in range(size)),
        kv_lease_s=None,
        otel=settings.otel,
        vllm_traces=settings.vllm_traces,
        plugin_enabled=settings.enabled,
    )
