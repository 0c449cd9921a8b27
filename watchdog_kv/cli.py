"""``watchdog-kv`` (also ``python -m watchdog_kv``): the operator's command line.

Commands:

``serve``   start supervised prefill + decode vLLM servers and the router
``demo``    the same, then prove the hand-off on real requests, then stop
``model``   build (once) or locate the embedded tiny model
``config``  validate ``WATCHDOG_KV_*`` and print the settings (``--markdown``: the docs table)
``report``  merge incidents (a dump directory): the stuck process/thread/frame of each stall,
            the signal and culprit frame of each crash
``monitor`` watch the vLLM processes of a state directory from outside (a sidecar for
            vLLM servers started without ``serve``), writing incidents on stalls
``doctor``  check what breaks stock vLLM on this host (a table: ok / fixed / warn /
            problem, with what to do); ``--fix`` removes packages that break it.
            ``serve`` and ``demo`` run the same checks first and refuse on a problem

Exit codes: 0 success, 1 failure (the message says what), 2 bad usage or bad
configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watchdog_kv import config
from watchdog_kv.telemetry import bind_process, configure

__all__ = ["main"]

EXIT_USAGE = 2


def _seconds(raw: str) -> float:
    try:
        return config.positive_seconds(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watchdog-kv",
        description="Fault tolerance and hang detection for vLLM V1 prefill/decode serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def service_args(p: argparse.ArgumentParser, default_port: int | None) -> None:
        p.add_argument(
            "--model",
            type=Path,
            default=None,
            help="local model directory (default: the embedded tiny model, built on first use)",
        )
        p.add_argument(
            "--served-model-name",
            default=None,
            help="model name clients send (default: the model directory's name)",
        )
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="address the router and vLLM servers bind (default 127.0.0.1)",
        )
        p.add_argument(
            "--port",
            type=int,
            default=default_port,
            help="router port"
            + (f" (default {default_port})" if default_port else " (default: a free port)"),
        )
        p.add_argument(
            "--prefill-port",
            type=int,
            default=None,
            help="HTTP port of prefill-0 (default: a free port; the others always get one)",
        )
        p.add_argument(
            "--decode-port",
            type=int,
            default=None,
            help="HTTP port of decode-0, or of the data-parallel server (default: a free "
            "port; the others always get one)",
        )
        p.add_argument(
            "--startup-timeout",
            type=float,
            default=300.0,
            metavar="SECONDS",
            help="longest wait for each vLLM server to become healthy (default 300)",
        )
        p.add_argument(
            "--max-model-len",
            type=int,
            default=512,
            help="vLLM --max-model-len for both servers (default 512)",
        )
        p.add_argument(
            "--kv-lease",
            type=_seconds,
            default=None,
            metavar="SECONDS",
            help="how long a prefill keeps KV blocks for a decode that has not read them "
            "(NIXL kv_lease_duration; default: vLLM's, 30 s)",
        )
        p.add_argument(
            "--prefill",
            type=int,
            default=1,
            metavar="N",
            help="number of prefill servers (default 1; 0: the decodes compute every prompt)",
        )
        p.add_argument(
            "--decode",
            type=int,
            default=1,
            metavar="N",
            help="number of decode servers (default 1)",
        )
        p.add_argument(
            "--backend",
            choices=("local", "ray"),
            default="local",
            help="where vLLM servers run: local child processes (default), or Ray actors "
            "on an existing cluster, one placement group per server",
        )
        p.add_argument(
            "--ray-address",
            default=None,
            metavar="HOST:PORT",
            help="Ray cluster to join with --backend ray (default: RAY_ADDRESS, else the "
            "local cluster)",
        )
        p.add_argument(
            "--placement-timeout",
            type=_seconds,
            default=60.0,
            metavar="SECONDS",
            help="with --backend ray: longest wait for a server's placement group (default 60)",
        )
        p.add_argument(
            "--data-parallel-size",
            type=int,
            default=1,
            metavar="N",
            help="N > 1: one plain (not disaggregated) vLLM server with N data-parallel "
            "engine ranks behind one API server, instead of prefill + decode",
        )
        p.add_argument(
            "--vllm-arg",
            action="append",
            default=[],
            metavar="ARG",
            help="extra argument passed to both vLLM servers, repeatable "
            "(e.g. --vllm-arg=--max-num-seqs=8)",
        )
        p.add_argument(
            "--run-dir",
            type=Path,
            default=None,
            help="where logs and status records go (default: a new directory "
            "under WATCHDOG_KV_STATE_DIR)",
        )

    service_args(
        sub.add_parser(
            "serve", help="run supervised prefill/decode vLLM and the router until SIGINT/SIGTERM"
        ),
        8000,
    )
    demo = sub.add_parser("demo", help="serve, send requests, compare with local answers, stop")
    service_args(demo, None)

    model = sub.add_parser("model", help="the embedded tiny model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    build = model_sub.add_parser("build", help="build it into the cache (once) and print its path")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    model_sub.add_parser("path", help="print where it is (or would be) built")

    cfg = sub.add_parser("config", help="validate WATCHDOG_KV_* and print the settings")
    cfg.add_argument(
        "--markdown",
        action="store_true",
        help="print the table of every variable (docs/configuration.md)",
    )

    report = sub.add_parser(
        "report", help="name the culprit of each stall and crash incident in DIR"
    )
    report.add_argument(
        "dir",
        type=Path,
        help="an incident directory, or a folder of them (WATCHDOG_KV_DUMP_DIR)",
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")

    monitor = sub.add_parser(
        "monitor", help="watch the vLLM processes of WATCHDOG_KV_STATE_DIR for stalls"
    )
    monitor.add_argument(
        "--for",
        dest="duration",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until SIGINT/SIGTERM)",
    )

    doctor = sub.add_parser("doctor", help="check the vLLM CPU install")
    doctor.add_argument(
        "--fix",
        action="store_true",
        help="uninstall packages that are installed but fail to import",
    )
    return parser


def _resolve_model(args: argparse.Namespace, settings: config.Settings) -> tuple[Path, str]:
    from watchdog_kv import model as embedded

    if args.model is None:
        path = embedded.build(settings.cache_dir)
        return path, args.served_model_name or "watchdog-kv-tiny"
    path = embedded.validate_model_dir(args.model)
    return path, args.served_model_name or path.name


def _service(args: argparse.Namespace, settings: config.Settings, demo: bool) -> int:
    from watchdog_kv import model as embedded
    from watchdog_kv.supervisor import PortInUseError, ServeOptions, run_service
    from watchdog_kv.supervisor.ports import free_port

    problem = _topology_problem(args, demo)
    if problem:
        print(f"watchdog-kv: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not _preflight(args, settings):
        return 1
    try:
        model_path, served = _resolve_model(args, settings)
    except embedded.InvalidModelError as exc:
        print(f"watchdog-kv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    port = args.port if args.port is not None else free_port(args.host, set())
    options = ServeOptions(
        model=model_path,
        served_model_name=served,
        host=args.host,
        port=port,
        prefill_port=args.prefill_port,
        decode_port=args.decode_port,
        startup_timeout_s=args.startup_timeout,
        max_model_len=args.max_model_len,
        vllm_args=tuple(args.vllm_arg),
        kv_lease_s=args.kv_lease,
        run_dir=args.run_dir,
        data_parallel_size=args.data_parallel_size,
        prefills=args.prefill,
        decodes=args.decode,
        backend=args.backend,
        ray_address=args.ray_address,
        placement_timeout_s=args.placement_timeout,
    )
    on_ready = None
    if demo:
        from watchdog_kv.demo import run_demo

        on_ready = run_demo
    try:
        return asyncio.run(run_service(options, settings, on_ready=on_ready))
    except PortInUseError as exc:
        print(f"watchdog-kv: {exc}", file=sys.stderr)
        return 1


def _preflight(args: argparse.Namespace, settings: config.Settings) -> bool:
    """The doctor's checks for what is about to start; False (table printed) on a problem."""
    from watchdog_kv import doctor
    from watchdog_kv.telemetry import get_logger

    ports = [("router", args.port)] if args.port is not None else []
    ports += [
        (name, port)
        for name, port in (("prefill-0", args.prefill_port), ("decode-0", args.decode_port))
        if port is not None
    ]
    servers = args.data_parallel_size if args.data_parallel_size > 1 else args.prefill + args.decode
    findings = doctor.check(
        doctor.Plan(
            servers=servers,
            host=args.host,
            ports=tuple(ports),
            state_dir=args.run_dir or settings.state_dir,
            cache_dir=settings.cache_dir,
            plugin_enabled=settings.enabled,
            ports_required=True,
        )
    )
    blocking = doctor.blocking(findings)
    get_logger("watchdog_kv.doctor").info(
        "doctor.checked",
        findings={f.name: f"{f.status}: {f.detail}" for f in findings if f.status != "ok"},
        problems=len(blocking),
    )
    if blocking:
        print(
            "watchdog-kv: not starting: the host has problems that would crash a vLLM "
            "server (watchdog-kv doctor shows the same):\n" + doctor.render(findings),
            file=sys.stderr,
            end="",
        )
        return False
    return True


