"""Configuration: every ``WATCHDOG_KV_*`` environment variable, parsed once.

Each variable is declared once, as a field of :class:`Settings`::

    step_cap_s: float = _setting(<name>, SECONDS, 300.0, <doc>, not_below="step_floor_s")

That declaration carries the variable's name, its :class:`Kind` (parser, accepted
values, unit), its default and the sentence the docs print for it. Everything else
is derived from it: the dataclass default, :data:`VARIABLES` (one :class:`Variable`
per name, in declaration order), :func:`load`, the error messages, the
``watchdog-kv config`` listing and :func:`markdown_table`.

Two mistakes stop start-up with :class:`ConfigError`, whose message names the
variable and what it accepts:

* a value the parser rejects (``WATCHDOG_KV_ENABLED=maybe``);
* a ``WATCHDOG_KV_*`` name that is not declared (a typo such as
  ``WATCHDOG_KV_ENABLD``), so a misspelt setting is never silently ignored.

``docs/configuration.md`` lists the same table; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from watchdog_kv.faults import FAULT_KINDS, FaultPlan, parse_faults

__all__ = [
    "OTEL_PROTOCOLS",
    "PREFIX",
    "VARIABLES",
    "ConfigError",
    "Kind",
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

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


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


def _slack(raw: str) -> float:
    value = _positive_number(raw)
    if value < 1:
        raise ValueError("a deadline below the longest step seen would flag healthy steps")
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


# --- kinds: a parser together with what it accepts and the unit of its value.


@dataclass(frozen=True)
class Kind(Generic[_T_co]):
    """How one type of value is read: its parser, what it accepts, its unit."""

    parse: Callable[[str], _T_co]
    accepted: str
    unit: str = ""


def _choice(*choices: str) -> Kind[str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return Kind(parse, ", ".join(choices))


BOOL = Kind(_parse_bool, ", ".join(s for pair in zip(_TRUE, _FALSE, strict=True) for s in pair))
SECONDS = Kind(positive_seconds, "a number of seconds greater than 0", "s")
MEGABYTES_PER_S = Kind(_positive_number, "a number greater than 0", "MB/s")
MICROSECONDS = Kind(_non_negative_int, "a whole number of microseconds, 0 or more", "µs")
SLACK = Kind(_slack, "a number, 1 or more")
COUNT = Kind(_non_negative_int, "a whole number, 0 or more")
INT = Kind(_int, "a whole number")
DIRECTORY = Kind(_path, "a directory path")
NAME = Kind(_name, "a name of letters, digits, '-', '_' or '.'")
FAULTS = Kind(  # <s>: seconds, <p>: probability
    parse_faults,
    "comma-separated "
    + ", ".join(
        k if unit == "flag" else f"{k}:<{unit[0]}>" for k, (unit, _) in FAULT_KINDS.items()
    ),
)


def default_state_dir() -> Path:
    """``$XDG_RUNTIME_DIR/watchdog_kv-<uid>``, else the same under the temp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"watchdog_kv-{os.getuid()}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "watchdog_kv"


# --- declaring a variable: a dataclass field whose metadata says how to read it.
# _setting and _computed_setting return a dataclasses.Field, made per instance as
# field() does; ruff's RUF009 cannot see that, hence its noqa on fields of class types.

_DECLARATION = "watchdog_kv.variable"


@dataclass(frozen=True)
class _Declaration:
    name: str
    kind: Kind[object]
    doc: str
    default_doc: str | None
    not_below: str | None  # the attribute of the floor this value may not be below


def _setting(
    name: str,
    kind: Kind[_T],
    default: _T,
    doc: str,
    *,
    default_doc: str | None = None,
    not_below: str | None = None,
) -> _T:
    """A settings field read from ``name``; its docs default is derived from ``default``."""
    declared = _Declaration(name, kind, doc, default_doc, not_below)
    return field(default=default, metadata={_DECLARATION: declared})


def _computed_setting(
    name: str, kind: Kind[_T], default: Callable[[], _T], doc: str, *, default_doc: str
) -> _T:
    """A settings field read from ``name`` whose default is computed when loading."""
    declared = _Declaration(name, kind, doc, default_doc, None)
    return field(default_factory=default, metadata={_DECLARATION: declared})


