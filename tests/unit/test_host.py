"""Host fixes and checks: AMX tile permission, OpenMP core claims, the doctor's table.

The AMX logic is driven through a fake kernel (this project's CI host may have
no AMX, and a real grant cannot be taken back); the real ``arch_prctl`` is
called too, where it can only answer for this host. AMX instructions
themselves run only in tests/integration/test_amx.py, on AMX hosts.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from watchdog_kv import config, doctor, process
from watchdog_kv.host import amx, cpus

AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n"
PLAIN_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n"
TILE = 1 << amx.XFEATURE_XTILEDATA


class FakeKernel:
    """arch_prctl as a kernel with AMX would answer; ``refuse`` errnos come first."""

    def __init__(self, supported=TILE | 0b11, permitted=0b11, refuse=()):
        self._supported, self._permitted = supported, permitted
        self.refuse = list(refuse)
        self.requests: list[int] = []
        self.altstacks = 0

    def supported(self):
        return self._supported

    def permitted(self):
        return self._permitted

    def request(self, feature):
        self.requests.append(feature)
        if self.refuse:
            return self.refuse.pop(0)
        self._permitted |= 1 << feature
        return 0

    def enlarge_altstack(self):
        self.altstacks += 1
        return "replaced the calling thread's 8192-byte signal stack"


def ask(kernel, cpuinfo=AMX_CPUINFO):
    return amx.request_permission(kernel, cpuinfo, cached=False)


def test_amx_flags_are_read_from_cpuinfo():
    assert amx.amx_flags(AMX_CPUINFO) == ("amx_bf16", "amx_int8", "amx_tile")
    assert amx.amx_flags(PLAIN_CPUINFO) == ()
    assert amx.amx_flags("") == ()


def test_a_cpu_without_amx_is_left_alone():
    kernel = FakeKernel()
    state = ask(kernel, PLAIN_CPUINFO)
    assert state == amx.AmxState()  # nothing found, nothing done
    assert kernel.requests == [] and not state.offered
    assert "no AMX" in state.describe()


def test_permission_is_requested_once_and_granted():
    kernel = FakeKernel()
    state = ask(kernel)
    assert kernel.requests == [amx.XFEATURE_XTILEDATA]
    assert (state.kernel_supports, state.permitted_before, state.permitted) == (True, False, True)
    assert state.action == "requested" and state.offered
    assert state.as_dict()["offered"] is True


def test_already_permitted_is_not_asked_again():
    kernel = FakeKernel(permitted=TILE)
    state = ask(kernel)
    assert kernel.requests == [] and state.action == "already_permitted" and state.permitted


def test_a_kernel_without_amx_support_is_reported_not_asked():
    kernel = FakeKernel(supported=0b11)
    state = ask(kernel)
    assert kernel.requests == [] and state.kernel_supports is False and not state.offered
    assert "Linux < 5.16" in state.describe()


def test_a_too_small_signal_stack_is_replaced_and_the_request_repeated():
    kernel = FakeKernel(refuse=[errno.ENOSPC])
    state = ask(kernel)
    assert kernel.requests == [amx.XFEATURE_XTILEDATA] * 2 and kernel.altstacks == 1
    assert state.permitted and state.action == "requested"
    assert "signal stack" in state.detail


def test_a_refusal_that_stays_is_reported_with_its_reason():
    kernel = FakeKernel(refuse=[errno.ENOSPC, errno.ENOSPC])
    state = ask(kernel)
    assert not state.permitted and state.action == "failed"
    assert "alternate signal stack too small" in state.detail
    assert "NOT granted" in state.describe()
    kernel = FakeKernel(refuse=[errno.EPERM])
    state = ask(kernel)
    assert state.action == "failed" and os.strerror(errno.EPERM) in state.detail


def test_request_permission_is_idempotent_per_process(monkeypatch):
    kernel = FakeKernel()
    monkeypatch.setattr(amx, "_done", {})
    first = amx.request_permission(kernel, AMX_CPUINFO)
    again = amx.request_permission(kernel, AMX_CPUINFO)
    assert first is again and kernel.requests == [amx.XFEATURE_XTILEDATA]


def test_the_real_kernel_answers_for_this_host():
    """No fake: arch_prctl through libc. On a host without AMX nothing is asked."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("arch_prctl is x86_64 Linux")
    kernel = amx.LinuxKernel()
    supported = kernel.supported()
    assert supported is not None and supported & 0b11 == 0b11  # x87 and SSE, always
    state = amx.request_permission(cached=False)
    if "amx_tile" not in amx.amx_flags():
        assert state == amx.AmxState() and not supported & TILE
    else:
        assert state.permitted, state.describe()


