"""The Ray backend on a real local Ray cluster, with real vLLM; nothing is mocked.

A module-scoped fixture starts a one-node cluster with ``ray start --head`` in
its own session and its own ``--temp-dir``, and stops exactly that cluster's
processes at the end (``ray stop`` would stop every Ray on the machine).

What runs here, on a CPU-only machine:

* placement that can never be satisfied fails within the deadline, clearly,
  and leaves no placement group or reserved resource behind;
* a port already taken on the actor's node is named, and nothing is left;
* no cluster at the address is a clear error at once (``ray.init`` alone
  retries for minutes);
* a real vLLM server hosted by an actor: served, the actor SIGKILLed, the
  server's whole tree gone with it, then started again in a new placement group;
* watchdog_kv loaded by vLLM's own Ray worker actor (``RayWorkerWrapper``);
* ``watchdog-kv serve --backend ray`` with a prefill and a decode, each on an
  actor: KV handed off over NIXL between the actors, the prefill's actor
  killed (requests still answered by the decode), the prefill restarted by the
  supervisor and the hand-off used again;
* a server on Ray that never becomes healthy: a clear error within the deadline.

Not covered: vLLM's Ray executor and Ray data-parallel backend (they need a
device resource the CPU platform does not have), more than one node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from watchdog_kv.supervisor.core import StartupError
from watchdog_kv.supervisor.servers import ServerSpec

from .conftest import (
    HAVE_VLLM,
    STARTUP_DEADLINE_S,
    alive,
    base_env,
    cli,
    events,
    free_port,
    http_json,
    kv_outcomes,
    kv_status,
    requires_vllm,
    start_service,
    stop_service,
    wait_until,
)

HAVE_RAY = importlib.util.find_spec("ray") is not None

pytestmark = pytest.mark.skipif(
    not HAVE_RAY, reason="Ray not installed: pip install 'watchdog_kv[ray]'"
)

RAY = str(Path(sys.executable).with_name("ray"))
MODEL_CACHE = Path(os.environ.get("WATCHDOG_KV_CACHE_DIR", "/tmp/wkv-cache"))


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    session: int  # the session id shared by every process of this cluster

    def processes(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == self.session and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM this cluster's processes (and only them), SIGKILL what is left
        (its GCS server was seen ignoring SIGTERM for over 20 s)."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, left = psutil.wait_procs(procs, timeout=grace)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=5)


def start_ray_cluster(num_cpus: int = 2) -> RayCluster:
    """``ray start --head`` in a session of its own, so its processes can be told apart."""
    # Ray's unix sockets live under --temp-dir (108-byte path limit): keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="wkv-ray-", dir="/tmp"))
    port, client_port = free_port(), free_port()
    env = {k: v for k, v in base_env().items() if k != "VLLM_PLUGINS"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            str(num_cpus),
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--temp-dir",
            str(temp_dir),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster = RayCluster("", temp_dir, proc.pid)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail("`ray start --head` did not finish within 120 s")
    if proc.returncode != 0:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail(f"`ray start --head` failed:\n{out.decode(errors='replace')[-3000:]}")
    # Ray replaces 127.0.0.1 with the machine's address; ask which one it took.
    gcs = [p for p in cluster.processes() if p.name() == "gcs_server"]
    assert gcs, "no gcs_server in the new cluster's session"
    listening = {c.laddr.port for c in gcs[0].net_connections("tcp") if c.status == "LISTEN"}
    assert port in listening, (port, listening)
    from ray._private.services import get_node_ip_address

    cluster.address = f"{get_node_ip_address()}:{port}"
    return cluster


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray not installed: pip install 'watchdog_kv[ray]'")
    cluster = start_ray_cluster()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def connected(ray_cluster):
    """This test process connected to the module's cluster, as the supervisor does."""
    from watchdog_kv.supervisor.ray import connect

    connect(ray_cluster.address)
    return ray_cluster


def our_placement_groups() -> list[dict]:
    """Placement groups this backend made that are not removed."""
    import ray

    table = ray.util.placement_group_table().values()
    return [
        pg for pg in table if pg["name"].startswith("watchdog-kv:") and pg["state"] != "REMOVED"
    ]


