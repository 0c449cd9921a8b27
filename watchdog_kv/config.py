"""Configuration: every ``WATCHDOG_KV_*`` environment variable, parsed once.

All settings live in :data:`VARIABLES`, one :class:`Variable` per name, with its
parser, default, unit and the sentence the docs print for it. :func:`load`
turns an environment mapping into one frozen :class:`Settings` object.

Two mistakes stop start-up with :class:`ConfigError`, whose message names the
variable and what it accepts:

* a value the parser rejects (``WATCHDOG_KV_ENABLED=maybe``);
* a ``WATCHDOG_KV_*`` name that is not in the table (a typo such as
  ``WATCHDOG_KV_ENABLD``), so a misspelt setting is never silently ignored.

``docs/configuration.md`` lists the same table; a test keeps the two in step.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog_kv.faults import FaultPlan, parse_faults

__all__ = [
    "OTEL_PROTOCOLS",
    "PREFIX",
    "VARIABLES",
    "ConfigError",
    "OtelSettings",
    "Settings",
    "Variable",
    "default_state_dir",
    "load",
    "load_otel",
    "markdown_table",
    "positive_seconds",
]

PREFIX = "WATCHDOG_KV_"


class ConfigError(ValueError):
    """A ``WATCHDOG_KV_*`` variable is unknown or has a value that is not accepted."""


# --- parsers: each takes the raw string and returns the typed value, or raises
# ValueError with a sentence saying what is accepted.

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def positive_seconds(raw: str) -> float:
    """Parse a duration greater than 0; ValueError says what is accepted."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number of seconds greater than 0, such as 30 or 2.5") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a number of seconds greater than 0, such as 30 or 2.5")
    return value