def test_tile_code_is_what_the_assembler_makes():
    """ldtilecfg (%rdi); tilezero %tmm0; tilerelease; ret -- checked against GNU as."""
    if subprocess.run(["which", "as"], capture_output=True).returncode != 0:
        pytest.skip("GNU as is not installed on this host")
    asm = "ldtilecfg (%rdi)\ntilezero %tmm0\ntilerelease\nret\n"
    obj = Path(os.environ.get("TMPDIR", "/tmp")) / f"wkv-tiles-{os.getpid()}.o"
    done = subprocess.run(["as", "-o", str(obj), "-"], input=asm, text=True, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"this assembler does not know AMX: {done.stderr.strip()}")
    dump = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True).stdout
    obj.unlink()
    code = bytes.fromhex(
        "".join(
            line.split("\t")[1] for line in dump.splitlines() if re.match(r"^\s*[0-9a-f]+:\t", line)
        ).replace(" ", "")
    )
    assert code == amx._TILE_CODE


# -- OpenMP core claims -----------------------------------------------------------------


def test_rebind_keeps_free_cores_and_moves_ranks_off_held_ones():
    # vLLM's auto choice [[0]] while another engine holds core 0: core 1 is free
    assert cpus.rebind([[0]], {0, 1}, {0}) == [[1]]
    # partly held: the free part is kept
    assert cpus.rebind([[0, 1, 2, 3]], set(range(8)), {0, 1}) == [[2, 3]]
    # two ranks both held: the free cores are shared out
    assert cpus.rebind([[0, 1], [2, 3]], set(range(8)), {0, 1, 2, 3}) == [[4, 5], [6, 7]]
    # every core held: nothing to do but warn
    assert cpus.rebind([[0, 1]], {0, 1}, {0, 1}) is None
    # a free core that must be avoided (reserved by vLLM, or a held core's SMT sibling)
    assert cpus.rebind([[0]], {0, 1, 2}, {0}, avoid={1}) == [[2]]
    assert cpus.rebind([[0]], {0, 1}, {0}, avoid={1}) is None


def test_siblings_are_read_from_the_topology():
    assert 0 in cpus.siblings({0})
    assert cpus._parse_list("0-2,5\n") == {0, 1, 2, 5}