def wait_all_cpus_free(cluster_cpus: float = 2.0, timeout_s: float = 15.0) -> None:
    """Every CPU of the cluster free again (removal is asynchronous in Ray)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cluster_cpus:
        if time.monotonic() > deadline:
            pytest.fail(f"resources still held: {ray.available_resources()}")
        time.sleep(0.2)


def make_spec(model: Path, role: str = "plain", **fields) -> ServerSpec:
    ports: set[int] = set()
    return ServerSpec(
        name=fields.pop("name", "decode-0"),
        role=role,
        model=model,
        served_model_name="tiny",
        host="127.0.0.1",
        port=fields.pop("port", None) or free_port_not_in(ports),
        side_channel_port=free_port_not_in(ports),
        **fields,
    )


def free_port_not_in(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


# -- no vLLM needed --------------------------------------------------------------------------
def test_no_cluster_at_the_address_is_a_clear_error_at_once(tmp_path):
    closed = free_port()  # nothing listens there
    code = f"from watchdog_kv.supervisor.ray import connect\nconnect('127.0.0.1:{closed}')\n"
    env = {k: v for k, v in base_env().items() if k != "RAY_ADDRESS"}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - began
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("watchdog_kv.supervisor.ray.cluster.RayClusterUnreachable: ")
    assert "no Ray cluster reachable at " in last and f":{closed}: cannot connect" in last
    assert "(`ray start --head` on the head node) and never starts one" in last
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_unsatisfiable_placement_fails_within_the_deadline_and_leaves_nothing(connected, tmp_path):
    from watchdog_kv.supervisor.ray import PlacementTimeout, RayServer

    server = RayServer(
        make_spec(tmp_path),
        tmp_path,
        address=connected.address,
        placement_timeout_s=2.0,
        bundle={"CPU": 64},
    )
    began = time.monotonic()
    with pytest.raises(PlacementTimeout) as caught:
        server.start()
    elapsed = time.monotonic() - began
    message = str(caught.value)
    assert isinstance(caught.value, StartupError)  # the supervisor's restart policy sees it
    assert message.startswith("placement group for decode-0 ({'CPU': 64}) not placed within 2 s")
    assert "'CPU': 2.0" in message  # what the cluster has
    assert 2.0 <= elapsed < 2.0 + 5.0, f"took {elapsed:.1f} s"
    assert our_placement_groups() == []
    assert server.poll() is None and server.pid is None
    assert "placement_group" not in server.where()
    wait_all_cpus_free()


def test_port_taken_on_the_actors_node_is_named_and_nothing_is_left(connected, tmp_path):
    import ray

    from watchdog_kv.supervisor.ray import RayBackendError, RayServer

    node_ip = ray.util.get_node_ip_address()
    with socket.socket() as holder:
        holder.bind((node_ip, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = RayServer(
            make_spec(tmp_path, port=taken),
            tmp_path,
            address=connected.address,
            placement_timeout_s=30.0,
        )
        with pytest.raises(RayBackendError) as caught:
            server.start()
    assert str(caught.value) == (
        f"decode-0 cannot start on Ray node {node_ip}: "
        f"port {taken} on {node_ip} (decode-0 HTTP) is already in use"
    )
    assert our_placement_groups() == []
    wait_all_cpus_free()


# -- real vLLM -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> Path:
    if not HAVE_VLLM:
        pytest.skip("vLLM CPU stack not installed: run `nox -s tests`, which installs it")
    from watchdog_kv.model import build, default_model_path

    path = default_model_path(MODEL_CACHE)
    return path if path.is_dir() else build(MODEL_CACHE)


def wait_served(server, timeout_s: float = STARTUP_DEADLINE_S) -> float:
    def healthy() -> bool:
        if server.poll() is not None:
            pytest.fail(f"{server.name} exited ({server.poll()}):\n" + "\n".join(server.tail(40)))
        with contextlib.suppress(OSError):
            return http_json(f"{server.url}/health", timeout=5)[0] == 200
        return False

    return wait_until(healthy, timeout_s, f"{server.name} healthy at {server.url}", poll_s=1.0)


def completion(url: str, prompt: str) -> str:
    code, body = http_json(
        f"{url}/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert code == 200, body
    return body["choices"][0]["text"]


def tree_of(pid: int) -> list[psutil.Process]:
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


@pytest.mark.vllm
@requires_vllm
def test_server_on_an_actor_dies_with_it_and_starts_again(connected, model, tmp_path):
    """One real vLLM server hosted by an actor (role "plain": no KV connector).

    1. The actor is SIGKILLed. Measured: how soon ``poll()`` reports it, and
       that the server's whole tree (API server, engine core, worker) goes away
       on its own -- ``PR_SET_PDEATHSIG`` makes the API server shut its engine
       down. ``stop()`` then has nothing left to kill.
    2. ``start()`` again: a new placement group and actor; same answer. This
       time the API server is SIGSTOPped before its actor is SIGKILLed, so it
       cannot act on its SIGTERM (a wedged server): ``stop()`` stops what is
       left of the tree from a task on the node, SIGKILLing the API server.
    3. Once more, and this time the API server itself is SIGKILLed: the actor
       lives on and reports the exit code; ``stop()`` asks it to stop the rest.
    """
    from watchdog_kv.supervisor.ray import ACTOR_LOST_EXIT_CODE, RayServer

    run_dir = tmp_path / "run"
    server = RayServer(
        make_spec(model), run_dir, address=connected.address, placement_timeout_s=30.0
    )
    tree: list[psutil.Process] = []

    def serve() -> tuple[dict, str]:
        """Start, answer one prompt, see the whole tree; where it runs and the answer."""
        nonlocal tree
        began = time.monotonic()
        server.start()
        print(f"start() returned after {time.monotonic() - began:.1f} s")
        where = server.where()
        assert where["backend"] == "ray"
        assert set(where) >= {"node_ip", "node_id", "actor_id", "actor_pid", "placement_group"}
        assert server.url == f"http://{where['node_ip']}:{server.spec.port}"
        assert server.poll() is None
        print(f"healthy after {wait_served(server):.1f} s more")
        answer = completion(server.url, "The watchdog watches")
        assert server.log_path.is_file()  # one node: the log is where it says
        assert server.tail(5)
        actor = psutil.Process(where["actor_pid"])
        assert server.pid in {c.pid for c in actor.children()}  # hosted by that actor
        wait_until(lambda: len(tree_of(server.pid)) >= 3, 30, "the engine's processes seen")
        time.sleep(2 * 0.5)  # two polls: the watch has seen the whole tree
        tree = tree_of(server.pid)
        return where, answer

    def serve_then_kill_actor(*, wedge: bool) -> tuple[dict, str]:
        """Serve, then SIGKILL the actor; where it ran and the answer."""
        where, answer = serve()
        if wedge:
            os.kill(server.pid, signal.SIGSTOP)
        os.kill(where["actor_pid"], signal.SIGKILL)
        noticed = wait_until(lambda: server.poll() is not None, 10, "poll() reports the dead actor")
        print(f"actor SIGKILLed: poll() said so after {noticed:.2f} s")
        assert server.poll() == ACTOR_LOST_EXIT_CODE
        assert server.tail(3)[-1].startswith("[ray] the actor hosting decode-0 died")
        assert "actor_died" in server.where()
        return where, answer

    def tree_gone() -> bool:
        return not any(alive(p.pid) for p in tree)

    try:
        first, answer = serve_then_kill_actor(wedge=False)
        gone = wait_until(tree_gone, 60, "the server's tree gone with its actor")
        print(f"the tree was gone {gone:.1f} s after poll() reported the dead actor")
        began = time.monotonic()
        assert server.stop(0.5) == []  # nothing left to kill
        assert time.monotonic() - began < 15
        assert our_placement_groups() == []

        second, again = serve_then_kill_actor(wedge=True)
        assert second["actor_id"] != first["actor_id"]
        assert second["placement_group"] != first["placement_group"]
        assert again == answer
        time.sleep(2)
        assert alive(server.pid)  # stopped: its SIGTERM is pending
        began = time.monotonic()
        killed = server.stop(0.5)
        print(f"stop(0.5) after a wedged server's actor died: {time.monotonic() - began:.1f} s")
        assert server.pid in killed
        wait_until(tree_gone, 10, "the wedged server's tree gone")

        third, again = serve()
        assert again == answer
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: server.poll() is not None, 10, "poll() reports the exit")
        assert server.poll() == -signal.SIGKILL
        assert "actor_died" not in server.where()
        assert alive(third["actor_pid"])
        began = time.monotonic()
        server.stop(5.0)
        print(f"stop(5) after the API server was SIGKILLed: {time.monotonic() - began:.1f} s")
        wait_until(tree_gone, 10, "the rest of the tree gone")
        wait_until(lambda: not alive(third["actor_pid"]), 10, "the actor ended (ray.kill)")
    finally:
        server.stop(5.0)
        for proc in tree:  # a failed assertion above must not leave vLLM running
            with contextlib.suppress(psutil.Error):
                proc.kill()
    assert our_placement_groups() == []
    wait_all_cpus_free()


_PLUGIN_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    address, model, state_dir = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    config = EngineArgs(
        model=model, enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3
    ).create_engine_config()

    def look(wrapper):
        import os, sys
        import vllm.plugins
        return {
            "pid": os.getpid(),
            "plugins_loaded": vllm.plugins.plugins_loaded,
            "watchdog_kv_imported": "watchdog_kv" in sys.modules,
            "vllm_plugins": os.environ.get("VLLM_PLUGINS"),
        }

    worker = ray.remote(RayWorkerWrapper).options(
        num_cpus=0,
        runtime_env={"env_vars": {"WATCHDOG_KV_STATE_DIR": state_dir}},
    ).remote(rpc_rank=0)
    before = ray.get(worker.__ray_call__.remote(look), timeout=120)
    error = None
    try:
        ray.get(worker.init_worker.remote([{
            "vllm_config": config,
            "local_rank": 0,
            "rank": 0,
            "distributed_init_method": "tcp://127.0.0.1:1",
            "is_driver_worker": True,
        }]), timeout=300)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    after = ray.get(worker.__ray_call__.remote(look), timeout=60)
    print("RESULT " + json.dumps({"before": before, "after": after, "error": error}))
    """
)