def _topology_problem(args: argparse.Namespace, demo: bool) -> str | None:
    if args.data_parallel_size < 1 or (demo and args.data_parallel_size > 1):
        return (
            f"--data-parallel-size {args.data_parallel_size}: expected a whole number, 1 or "
            "more (the demo runs prefill/decode only: 1)"
        )
    if args.decode < 1:
        return f"--decode {args.decode}: expected a whole number, 1 or more"
    if args.prefill < 0:
        return f"--prefill {args.prefill}: expected a whole number, 0 or more"
    if args.data_parallel_size > 1 and (args.prefill, args.decode) != (1, 1):
        return (
            "--data-parallel-size is a plain deployment (one server, N engine ranks); it "
            "does not combine with --prefill/--decode"
        )
    if demo and (args.prefill < 1 or args.backend != "local"):
        return "the demo runs one local prefill and decode hand-off: --prefill 1 or more, no Ray"
    return None


def _doctor(args: argparse.Namespace, settings: config.Settings) -> int:
    from watchdog_kv import doctor

    plan = doctor.Plan(
        state_dir=settings.state_dir,
        cache_dir=settings.cache_dir,
        plugin_enabled=settings.enabled,
    )
    findings = doctor.check(plan)
    if args.fix:
        removed = doctor.fix(findings)
        if removed:
            print(f"removed broken packages: {', '.join(removed)}")
            findings = doctor.check(plan)
    print(doctor.render(findings), end="")
    return 0 if not doctor.blocking(findings) else 1