def _show(value: object) -> str:
    """A default as the docs write it: in the spelling a user would set."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


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
    """Typed, validated watchdog_kv settings. Durations are seconds (``_s``).

    Each field but ``otel`` is one ``WATCHDOG_KV_*`` variable, declared here once.
    """

    enabled: bool = _setting(
        "WATCHDOG_KV_ENABLED",
        BOOL,
        True,
        "Master switch. With 0 the plugin installs no hook, writes no status "
        "record and costs nothing beyond one log line.",
    )
    log_level: str = _setting(
        "WATCHDOG_KV_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Lowest level of watchdog_kv's own log events (vLLM's logging is untouched).",
    )
    log_format: str = _setting(
        "WATCHDOG_KV_LOG_FORMAT",
        _choice("auto", "json", "console"),
        "auto",
        "Log rendering: one JSON object per line, or coloured key=value for "
        "people. auto picks console on a terminal and JSON otherwise.",
    )
    state_dir: Path = _computed_setting(  # noqa: RUF009
        "WATCHDOG_KV_STATE_DIR",
        DIRECTORY,
        default_state_dir,
        "Where each watched process writes its status record "
        "(procs/<pid>.json). The supervisor sets one per run.",
        default_doc="$XDG_RUNTIME_DIR/watchdog_kv-<uid> (or the temp dir)",
    )
    cache_dir: Path = _computed_setting(  # noqa: RUF009
        "WATCHDOG_KV_CACHE_DIR",
        DIRECTORY,
        _default_cache_dir,
        "Where the embedded tiny model is built once and reused.",
        default_doc="$XDG_CACHE_HOME/watchdog_kv (or ~/.cache/watchdog_kv)",
    )
    server: str | None = _setting(
        "WATCHDOG_KV_SERVER",
        NAME,
        None,
        "Name of the vLLM server a process belongs to (prefill-0, decode-0, ...). "
        "Set by the supervisor on the servers it starts; recorded in status records.",
    )
    prefill_timeout_s: float = _setting(
        "WATCHDOG_KV_PREFILL_TIMEOUT",
        SECONDS,
        120.0,
        "Router: longest wait for a prefill server's answer before the client "
        "gets a 504 naming the prefill server.",
    )
    decode_idle_timeout_s: float = _setting(
        "WATCHDOG_KV_DECODE_IDLE_TIMEOUT",
        SECONDS,
        120.0,
        "Router: longest silence from a decode server (before its first token or "
        "between tokens -- the router streams every answer it can continue from the "
        "decode, whether the client streams or not) before the decode counts as failed: "
        "the answer is continued on another decode, or ended with a clear error. A "
        "non-streamed answer that cannot be continued is bounded by "
        "WATCHDOG_KV_REQUEST_BUDGET instead.",
    )
    request_budget_s: float = _setting(
        "WATCHDOG_KV_REQUEST_BUDGET",
        SECONDS,
        300.0,
        "Router: how long one request may spend on the recovery ladder (another "
        "prefill, computing on the decode, another decode, waiting for a restarted one, "
        "continuing a stream). Once spent, the client gets the last error.",
    )
    drain_timeout_s: float = _setting(
        "WATCHDOG_KV_DRAIN_TIMEOUT",
        SECONDS,
        30.0,
        "Supervisor, on SIGTERM or SIGINT: new requests get 503 at once and those in "
        "flight have this long to finish before the servers are stopped.",
    )
    kv_recovery: str = _setting(
        "WATCHDOG_KV_KV_RECOVERY",
        _choice("recompute", "fail"),
        "recompute",
        "Decode side, when a KV load misses its deadline, breaks or reads stale "
        "blocks: recompute the prompt locally through vLLM's own recovery (same "
        "output, more compute), or fail the request at once with a clear error.",
    )
    kv_deadline_floor_s: float = _setting(
        "WATCHDOG_KV_KV_DEADLINE_FLOOR",
        SECONDS,
        5.0,
        "Shortest deadline of any KV-load phase (handshake, first progress, "
        "transfer, lease check): a small stuck load is caught after this long.",
    )
    kv_deadline_cap_s: float = _setting(
        "WATCHDOG_KV_KV_DEADLINE_CAP",
        SECONDS,
        120.0,
        "Longest deadline of any KV-load phase, however big the transfer.",
        not_below="kv_deadline_floor_s",
    )
    kv_assumed_bandwidth_mbps: float = _setting(
        "WATCHDOG_KV_KV_ASSUMED_BANDWIDTH",
        MEGABYTES_PER_S,
        100.0,
        "Bandwidth a transfer deadline assumes until transfers have been measured "
        "in this process; after that, the slowest recent measured bandwidth is used.",
    )
    kv_lease_check: bool = _setting(
        "WATCHDOG_KV_KV_LEASE_CHECK",
        BOOL,
        True,
        "Decode side: before KV read from a prefill is used, ask that prefill's "
        "watchdog whether it kept the blocks through the read; if not (or no "
        "answer in time) the prompt is recomputed. Needs watchdog_kv on the prefill.",
    )
    nixl_progress_delay_us: int = _setting(
        "WATCHDOG_KV_NIXL_PROGRESS_DELAY_US",
        MICROSECONDS,
        1000,
        "Poll timeout given to NIXL's UCX progress thread. NIXL 1.5's Python API "
        "sets 0, which makes that thread spin a full core per vLLM worker even when "
        "idle; the thread still wakes on UCX events. 0 leaves NIXL as it is.",
    )
    step_floor_s: float = _setting(
        "WATCHDOG_KV_STEP_FLOOR",
        SECONDS,
        10.0,
        "Shortest deadline of one engine or worker model step: a step that never "
        "returns is caught after this long once steps are fast. Why 10 s: "
        "docs/step-watchdog.md.",
    )
    step_cap_s: float = _setting(
        "WATCHDOG_KV_STEP_CAP",
        SECONDS,
        300.0,
        "Longest deadline of one model step, however slow recent steps were "
        "(vLLM's own execute-model timeout is 300 s).",
        not_below="step_floor_s",
    )
    step_slack: float = _setting(
        "WATCHDOG_KV_STEP_SLACK",
        SLACK,
        4.0,
        "A step, startup or connector-call deadline is this many times the longest "
        "recent one of its kind (then held between its floor and cap).",
    )
    connector_floor_s: float = _setting(
        "WATCHDOG_KV_CONNECTOR_FLOOR",
        SECONDS,
        10.0,
        "Shortest deadline of one KV-connector call inside a worker step "
        "(start_load_kv, get_transfer_results, wait_for_save...).",
    )
    connector_cap_s: float = _setting(
        "WATCHDOG_KV_CONNECTOR_CAP",
        SECONDS,
        120.0,
        "Longest deadline of one KV-connector call.",
        not_below="connector_floor_s",
    )
    startup_floor_s: float = _setting(
        "WATCHDOG_KV_STARTUP_FLOOR",
        SECONDS,
        60.0,
        "Shortest deadline of an engine's or worker's start-up (model load, KV "
        "cache, warm-up) and of its first steps.",
    )
    startup_cap_s: float = _setting(
        "WATCHDOG_KV_STARTUP_CAP",
        SECONDS,
        900.0,
        "Longest start-up deadline; also the deadline of a server's first start, "
        "before any start-up of it was measured.",
        not_below="startup_floor_s",
    )
    stall_action: str = _setting(
        "WATCHDOG_KV_STALL_ACTION",
        _choice("observe", "abort", "restart"),
        "abort",
        "What a detected stall does (docs/step-watchdog.md): observe only dumps and "
        "reports (health says not progressing); abort also fails the stalled engine's "
        "requests at once with a clear 503 and sends new ones to another data-parallel "
        "rank, or refuses them; restart also has the supervisor restart the server.",
    )
    restart_limit: int = _setting(
        "WATCHDOG_KV_RESTART_LIMIT",
        COUNT,
        3,
        "Supervisor: restarts in a row of one server (it exited, or stalled under "
        "the restart action) before it gives up and reports the server failed. A server "
        "ready for 10 minutes starts a new row.",
    )
    restart_backoff_s: float = _setting(
        "WATCHDOG_KV_RESTART_BACKOFF",
        SECONDS,
        2.0,
        "Supervisor: wait between failed restart attempts of a server; it doubles "
        "with each further restart in a row, up to 60 s.",
    )
    monitor_interval_s: float = _setting(
        "WATCHDOG_KV_MONITOR_INTERVAL",
        SECONDS,
        0.25,
        "How often the monitor (and each API server's stall guard) reads the beacons.",
    )
    dump_dir: Path | None = _setting(  # noqa: RUF009
        "WATCHDOG_KV_DUMP_DIR",
        DIRECTORY,
        None,
        "Where the monitor writes one incident directory per detected stall "
        "(stacks, beacons, flight recorders); read them with watchdog-kv report.",
        default_doc="<state dir>/dumps",
    )
    trace_text: bool = _setting(
        "WATCHDOG_KV_TRACE_TEXT",
        BOOL,
        False,
        "Record prompt and output text on the router's request spans "
        "(docs/tracing.md). Off: spans carry sizes and token counts, never text.",
    )
    vllm_traces: bool = _setting(
        "WATCHDOG_KV_VLLM_TRACES",
        BOOL,
        True,
        "Supervisor: when tracing is on (an OTLP endpoint is set), start each vLLM "
        "server with --otlp-traces-endpoint too, so vLLM's own request spans join the "
        "router's traces.",
    )
    fault: FaultPlan = _computed_setting(  # noqa: RUF009
        "WATCHDOG_KV_FAULT",
        FAULTS,
        FaultPlan,
        "Fault injection for rehearsals (docs/kv-transfer.md, docs/step-watchdog.md). "
        "Never set it in production.",
        default_doc="unset (no fault)",
    )
    fault_seed: int = _setting(
        "WATCHDOG_KV_FAULT_SEED",
        INT,
        0,
        "Seed of the fault injection's random draws, so a rehearsal repeats.",
    )
    otel: OtelSettings = field(default_factory=OtelSettings)  # the OTEL_* variables

    @property
    def dumps(self) -> Path:
        """Where incidents go: WATCHDOG_KV_DUMP_DIR, else <state dir>/dumps."""
        return self.dump_dir or self.state_dir / "dumps"


@dataclass(frozen=True)
class Variable:
    """One environment variable, as derived from its :class:`Settings` field."""

    name: str
    attr: str
    parse: Callable[[str], Any]
    default: Callable[[], Any]
    default_doc: str
    accepted: str
    doc: str
    unit: str = ""
    not_below: Variable | None = None  # the floor this value may not be below


def _default_of(f: dataclasses.Field[Any]) -> Callable[[], Any]:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory
    value = f.default
    return lambda: value


def _variables() -> tuple[Variable, ...]:
    declared = {
        f.name: (f, f.metadata[_DECLARATION])
        for f in dataclasses.fields(Settings)
        if _DECLARATION in f.metadata
    }
    built: dict[str, Variable] = {}
    for attr, (f, d) in declared.items():
        default = _default_of(f)
        default_doc = _show(default()) if d.default_doc is None else d.default_doc
        floor = built[d.not_below] if d.not_below else None
        built[attr] = Variable(
            name=d.name,
            attr=attr,
            parse=d.kind.parse,
            default=default,
            default_doc=default_doc,
            accepted=d.kind.accepted + (f" and not below {floor.name}" if floor else ""),
            doc=d.doc,
            unit=d.kind.unit,
            not_below=floor,
        )
    return tuple(built.values())


VARIABLES: tuple[Variable, ...] = _variables()

_BY_NAME = {v.name: v for v in VARIABLES}


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
    for var in VARIABLES:
        floor = var.not_below
        if floor is not None and values[floor.attr] > values[var.attr]:
            raise ConfigError(
                f"{floor.name} ({values[floor.attr]:g} {floor.unit}) is above "
                f"{var.name} ({values[var.attr]:g} {var.unit}). Accepted: a floor not above "
                "the cap."
            )
    return Settings(**values, otel=load_otel(env))


def markdown_table() -> str:
    """The variables as the Markdown table docs/configuration.md carries."""
    rows = ["| variable | default | accepted | unit | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES:
        rows.append(f"| `{v.name}` | {v.default_doc} | {v.accepted} | {v.unit or '-'} | {v.doc} |")
    return "\n".join(rows) + "\n"