def test_a_claims_lock_held_too_long_is_given_up_on(tmp_path):
    import fcntl

    folder = _claims(tmp_path)
    with open(folder / ".lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process's lock (flock is per open file)
        with pytest.raises(cpus.ClaimsBusy), cpus._locked(folder, wait_s=0.2):
            pass


def _claims(tmp_path):
    folder = tmp_path / "cpus"
    folder.mkdir(mode=0o700)
    return folder


def test_claims_of_live_engines_are_compared_and_dead_ones_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "siblings", lambda cores: set(cores))  # as if no SMT here
    folder = _claims(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        first, shared, before = cpus.settle([[0]], False, "decode-0", folder, {0, 1}, pid=other.pid)
        assert shared == [] and before is None and first.source == "operator"
        assert first.started == process.start_ticks(other.pid) is not None
        # an operator's binding onto the same core: kept, and the overlap named
        mine, shared, before = cpus.settle([[0]], False, "decode-1", folder, {0, 1})
        assert mine.cores == [[0]] and before is None
        assert [(o.server, c) for o, c in shared] == [("decode-0", {0})]
        # vLLM's auto choice onto the same core: moved to the free one, even though vLLM
        # reserved that one for the engine's other threads (better than a shared core)
        mine, shared, before = cpus.settle([[0]], True, "decode-1", folder, {0, 1}, reserved={1})
        assert (mine.cores, before, shared, mine.source) == ([[1]], [[0]], [], "watchdog_kv")
        assert mine.bind_value() == "1"
    finally:
        other.kill()
        other.wait()
    # the other engine is gone: its claim no longer counts and its file goes
    assert [c.pid for c in cpus.read_claims(folder)] == [os.getpid()]
    assert not (folder / f"{other.pid}.json").exists()


def test_a_reused_pid_is_not_the_engine_that_claimed(tmp_path):
    folder = _claims(tmp_path)
    mine = process.start_ticks(os.getpid())
    assert mine is not None
    stale = cpus.Claim(os.getpid(), "old", [[0]], "operator", started=mine - 100)
    cpus._write(folder, stale)
    assert cpus.read_claims(folder) == []


def test_the_claims_folder_must_be_private(tmp_path):
    mine = tmp_path / "mine"
    assert cpus._private(mine) and (os.stat(mine).st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not cpus._private(shared)
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not cpus._private(link)


def test_the_hook_claims_in_vllms_omp_manager_and_can_be_removed(tmp_path, monkeypatch):
    """The wrapper around OMPProcessManager._parse_omp_threads_bind_env, on a stand-in
    module (vLLM's is used in the integration tests): vLLM parses, then we adjust."""
    import types

    from watchdog_kv.instrument.base import Target
    from watchdog_kv.instrument.openmp import OpenMPInstrumentor

    monkeypatch.setattr(cpus, "claims_dir", lambda: _claims(tmp_path))

    class OMPProcessManager:
        def _parse_omp_threads_bind_env(self):
            self.skip_setup, self.auto_setup, self.cpu_lists = False, True, [[0]]

    module = types.ModuleType("wkv_stand_in_omp")
    module.OMPProcessManager = OMPProcessManager
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class Stand_in(OpenMPInstrumentor):
        targets = (Target(module.__name__, "OMPProcessManager", "_parse_omp_threads_bind_env"),)

    published = []
    inst = Stand_in("decode-0", published.append)
    assert inst.instrument(config.load({}))
    try:
        assert inst.hooks() == ["host.cpu_claims"]
        manager = OMPProcessManager()
        manager._parse_omp_threads_bind_env()
        assert manager.cpu_lists == [[0]]  # nobody else holds a core: vLLM's choice stands
        assert published[-1]["cores"] == [[0]] and published[-1]["overlaps"] == {}
    finally:
        inst.uninstrument()
    manager = OMPProcessManager()
    original = vars(OMPProcessManager)["_parse_omp_threads_bind_env"]
    assert original.__name__ == "_parse_omp_threads_bind_env"  # put back
    manager._parse_omp_threads_bind_env()
    assert len(published) == 1


# -- the doctor ------------------------------------------------------------------------------


def test_doctor_rows_on_this_host(tmp_path):
    findings = doctor.check(doctor.Plan(state_dir=tmp_path, ports=()), only_fast=True)
    names = [f.name for f in findings]
    assert names == ["amx", "open files", "cores", "cpu bindings", "disk", "ports"]
    assert all(f.status in doctor.STATUSES for f in findings)
    text = doctor.render(findings)
    assert text.count("\n") >= len(findings)


def test_amx_row_says_fixed_when_the_plugin_asks_and_problem_when_it_is_off(monkeypatch):
    monkeypatch.setattr(amx, "amx_flags", lambda cpuinfo=None: ("amx_bf16", "amx_tile"))
    probes = {
        False: amx.ProbeResult(False, -4, ""),
        True: amx.ProbeResult(True, 0, "tiles ran"),
    }
    monkeypatch.setattr(amx, "probe_tiles", lambda ask, timeout_s=30.0: probes[ask])
    isa = {"isa": {"ok": True, "detail": "amx"}}
    fixed = doctor._amx(isa, plugin_enabled=True)
    assert fixed.status == "fixed" and "stock vLLM would crash" in fixed.detail
    off = doctor._amx(isa, plugin_enabled=False)
    assert off.status == "problem" and "WATCHDOG_KV_ENABLED=1" in off.fix
    probes[True] = amx.ProbeResult(True, 3, "AMX tile permission NOT granted: EPERM")
    refused = doctor._amx(isa, plugin_enabled=True)
    assert refused.status == "problem" and "--dtype=float32" in refused.fix
    probes[True] = amx.ProbeResult(True, -4, "")  # asked, granted, and still SIGILL
    assert doctor._amx(isa, plugin_enabled=True).status == "problem"
    # the probe cannot run here (no executable memory, a timeout): not the host's problem
    probes[False] = amx.ProbeResult(False, -11, "")
    probes[True] = amx.ProbeResult(True, -11, "")
    unknown = doctor._amx(isa, plugin_enabled=True)
    assert unknown.status == "warn" and "could not probe" in unknown.detail
    probes[False] = amx.ProbeResult(False, 0, "tiles ran")
    assert doctor._amx(isa, plugin_enabled=False).status == "ok"


def test_broken_wheels_are_a_problem_with_the_fix(monkeypatch):
    monkeypatch.setattr(doctor, "_installed", lambda name: name == "torchvision")
    monkeypatch.setattr(
        doctor, "_probe", lambda code, timeout=300: (False, "operator torchvision::nms")
    )
    row = doctor._wheels()
    assert row.status == "problem" and "torchvision" in row.detail
    assert "doctor --fix" in row.fix
    assert doctor.blocking([row]) == [row]


def test_ports_taken_are_a_problem_only_when_they_will_be_bound():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert doctor._ports("127.0.0.1", [("router", port)], True).status == "problem"
        assert doctor._ports("127.0.0.1", [("router", port)], False).status == "warn"


def test_serve_refuses_to_start_on_a_problem(monkeypatch, capsys, tmp_path):
    from watchdog_kv import cli

    monkeypatch.setenv("WATCHDOG_KV_STATE_DIR", str(tmp_path))
    bad = doctor.Finding("wheels", "problem", "torchvision broken", "watchdog-kv doctor --fix")
    monkeypatch.setattr(doctor, "check", lambda plan=None, only_fast=False: [bad])
    assert cli.main(["serve", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "not starting" in err and "torchvision broken" in err and "doctor --fix" in err


def test_the_larger_signal_stack_is_installed_and_outlives_who_made_it():
    """The real sigaltstack path (any x86_64 Linux host): faulthandler's stack replaced by
    a 256 KiB one that stays allocated, and a fatal signal is still dumped on it."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("x86_64 Linux only")
    code = (
        "import ctypes, faulthandler, gc, signal\n"
        "from watchdog_kv.host import amx\n"
        "faulthandler.enable()\n"
        "kernel = amx.LinuxKernel()\n"
        "print(kernel.enlarge_altstack(), flush=True)\n"
        "del kernel; gc.collect()\n"
        "class S(ctypes.Structure):\n"
        "    _fields_ = [('sp', ctypes.c_void_p), ('flags', ctypes.c_int), "
        "('size', ctypes.c_size_t)]\n"
        "now = S()\n"
        "assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(now)) == 0\n"
        "assert now.size == amx._ALTSTACK_BYTES and len(amx._STACKS) == 1, now.size\n"
        "assert now.sp == ctypes.addressof(amx._STACKS[0])\n"
        "signal.raise_signal(signal.SIGILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGILL, done.stderr
    assert done.stdout.startswith("replaced the calling thread's ")
    assert "Fatal Python error: Illegal instruction" in done.stderr