def _report(args: argparse.Namespace) -> int:
    import json

    from watchdog_kv.monitor import crashes
    from watchdog_kv.monitor import report as stalls

    if not args.dir.is_dir():
        print(f"watchdog-kv: {args.dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        items = stalls.build_report(args.dir) + crashes.load_crash_incidents(args.dir)
    except (OSError, ValueError, KeyError) as exc:
        print(f"watchdog-kv: cannot read incidents in {args.dir}: {exc}", file=sys.stderr)
        return 1

    def when(item: dict[str, Any]) -> float:
        head = item.get("stall") if item.get("kind") == "stall" else item.get("crash")
        return float((head or {}).get("detected_wall", 0.0))

    items.sort(key=when)
    if args.json:
        print(json.dumps(items, indent=1, default=str))
    elif not items:
        print("no incidents found")
    else:
        for item in items:
            text = stalls.render([item]) if item["kind"] == "stall" else crashes.render(item)
            print(text, end="")
    return 0 if items else 1


def _monitor(args: argparse.Namespace, settings: config.Settings) -> int:
    import signal
    import threading

    from watchdog_kv.monitor.watcher import Monitor

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mon = Monitor(settings.state_dir, settings.dumps, interval_s=settings.monitor_interval_s)
    mon.start()
    try:
        stop.wait(args.duration)
    finally:
        mon.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"watchdog-kv: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_level, settings.log_format)
    bind_process(role="supervisor")
    if args.command in ("serve", "demo"):
        return _service(args, settings, demo=args.command == "demo")
    if args.command == "model":
        from watchdog_kv import model as embedded

        if args.model_command == "build":
            print(embedded.build(settings.cache_dir, force=args.force))
        else:
            print(embedded.default_model_path(settings.cache_dir))
        return 0
    if args.command == "doctor":
        return _doctor(args, settings)
    if args.command == "report":
        return _report(args)
    if args.command == "monitor":
        return _monitor(args, settings)
    if args.command == "config":
        if args.markdown:
            print(config.markdown_table(), end="")
        else:
            for var in config.VARIABLES:
                print(f"{var.name}={getattr(settings, var.attr)}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