@pytest.mark.vllm
@requires_vllm
def test_plugin_loads_in_vllms_own_ray_worker_actor(ray_cluster, model, tmp_path):
    """vLLM's Ray worker actor class loads watchdog_kv through the plugin entry point.

    Covered: ``RayWorkerWrapper`` (the actor class of vLLM's Ray executor) created
    on the real cluster from a driver that built the ``VllmConfig``; before
    ``init_worker`` neither vLLM's general plugins nor watchdog_kv are loaded in
    that actor (and ``VLLM_PLUGINS`` is unset there); ``init_worker`` calls
    ``load_general_plugins()`` and watchdog_kv registers in the actor's process:
    its status record appears under ``WATCHDOG_KV_STATE_DIR`` (given to the
    actor through ``runtime_env``) with the actor's pid.

    Not covered: the rest of the Ray executor. It cannot run on the CPU platform
    (``ray_device_key`` is empty, so ``get_node_and_physical_gpu_ids`` raises
    "does not support ray"). Here ``init_worker`` goes on to construct vLLM's
    ``CPUWorker`` in the actor (it returned when measured, with
    ``gpu_memory_utilization=0.3``; the default 0.92 fails its memory check),
    but no device is initialised and no model loaded or run, so the hooks are
    installed yet never exercised on a Ray worker's steps. A Ray worker's
    process role is whatever :func:`watchdog_kv.process.detect` makes of it
    (printed, not asserted). ``init_worker`` failing after the plugin load
    would still pass: its outcome is printed.
    """
    state_dir = tmp_path / "state"
    driver_state = tmp_path / "driver-state"  # the driver registers too; kept apart
    env = base_env(WATCHDOG_KV_STATE_DIR=str(driver_state))
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PLUGIN_DRIVER, ray_cluster.address, str(model), str(state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"init_worker outcome: {result['error'] or 'returned'}")
    before, after = result["before"], result["after"]
    assert before["pid"] == after["pid"]  # the same actor process
    assert before["vllm_plugins"] is None
    assert before["plugins_loaded"] is False and before["watchdog_kv_imported"] is False
    assert after["plugins_loaded"] is True and after["watchdog_kv_imported"] is True
    record_path = state_dir / "procs" / f"{after['pid']}.json"
    assert record_path.is_file(), sorted(p.name for p in state_dir.rglob("*"))
    record = json.loads(record_path.read_text())
    assert record["pid"] == after["pid"]
    assert record["watchdog_kv_version"] and record["vllm_version"]
    print(f"record in the Ray worker actor: role={record['role']} hooks={record['hooks']}")


