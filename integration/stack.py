"""A real ``watchdog-kv serve`` service, started and driven from outside, as an operator would.

The service runs stock vLLM servers on the embedded model under the supervisor.
``plugin=False`` starts the same service with vLLM's plugin loading limited to
vLLM's own general plugins (``VLLM_PLUGINS``), so its vLLM servers are stock:
the side-by-side baseline of the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from watchdog_kv.supervisor.ports import free_port
from watchdog_kv.supervisor.process import ManagedProcess
from watchdog_kv.supervisor.servers import ServerSpec

__all__ = [
    "MODEL",
    "PlainServer",
    "Service",
    "StartupFailed",
    "complete",
    "log_events",
    "metric_samples",
    "stock_plugins",
    "text_of",
]

MODEL = "watchdog-kv-tiny"
STARTUP_DEADLINE_S = 420


class StartupFailed(RuntimeError):
    pass


def stock_plugins() -> str:
    """``VLLM_PLUGINS`` naming every general plugin installed except watchdog_kv."""
    names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    return ",".join(n for n in names if n != "watchdog_kv")


def complete(
    url: str,
    body: Mapping[str, Any],
    timeout: float = 120,
    headers: Mapping[str, str] = {},
    path: str = "/v1/completions",
) -> tuple[int, dict[str, Any], float]:
    """POST ``path``: (status, JSON body, seconds). A timeout is status 0."""
    req = urllib.request.Request(
        f"{url}{path}",
        json.dumps(dict(body)).encode(),
        {"content-type": "application/json", **headers},
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except TimeoutError:
        return 0, {"error": f"no answer within {timeout:g} s"}, time.monotonic() - t0
    except urllib.error.URLError as err:
        return -1, {"error": f"connection: {err.reason}"}, time.monotonic() - t0
    try:
        return status, json.loads(raw or b"{}"), time.monotonic() - t0
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}, time.monotonic() - t0


def metric_samples(url: str) -> list[Any]:
    """Every sample of a server's ``/metrics`` (Prometheus text)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def text_of(body: Mapping[str, Any]) -> str | None:
    choices = body.get("choices") or []
    return choices[0].get("text") if choices else None


def log_events(path: Path, name: str) -> list[dict[str, Any]]:
    """watchdog_kv's JSON log events called ``name`` in a server log, with ``at`` (epoch s)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or f'"{name}"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                event = json.loads(line)
                if event.get("event") == name:
                    stamp = event["timestamp"].replace("Z", "+00:00")
                    event["at"] = datetime.fromisoformat(stamp).timestamp()
                    out.append(event)
    return out


def _base_env(plugin: bool) -> dict[str, str]:
    """The caller's environment without its WATCHDOG_KV_* settings (the model cache kept);
    without the plugin, vLLM loads every general plugin but watchdog_kv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_KV_")}
    if "WATCHDOG_KV_CACHE_DIR" in os.environ:  # the embedded model, built once
        env["WATCHDOG_KV_CACHE_DIR"] = os.environ["WATCHDOG_KV_CACHE_DIR"]
    env["WATCHDOG_KV_LOG_FORMAT"] = "json"
    if not plugin:
        env["VLLM_PLUGINS"] = stock_plugins()
    return env


def _wait_healthy(url: str, exited, log: Path, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if exited():
            raise StartupFailed(f"{name} exited:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{url}/health", timeout=5) as resp,
        ):
            if resp.status == 200:
                return
        if time.monotonic() > deadline:
            raise StartupFailed(f"{name} not healthy after {timeout_s:g} s")
        time.sleep(1)


@dataclass
class PlainServer:
    """One stock vLLM OpenAI server on the embedded model, no KV connector, no supervisor:
    the plugin's cost inside vLLM, and nothing else, when compared with ``plugin=False``."""

    name: str
    run_dir: Path
    plugin: bool = True
    proc: ManagedProcess | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from watchdog_kv import config, model

        self.run_dir.mkdir(parents=True, exist_ok=True)
        base = _base_env(self.plugin)
        self.port = free_port("127.0.0.1", set())
        spec = ServerSpec(
            name="plain-0",
            role="plain",
            model=model.build(config.load(base).cache_dir),
            served_model_name=MODEL,
            host="127.0.0.1",
            port=self.port,
            side_channel_port=0,
        )
        env = spec.env(base, self.run_dir / "state")
        self.proc = ManagedProcess(self.name, spec.argv(), env, self.run_dir / "server.log")
        self.proc.start()

    def wait_ready(self, timeout_s: float = STARTUP_DEADLINE_S) -> None:
        assert self.proc is not None
        proc = self.proc
        _wait_healthy(
            self.url,
            lambda: proc.poll() is not None,
            self.run_dir / "server.log",
            self.name,
            timeout_s,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=30)


@dataclass
class Service:
    """``watchdog-kv serve`` in its own process group; stopped by its pid."""

    name: str
    run_dir: Path
    plugin: bool = True
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.run_dir / "supervisor.log"

    def start(self) -> None:
        """Spawn the service; :meth:`wait_ready` waits for it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = _base_env(self.plugin)
        env.update(self.env)
        self.port = free_port("127.0.0.1", set())
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "watchdog_kv", "serve"),
                *("--port", str(self.port), "--run-dir", str(self.run_dir)),
                *self.args,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),  # noqa: SIM115 - closed when the process exits
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = STARTUP_DEADLINE_S) -> None:
        assert self.proc is not None
        proc = self.proc
        _wait_healthy(self.url, lambda: proc.poll() is not None, self.log, self.name, timeout_s)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/watchdog/status", timeout=30) as resp:
            return json.loads(resp.read())

    def server(self, name: str) -> dict[str, Any]:
        return self.status()["servers"][name]

    def pids(self, server: str, *roles: str) -> list[int]:
        """Live processes of ``server`` in ``roles`` (default: the engine core and
        workers), from their status records."""
        roles = roles or ("engine_core", "worker")
        return [
            r["pid"]
            for r in self.status()["processes"]
            if r["server"] == server and r["role"] in roles and r["alive"]
        ]

    def settled(self) -> bool:
        """Every server ready and every engine progressing."""
        servers = self.status()["servers"].values()
        return all(s["state"] == "ready" for s in servers) and self.progressing()

    def progressing(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.url}/watchdog/health?probe=progress", timeout=10
            ) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    def wait_progressing(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.progressing():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not progressing after {timeout_s:g} s")
            time.sleep(0.5)

    def local(self, server: str, prompt: str, **extra: Any) -> str:
        """``server`` computing ``prompt`` itself, its prefix cache bypassed: the reference."""
        body = {"model": MODEL, "prompt": prompt, "temperature": 0, **extra}
        body["cache_salt"] = uuid.uuid4().hex
        code, answer, _ = complete(self.server(server)["url"], body, timeout=300)
        if code != 200:
            raise RuntimeError(f"reference request to {server} failed: {code} {answer}")
        return text_of(answer) or ""

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops its servers); SIGKILL its group if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # each vLLM server runs in a process group of its own: remember the tree
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for proc in [*tree, psutil.Process(self.proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            self.proc.wait()
