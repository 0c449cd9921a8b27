"""Telemetry: structured logs (and, as they land, traces and metrics)."""

from watchdog_kv.telemetry.logs import bind_process, configure, get_logger, process_fields

__all__ = ["bind_process", "configure", "get_logger", "process_fields"]