def _positive_number(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number greater than 0") from None
    if not 0 < value < float("inf"):
        raise ValueError("expected a number greater than 0")
    return value


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number such as 0 or 1234") from None


def _non_negative_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number, 0 or more") from None
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _faults(raw: str) -> FaultPlan:
    return parse_faults(raw)


def _path(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError("expected a directory path, not an empty string")
    return Path(value).expanduser()


def _name(raw: str) -> str:
    value = raw.strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError("expected a non-empty name of letters, digits, '-', '_' or '.'")
    return value


def default_state_dir() -> Path:
    """``$XDG_RUNTIME_DIR/watchdog_kv-<uid>``, else the same under the temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"watchdog_kv-{os.getuid()}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "watchdog_kv"


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, how it parses, its default and its doc line."""

    name: str
    attr: str
    parse: Callable[[str], Any]
    default: Callable[[], Any]
    default_doc: str
    accepted: str
    doc: str
    unit: str = ""


VARIABLES: tuple[Variable, ...] = (
    Variable(
        name="WATCHDOG_KV_ENABLED",
        attr="enabled",
        parse=_parse_bool,
        default=lambda: True,
        default_doc="1",
        accepted="1, 0, true, false, yes, no, on, off",
        doc="Master switch. With 0 the plugin installs no hook, writes no status "
        "record and costs nothing beyond one log line.",
    ),
    Variable(
        name="WATCHDOG_KV_LOG_LEVEL",
        attr="log_level",
        parse=_choice("debug", "info", "warning", "error"),
        default=lambda: "info",
        default_doc="info",
        accepted="debug, info, warning, error",
        doc="Lowest level of watchdog_kv's own log events (vLLM's logging is untouched).",
    ),
    Variable(
        name="WATCHDOG_KV_LOG_FORMAT",
        attr="log_format",
        parse=_choice("auto", "json", "console"),
        default=lambda: "auto",
        default_doc="auto",
        accepted="auto, json, console",
        doc="Log rendering: one JSON object per line, or coloured key=value for "
        "people. auto picks console on a terminal and JSON otherwise.",
    ),
    Variable(
        name="WATCHDOG_KV_STATE_DIR",
        attr="state_dir",
        parse=_path,
        default=default_state_dir,
        default_doc="$XDG_RUNTIME_DIR/watchdog_kv-<uid> (or the temp dir)",
        accepted="a directory path",
        doc="Where each watched process writes its status record "
        "(procs/<pid>.json). The supervisor sets one per run.",
    ),
    Variable(
        name="WATCHDOG_KV_CACHE_DIR",
        attr="cache_dir",
        parse=_path,
        default=_default_cache_dir,
        default_doc="$XDG_CACHE_HOME/watchdog_kv (or ~/.cache/watchdog_kv)",
        accepted="a directory path",
        doc="Where the embedded tiny model is built once and reused.",
    ),
    Variable(
        name="WATCHDOG_KV_SERVER",
        attr="server",
        parse=_name,
        default=lambda: None,
        default_doc="unset",
        accepted="a name of letters, digits, '-', '_' or '.'",
        doc="Name of the vLLM server a process belongs to (prefill-0, decode-0, ...). "
        "Set by the supervisor on the servers it starts; recorded in status records.",
    ),
    Variable(
        name="WATCHDOG_KV_PREFILL_TIMEOUT",
        attr="prefill_timeout_s",
        parse=positive_seconds,
        default=lambda: 120.0,
        default_doc="120",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Router: longest wait for a prefill server's answer before the client "
        "gets a 504 naming the prefill server.",
    ),
    Variable(
        name="WATCHDOG_KV_DECODE_IDLE_TIMEOUT",
        attr="decode_idle_timeout_s",
        parse=positive_seconds,
        default=lambda: 120.0,
        default_doc="120",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Router: longest silence from a decode server (before its first token or "
        "between tokens -- the router streams every answer it can continue from the "
        "decode, whether the client streams or not) before the decode counts as failed: "
        "the answer is continued on another decode, or ended with a clear error. A "
        "non-streamed answer that cannot be continued is bounded by "
        "WATCHDOG_KV_REQUEST_BUDGET instead.",
    ),
    Variable(
        name="WATCHDOG_KV_REQUEST_BUDGET",
        attr="request_budget_s",
        parse=positive_seconds,
        default=lambda: 300.0,
        default_doc="300",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Router: how long one request may spend on the recovery ladder (another "
        "prefill, computing on the decode, another decode, waiting for a restarted one, "
        "continuing a stream). Once spent, the client gets the last error.",
    ),
    Variable(
        name="WATCHDOG_KV_DRAIN_TIMEOUT",
        attr="drain_timeout_s",
        parse=positive_seconds,
        default=lambda: 30.0,
        default_doc="30",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Supervisor, on SIGTERM or SIGINT: new requests get 503 at once and those in "
        "flight have this long to finish before the servers are stopped.",
    ),
    Variable(
        name="WATCHDOG_KV_KV_RECOVERY",
        attr="kv_recovery",
        parse=_choice("recompute", "fail"),
        default=lambda: "recompute",
        default_doc="recompute",
        accepted="recompute, fail",
        doc="Decode side, when a KV load misses its deadline, breaks or reads stale "
        "blocks: recompute the prompt locally through vLLM's own recovery (same "
        "output, more compute), or fail the request at once with a clear error.",
    ),
    Variable(
        name="WATCHDOG_KV_KV_DEADLINE_FLOOR",
        attr="kv_deadline_floor_s",
        parse=positive_seconds,
        default=lambda: 5.0,
        default_doc="5",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Shortest deadline of any KV-load phase (handshake, first progress, "
        "transfer, lease check): a small stuck load is caught after this long.",
    ),
    Variable(
        name="WATCHDOG_KV_KV_DEADLINE_CAP",
        attr="kv_deadline_cap_s",
        parse=positive_seconds,
        default=lambda: 120.0,
        default_doc="120",
        accepted="a number of seconds greater than 0 and not below the floor",
        unit="s",
        doc="Longest deadline of any KV-load phase, however big the transfer.",
    ),
    Variable(
        name="WATCHDOG_KV_KV_ASSUMED_BANDWIDTH",
        attr="kv_assumed_bandwidth_mbps",
        parse=_positive_number,
        default=lambda: 100.0,
        default_doc="100",
        accepted="a number greater than 0",
        unit="MB/s",
        doc="Bandwidth a transfer deadline assumes until transfers have been measured "
        "in this process; after that, the slowest recent measured bandwidth is used.",
    ),
    Variable(
        name="WATCHDOG_KV_KV_LEASE_CHECK",
        attr="kv_lease_check",
        parse=_parse_bool,
        default=lambda: True,
        default_doc="1",
        accepted="1, 0, true, false, yes, no, on, off",
        doc="Decode side: before KV read from a prefill is used, ask that prefill's "
        "watchdog whether it kept the blocks through the read; if not (or no "
        "answer in time) the prompt is recomputed. Needs watchdog_kv on the prefill.",
    ),
    Variable(
        name="WATCHDOG_KV_NIXL_PROGRESS_DELAY_US",
        attr="nixl_progress_delay_us",
        parse=_non_negative_int,
        default=lambda: 1000,
        default_doc="1000",
        accepted="a whole number of microseconds, 0 or more",
        unit="µs",
        doc="Poll timeout given to NIXL's UCX progress thread. NIXL 1.5's Python API "
        "sets 0, which makes that thread spin a full core per vLLM worker even when "
        "idle; the thread still wakes on UCX events. 0 leaves NIXL as it is.",
    ),
    Variable(
        name="WATCHDOG_KV_STEP_FLOOR",
        attr="step_floor_s",
        parse=positive_seconds,
        default=lambda: 10.0,
        default_doc="10",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Shortest deadline of one engine or worker model step: a step that never "
        "returns is caught after this long once steps are fast. (5 s flagged real "
        "5-6.5 s steps on a 2-core machine running three vLLM servers.)",
    ),
    Variable(
        name="WATCHDOG_KV_STEP_CAP",
        attr="step_cap_s",
        parse=positive_seconds,
        default=lambda: 300.0,
        default_doc="300",
        accepted="a number of seconds greater than 0 and not below the floor",
        unit="s",
        doc="Longest deadline of one model step, however slow recent steps were "
        "(vLLM's own execute-model timeout is 300 s).",
    ),
    Variable(
        name="WATCHDOG_KV_STEP_SLACK",
        attr="step_slack",
        parse=_positive_number,
        default=lambda: 4.0,
        default_doc="4",
        accepted="a number, 1 or more",
        doc="A step, startup or connector-call deadline is this many times the longest "
        "recent one of its kind (then held between its floor and cap).",
    ),
    Variable(
        name="WATCHDOG_KV_CONNECTOR_FLOOR",
        attr="connector_floor_s",
        parse=positive_seconds,
        default=lambda: 10.0,
        default_doc="10",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Shortest deadline of one KV-connector call inside a worker step "
        "(start_load_kv, get_transfer_results, wait_for_save...).",
    ),
    Variable(
        name="WATCHDOG_KV_CONNECTOR_CAP",
        attr="connector_cap_s",
        parse=positive_seconds,
        default=lambda: 120.0,
        default_doc="120",
        accepted="a number of seconds greater than 0 and not below the floor",
        unit="s",
        doc="Longest deadline of one KV-connector call.",
    ),
    Variable(
        name="WATCHDOG_KV_STARTUP_FLOOR",
        attr="startup_floor_s",
        parse=positive_seconds,
        default=lambda: 60.0,
        default_doc="60",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Shortest deadline of an engine's or worker's start-up (model load, KV "
        "cache, warm-up) and of its first steps.",
    ),
    Variable(
        name="WATCHDOG_KV_STARTUP_CAP",
        attr="startup_cap_s",
        parse=positive_seconds,
        default=lambda: 900.0,
        default_doc="900",
        accepted="a number of seconds greater than 0 and not below the floor",
        unit="s",
        doc="Longest start-up deadline; also the deadline of a server's first start, "
        "before any start-up of it was measured.",
    ),
    Variable(
        name="WATCHDOG_KV_STALL_ACTION",
        attr="stall_action",
        parse=_choice("observe", "abort", "restart"),
        default=lambda: "abort",
        default_doc="abort",
        accepted="observe, abort, restart",
        doc="What a detected stall does (docs/step-watchdog.md): observe only dumps and "
        "reports (health says not progressing); abort also fails the stalled engine's "
        "requests at once with a clear 503 and sends new ones to another data-parallel "
        "rank, or refuses them; restart also has the supervisor restart the server.",
    ),
    Variable(
        name="WATCHDOG_KV_RESTART_LIMIT",
        attr="restart_limit",
        parse=_non_negative_int,
        default=lambda: 3,
        default_doc="3",
        accepted="a whole number, 0 or more",
        doc="Supervisor: restarts in a row of one server (it exited, or stalled under "
        "the restart action) before it gives up and reports the server failed. A server "
        "ready for 10 minutes starts a new row.",
    ),
    Variable(
        name="WATCHDOG_KV_RESTART_BACKOFF",
        attr="restart_backoff_s",
        parse=positive_seconds,
        default=lambda: 2.0,
        default_doc="2",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="Supervisor: wait between failed restart attempts of a server; it doubles "
        "with each further restart in a row, up to 60 s.",
    ),
    Variable(
        name="WATCHDOG_KV_MONITOR_INTERVAL",
        attr="monitor_interval_s",
        parse=positive_seconds,
        default=lambda: 0.25,
        default_doc="0.25",
        accepted="a number of seconds greater than 0",
        unit="s",
        doc="How often the monitor (and each API server's stall guard) reads the beacons.",
    ),
    Variable(
        name="WATCHDOG_KV_DUMP_DIR",
        attr="dump_dir",
        parse=_path,
        default=lambda: None,
        default_doc="<state dir>/dumps",
        accepted="a directory path",
        doc="Where the monitor writes one incident directory per detected stall "
        "(stacks, beacons, flight recorders); read them with watchdog-kv report.",
    ),
    Variable(
        name="WATCHDOG_KV_TRACE_TEXT",
        attr="trace_text",
        parse=_parse_bool,
        default=lambda: False,
        default_doc="false",
        accepted="true, false (also 1/0, yes/no, on/off)",
        doc="Record prompt and output text on the router's request spans "
        "(docs/tracing.md). Off: spans carry sizes and token counts, never text.",
    ),
    Variable(
        name="WATCHDOG_KV_VLLM_TRACES",
        attr="vllm_traces",
        parse=_parse_bool,
        default=lambda: True,
        default_doc="true",
        accepted="true, false (also 1/0, yes/no, on/off)",
        doc="Supervisor: when tracing is on (an OTLP endpoint is set), start each vLLM "
        "server with --otlp-traces-endpoint too, so vLLM's own request spans join the "
        "router's traces.",
    ),
    Variable(
        name="WATCHDOG_KV_FAULT",
        attr="fault",
        parse=_faults,
        default=FaultPlan,
        default_doc="unset (no fault)",
        accepted="comma-separated delay:<s>, drop:<p>, corrupt:<p>, stall_handshake:<s>, "
        "stall_step:<s>, stall_notif:<s>, crash_start, crash_step, slow_step:<s>",
        doc="Fault injection for rehearsals (docs/kv-transfer.md, docs/step-watchdog.md). "
        "Never set it in production.",
    ),
    Variable(
        name="WATCHDOG_KV_FAULT_SEED",
        attr="fault_seed",
        parse=_int,
        default=lambda: 0,
        default_doc="0",
        accepted="a whole number",
        doc="Seed of the fault injection's random draws, so a rehearsal repeats.",
    ),
)

_BY_NAME = {v.name: v for v in VARIABLES}


# --- the standard OpenTelemetry variables -------------------------------------------------
# The SDK and its OTLP exporters read these themselves (endpoint, headers, timeouts,
# batch sizes, sampler); they are checked here so that a bad value stops start-up with
# its name and what is accepted, instead of being ignored with a warning by the SDK.

OTEL_PROTOCOLS = ("grpc", "http/protobuf")
OTEL_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
OTEL_EXPORTERS = ("otlp", "console", "none")


@dataclass(frozen=True)
class OtelSettings:
    """What watchdog_kv needs to know of the ``OTEL_*`` variables."""

    exporter: str = "none"  # otlp, console or none (tracing off)
    protocol: str = "grpc"
    endpoint: str | None = None  # the traces endpoint, as the exporter will use it
    service_name: str = "watchdog-kv"

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"


def _otel_error(name: str, raw: str, why: str, accepted: str) -> ConfigError:
    return ConfigError(f"{name}={raw!r} is not valid: {why}. Accepted: {accepted}.")


def load_otel(env: Mapping[str, str]) -> OtelSettings:
    """Check the ``OTEL_*`` variables watchdog_kv and the SDK act on.

    Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER=console``, and
    neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` says otherwise.
    """
    disabled = env.get("OTEL_SDK_DISABLED", "false").strip().lower()
    if disabled not in ("true", "false", ""):
        raise _otel_error("OTEL_SDK_DISABLED", disabled, "expected true or false", "true, false")
    raw_exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    exporters = [e.strip() for e in raw_exporter.split(",") if e.strip()]
    for e in exporters:
        if e not in OTEL_EXPORTERS:
            raise _otel_error(
                "OTEL_TRACES_EXPORTER",
                raw_exporter,
                f"{e!r} is not an exporter watchdog_kv ships",
                ", ".join(OTEL_EXPORTERS),
            )
    if len(exporters) > 1:
        raise _otel_error(
            "OTEL_TRACES_EXPORTER",
            raw_exporter,
            "one exporter at a time",
            ", ".join(OTEL_EXPORTERS),
        )
    protocol_var = (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    protocol = env.get(protocol_var, "grpc").strip().lower() or "grpc"
    if protocol not in OTEL_PROTOCOLS:
        raise _otel_error(
            protocol_var,
            protocol,
            "the Python OTLP exporters speak gRPC and HTTP with protobuf",
            ", ".join(OTEL_PROTOCOLS),
        )
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    for name, value in (
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", general),
    ):
        if value and "://" not in value and protocol != "grpc":
            raise _otel_error(
                name, value, "an HTTP endpoint needs its scheme", "a URL such as http://host:4318"
            )
    endpoint = traces or None
    if endpoint is None and general:
        # The specification's rule: a signal path is added to the general endpoint for HTTP.
        endpoint = general.rstrip("/") + "/v1/traces" if protocol == "http/protobuf" else general
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in OTEL_SAMPLERS:
        raise _otel_error(
            "OTEL_TRACES_SAMPLER", sampler, "not a built-in sampler", ", ".join(OTEL_SAMPLERS)
        )
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and sampler.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise _otel_error("OTEL_TRACES_SAMPLER_ARG", arg, "not a ratio", "a number from 0 to 1")
    headers = env.get("OTEL_EXPORTER_OTLP_HEADERS", "").strip()
    for item in filter(None, (h.strip() for h in headers.split(","))):
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise _otel_error(
                "OTEL_EXPORTER_OTLP_HEADERS",
                headers,
                f"{item!r} is not key=value",
                "comma-separated key=value pairs (values URL-encoded)",
            )
    exporter = exporters[0] if exporters else ("otlp" if endpoint else "none")
    if disabled == "true" or (exporter == "otlp" and not endpoint):
        exporter = "none"
    service = env.get("OTEL_SERVICE_NAME", "").strip() or "watchdog-kv"
    return OtelSettings(exporter, protocol, endpoint, service)


@dataclass(frozen=True)
class Settings:
    """Typed, validated watchdog_kv settings. Durations are seconds (``_s``)."""

    enabled: bool
    log_level: str
    log_format: str
    state_dir: Path
    cache_dir: Path
    server: str | None
    prefill_timeout_s: float
    decode_idle_timeout_s: float
    request_budget_s: float = 300.0
    drain_timeout_s: float = 30.0
    kv_recovery: str = "recompute"
    kv_deadline_floor_s: float = 5.0
    kv_deadline_cap_s: float = 120.0
    kv_assumed_bandwidth_mbps: float = 100.0
    kv_lease_check: bool = True
    nixl_progress_delay_us: int = 1000
    step_floor_s: float = 10.0
    step_cap_s: float = 300.0
    step_slack: float = 4.0
    connector_floor_s: float = 10.0
    connector_cap_s: float = 120.0
    startup_floor_s: float = 60.0
    startup_cap_s: float = 900.0
    stall_action: str = "abort"
    restart_limit: int = 3
    restart_backoff_s: float = 2.0
    monitor_interval_s: float = 0.25
    dump_dir: Path | None = None
    trace_text: bool = False
    vllm_traces: bool = True
    fault: FaultPlan = field(default_factory=FaultPlan)
    fault_seed: int = 0
    otel: OtelSettings = field(default_factory=lambda: OtelSettings())

    @property
    def dumps(self) -> Path:
        """Where incidents go: WATCHDOG_KV_DUMP_DIR, else <state dir>/dumps."""
        return self.dump_dir or self.state_dir / "dumps"


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse every ``WATCHDOG_KV_*`` variable of ``environ`` (default ``os.environ``).

    Raises :class:`ConfigError` naming the first unknown or invalid variable.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in _BY_NAME)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"{name} is not a watchdog_kv setting.{hint} "
            f"Known settings: {', '.join(_BY_NAME)} (see docs/configuration.md)."
        )
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = env.get(var.name)
        if raw is None:
            values[var.attr] = var.default()
            continue
        try:
            values[var.attr] = var.parse(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{var.name}={raw!r} is not valid: {exc}. Accepted: {var.accepted}."
            ) from None
    for prefix, floor, cap in _FLOOR_CAP:
        if values[floor] > values[cap]:
            raise ConfigError(
                f"WATCHDOG_KV_{prefix}_FLOOR ({values[floor]:g} s) is above "
                f"WATCHDOG_KV_{prefix}_CAP ({values[cap]:g} s). Accepted: a floor not above "
                "the cap."
            )
    if values["step_slack"] < 1:
        raise ConfigError(
            f"WATCHDOG_KV_STEP_SLACK={values['step_slack']:g} is not valid: a deadline below "
            "the longest step seen would flag healthy steps. Accepted: a number, 1 or more."
        )
    values["otel"] = load_otel(env)
    return Settings(**values)


_FLOOR_CAP = (
    ("KV_DEADLINE", "kv_deadline_floor_s", "kv_deadline_cap_s"),
    ("STEP", "step_floor_s", "step_cap_s"),
    ("CONNECTOR", "connector_floor_s", "connector_cap_s"),
    ("STARTUP", "startup_floor_s", "startup_cap_s"),
)


def markdown_table() -> str:
    """The variables as the Markdown table docs/configuration.md carries."""
    rows = ["| variable | default | accepted | unit | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES:
        rows.append(f"| `{v.name}` | {v.default_doc} | {v.accepted} | {v.unit or '-'} | {v.doc} |")
    return "\n".join(rows) + "\n"