def on_ray(address: str, model: Path, prefill: int = 0) -> tuple[dict[str, str], list[str]]:
    """The environment and ``serve`` arguments of ``prefill`` prefills and one decode
    on the cluster at ``address`` (with no prefill the decode computes its prompts)."""
    env = base_env(WATCHDOG_KV_CACHE_DIR=str(MODEL_CACHE))
    env.pop("RAY_ADDRESS", None)
    env.pop("VLLM_PLUGINS", None)
    args = [
        "--backend",
        "ray",
        "--ray-address",
        address,
        "--prefill",
        str(prefill),
        "--decode",
        "1",
    ]
    return env, [*args, "--model", str(model)]


def ask(url: str, prompt: str) -> tuple[str, str]:
    """A greedy completion through the router: (text, X-Watchdog-Recovery)."""
    req = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["text"], resp.headers["X-Watchdog-Recovery"]


def kv_settled(svc, server: str) -> int:
    """Loads of ``server`` that ended, pulled or recomputed."""
    outcomes = kv_outcomes(svc, server)
    return outcomes["received"] + outcomes["recomputed"]


def recovery_causes(log: Path) -> list[str]:
    """The cause of every KV load the server logging to ``log`` recovered from."""
    return [e["cause"] for e in events(log.read_text()) if e["event"] == "kv.recovered"]


