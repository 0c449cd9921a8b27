"""Real vLLM for the integration tests: one supervised prefill/decode service per session.

Everything here runs the real `watchdog-kv` command, which starts real stock
vLLM OpenAI servers (the CPU build) on the embedded model. Nothing is mocked.
The service takes about a minute to start on two cores, so it is started once
(session scope) and shared; the test that shuts it down runs last.

These tests need the CPU stack (`pip install .[cpu]` then `watchdog-kv doctor
--fix`, as `nox -s tests` does). Without vLLM they are skipped, and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from watchdog_kv import faults
from watchdog_kv.supervisor.ports import free_port as free_port_on

# Only look: importing vllm here would register watchdog_kv in the pytest process itself.
HAVE_VLLM = (
    importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("nixl") is not None
)

requires_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM CPU stack not installed: run `nox -s tests`, which installs it"
)

STARTUP_DEADLINE_S = 420


def free_port() -> int:
    return free_port_on("127.0.0.1", set())


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1, detail=None) -> float:
    """Seconds until ``predicate()`` held; fails naming ``what`` after ``timeout_s``
    (with ``detail()``, what was seen, when given)."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            seen = f"; seen: {detail()}" if detail is not None else ""
            pytest.fail(f"{what}: not within {timeout_s:g} s{seen}")
        time.sleep(poll_s)
    return time.monotonic() - began


@contextlib.contextmanager
def held_in_flight(svc, *servers: str):
    """Slow every model step of ``servers`` (the ``slow_step`` rehearsal fault, which the
    service must be started with; the steps sleep, GIL released), so that a request sent
    meanwhile is still being decoded when the test acts on it -- on a fast host too."""
    for server in servers:
        faults.arm(svc.run_dir, server, "slow_step")
    try:
        yield
    finally:
        for server in servers:
            faults.disarm(svc.run_dir, server, "slow_step")


def vllm_metric(url: str, sample: str) -> float:
    """The sum of vLLM's own ``/metrics`` samples named ``sample`` (over their labels)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    )


def requests_running(url: str) -> float:
    """vLLM's own gauge of the requests its engine is running."""
    return vllm_metric(url, "vllm:num_requests_running")


def wait_running(svc, server: str, timeout_s: float = 60) -> float:
    """Seconds until ``server``'s engine is running a request (vLLM says so)."""
    url = svc.status()["servers"][server]["url"]
    return wait_until(
        lambda: requests_running(url) >= 1, timeout_s, f"a request running on {server}"
    )


def kv_outcomes(svc, server: str) -> Counter:
    """How the KV loads of ``server``'s workers ended (their status records):
    ``received`` over NIXL, ``recomputed`` after giving up, ..."""
    out: Counter = Counter()
    for r in svc.status()["processes"]:
        if r["server"] == server and r["role"] == "worker":
            out.update(((r.get("kv") or {}).get("outcomes")) or {})
    return out


def kv_status(svc) -> dict:
    """Every worker's KV status record, by server and pid (what a failed wait shows)."""
    return {
        f"{r['server']}/{r['pid']}": r.get("kv")
        for r in svc.status()["processes"]
        if r["role"] == "worker"
    }


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """GET (no body) or POST JSON; (status, parsed body or {"text": raw})."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def wait_healthy(url: str, exited: Callable[[], bool], timeout_s: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail naming the cause if ``exited()`` or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if exited():
            pytest.fail(f"server exited before it was healthy:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            if http_json(url, timeout=5)[0] == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"not healthy after {timeout_s:g} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def embedded_model() -> str:
    """The embedded tiny model's directory (built on first use)."""
    done = subprocess.run(cli("model", "build"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


@contextlib.contextmanager
def vllm_server(log: Path, env: dict[str, str], *args: str):
    """One stock vLLM OpenAI server started by hand (no supervisor) on the embedded model,
    healthy; yields ``(url, process)``; stops its whole process group afterwards."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        embedded_model(),
        "--served-model-name",
        "watchdog-kv-tiny",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--port",
        str(port),
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", lambda: proc.poll() is not None, STARTUP_DEADLINE_S, log)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_KV_")}
    if "WATCHDOG_KV_CACHE_DIR" in os.environ:  # reuse a model built by the caller
        env["WATCHDOG_KV_CACHE_DIR"] = os.environ["WATCHDOG_KV_CACHE_DIR"]
    env["WATCHDOG_KV_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "watchdog_kv", *args]


def events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def left_in_groups(pgids: list[int]) -> list[int]:
    """Live processes whose process group is one of ``pgids`` (a server's whole tree)."""
    left = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return left


@dataclass
class Service:
    proc: subprocess.Popen
    port: int
    run_dir: Path
    stderr_path: Path
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        code, body = http_json(f"{self.url}/watchdog/status")
        assert code == 200, body
        return body

    def remember_tree(self) -> set[int]:
        """Every pid of the supervisor's tree now, remembered for the shutdown check."""
        try:
            top = psutil.Process(self.proc.pid)
            self.seen_pids |= {top.pid, *(c.pid for c in top.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        return set(self.seen_pids)


def start_service(run_dir: Path, env: dict[str, str], *args: str) -> Service:
    """Start `watchdog-kv serve` (real vLLM servers) and wait until its router is healthy."""
    port = free_port()
    stderr_path = run_dir / "supervisor.stderr"
    proc = subprocess.Popen(
        cli("serve", "--port", str(port), "--run-dir", str(run_dir), *args),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(stderr_path, "wb"),  # noqa: SIM115 - closed when the process exits
        start_new_session=True,
    )
    svc = Service(proc, port, run_dir, stderr_path)
    try:
        wait_healthy(
            f"{svc.url}/health", lambda: proc.poll() is not None, STARTUP_DEADLINE_S, stderr_path
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the supervisor stops its servers on SIGTERM
        raise
    svc.remember_tree()
    return svc


def stop_service(svc: Service) -> None:
    """SIGTERM the supervisor (it stops its servers); SIGKILL the tree if that hangs."""
    if svc.proc.poll() is not None:
        return
    svc.proc.send_signal(signal.SIGTERM)
    try:
        svc.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in svc.remember_tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    if not HAVE_VLLM:
        pytest.skip("vLLM CPU stack not installed: run `nox -s tests`, which installs it")
    # The stall faults only fire when a test arms them (faults.arm).
    # slow_step holds a request in flight where a test needs one (held_in_flight)
    env = base_env(WATCHDOG_KV_FAULT="stall_step:20,stall_notif:20,slow_step:0.02")
    svc = start_service(tmp_path_factory.mktemp("pd-run"), env)
    yield svc
    stop_service(svc)  # if the shutdown test did not run (e.g. -k)