@pytest.mark.vllm
@requires_vllm
def test_serve_on_ray_hands_off_and_restarts_a_prefill_whose_actor_was_killed(
    ray_cluster, model, tmp_path
):
    """``watchdog-kv serve --backend ray --prefill 1 --decode 1`` on the local cluster.

    Both servers on actors, each in its own placement group; a completion
    through the router is prefilled on one actor and its KV pulled over NIXL
    by the other. Then the actor hosting prefill-0 is SIGKILLed (its pid from
    ``/watchdog/status``): requests keep completing, the same answer, computed
    by the decode; the supervisor restarts prefill-0 in a new placement group
    and actor, and the hand-off is used again. SIGTERM to the supervisor then
    stops both servers' trees through their actors.
    """
    env, args = on_ray(ray_cluster.address, model, prefill=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    began = time.monotonic()
    svc = start_service(
        run_dir, env, *args, "--placement-timeout", "60", "--served-model-name", "tiny"
    )
    print(f"service ready after {time.monotonic() - began:.1f} s")
    trees = []
    try:
        servers = svc.status()["servers"]
        for name in ("prefill-0", "decode-0"):
            where = servers[name]["where"]
            assert where["backend"] == "ray" and servers[name]["state"] == "ready", servers[name]
            url = servers[name]["url"]
            assert url == f"http://{where['node_ip']}:{url.rsplit(':', 1)[1]}"
        groups = {servers[n]["where"]["placement_group"] for n in ("prefill-0", "decode-0")}
        assert len(groups) == 2, "one placement group per server"
        prompts = [f"Ray {i}: the prefill's actor is killed and restarted." for i in range(3)]
        references = []
        for prompt in prompts:
            text, recovery = ask(svc.url, prompt)
            assert recovery == "none"  # prefilled on one actor, decoded on the other
            references.append(text)
        # Every load settles: pulled over NIXL, or -- the one fallback allowed
        # here -- recomputed because the prefill's lease answer came after the
        # verify deadline (fail-closed; seen in CI on this loaded 2-core machine).
        wait_until(
            lambda: kv_settled(svc, "decode-0") >= len(prompts),
            10,
            "the decode settling its loads of the prefill's KV",
            poll_s=0.5,
            detail=lambda: kv_status(svc),
        )
        received = kv_outcomes(svc, "decode-0")["received"]
        decode_log = run_dir / "logs" / "decode-0.log"
        assert set(recovery_causes(decode_log)) <= {"deadline:verify"}, kv_status(svc)
        assert received >= 1, f"no KV pulled over NIXL: {kv_status(svc)}"
        print(f"KV pulled for {received} of {len(prompts)} prompts")

        where = servers["prefill-0"]["where"]
        os.kill(where["actor_pid"], signal.SIGKILL)
        began = time.monotonic()
        # At once: the dying API server may still answer (its SIGTERM starts vLLM's
        # shutdown) or be gone; either way the same answer.
        assert ask(svc.url, prompts[0])[0] == references[0]
        wait_until(
            lambda: svc.status()["servers"]["prefill-0"]["state"] != "ready",
            30,
            "the supervisor seeing prefill-0 gone",
            poll_s=0.2,
        )
        for prompt, reference in zip(prompts, references, strict=True):
            text, recovery = ask(svc.url, prompt)
            assert text == reference
            assert "decode_computes_prompt" in recovery, recovery

        def back() -> bool:
            state = svc.status()["servers"]["prefill-0"]
            return len(state["restarts"]) == 1 and state["state"] == "ready"

        wait_until(back, STARTUP_DEADLINE_S, "prefill-0 restarted and ready", poll_s=1.0)
        print(f"prefill restarted and ready {time.monotonic() - began:.1f} s after the kill")
        state = svc.status()["servers"]["prefill-0"]
        assert state["restarts"][0]["cause"] == "exited with signal SIGKILL", state["restarts"]
        assert state["where"]["actor_id"] != where["actor_id"]
        assert state["where"]["placement_group"] != where["placement_group"]
        assert ask(svc.url, prompts[0]) == (references[0], "none")
        # Prompts the decode has not computed itself (its prefix cache would
        # leave nothing to pull); status records are written about once a second.
        # As above, a load may settle by a fail-closed recompute; one must be pulled.
        settled = kv_settled(svc, "decode-0")
        recovered = len(recovery_causes(decode_log))  # some while prefill-0 was dying
        fresh = [f"Ray {i}: new prompts after the restart." for i in range(3)]
        for prompt in fresh:
            assert ask(svc.url, prompt)[1] == "none"
        wait_until(
            lambda: kv_settled(svc, "decode-0") >= settled + len(fresh),
            10,
            "the decode settling its loads from the restarted prefill",
            poll_s=0.5,
            detail=lambda: kv_status(svc),
        )
        assert set(recovery_causes(decode_log)[recovered:]) <= {"deadline:verify"}
        assert kv_outcomes(svc, "decode-0")["received"] > received, kv_status(svc)
        trees = [tree_of(s["pid"]) for s in svc.status()["servers"].values()]
        assert all(len(tree) >= 3 for tree in trees)
    finally:
        stop_service(svc)
    assert svc.proc.returncode == 0, svc.stderr_path.read_text()[-3000:]
    assert not [p.pid for tree in trees for p in tree if alive(p.pid)]  # stopped via actors
    import ray

    if ray.is_initialized():
        assert our_placement_groups() == []


@pytest.mark.vllm
@requires_vllm
def test_serve_on_ray_a_server_never_healthy_is_a_clear_error_within_the_deadline(
    connected, model, tmp_path
):
    """``--startup-timeout 5`` on Ray: vLLM needs far longer to answer /health here, so
    the service must give up after about 5 s with the error naming the server and its
    log, and leave no placement group or reserved CPU behind."""
    env, args = on_ray(connected.address, model)
    began = time.monotonic()
    proc = subprocess.run(
        cli(
            "serve",
            "--port",
            str(free_port()),
            "--run-dir",
            str(tmp_path / "run"),
            *args,
            "--startup-timeout",
            "5",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [e for e in events(proc.stderr) if e["event"] == "service.startup_failed"]
    assert failed, proc.stderr[-3000:]
    assert "vLLM server decode-0 was not healthy within 5 s; last log lines" in failed[0]["error"]
    assert took < 5 + 60, took  # placement, the deadline, and stopping through the actor
    wait_until(lambda: not our_placement_groups(), 15, "our placement groups removed")
    wait_all_cpus_free()
