"""OpenMP core bindings of the vLLM engines on one host: claimed, compared, not shared.

On CPU each vLLM worker binds its OpenMP threads to cores, chosen in the engine
core (``OMPProcessManager`` in ``vllm/utils/ompmultiprocessing.py``) from
``VLLM_CPU_OMP_THREADS_BIND``: ``auto`` (the default) takes every core of a
NUMA node but those it reserves, the same cores for every server. Two servers
started by hand on one host then spin their OpenMP threads on the same cores,
and their steps slow down until the step watchdog may declare them stalled
(docs/host-problems.md, "Cores and OpenMP bindings").

Each engine core the plugin loads into *claims* its workers' cores in a
directory shared by every vLLM process of the user on the host
(``<default state dir>/cpus/<pid>.json``, under a file lock), and compares its
cores with the live claims of the others:

* binding left on ``auto``: cores another live engine holds are given up when
  cores nobody holds remain (``watchdog_kv`` rebinds, in vLLM's own manager,
  before any worker starts); when none remain, it warns;
* binding set by the operator (or the supervisor): kept as it is; an overlap
  is a warning (``cpus.overlap``) naming the other server and the fix.

The claim is in the engine core's status record (``cpus``), and
``watchdog-kv doctor`` lists overlaps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchdog_kv import process
from watchdog_kv.telemetry import get_logger

__all__ = [
    "OMP_MODULE",
    "Claim",
    "claim_for",
    "claims_dir",
    "overlaps",
    "read_claims",
    "rebind",
]

OMP_MODULE = "vllm.utils.ompmultiprocessing"
_log = get_logger("watchdog_kv.host")


def claims_dir() -> Path:
    """Shared by every vLLM process of this user on the host, whatever its state dir."""
    from watchdog_kv.config import default_state_dir

    return default_state_dir() / "cpus"


def _private(path: Path) -> bool:
    """A directory of ours: owned by this user, not a symlink, not writable by others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


@dataclass
class Claim:
    """The cores one engine core's workers use (one list per local rank)."""

    pid: int
    server: str | None
    cores: list[list[int]]
    source: str  # operator | vllm_auto | watchdog_kv
    started: int | None = None  # the engine core's start, in ticks (a reused pid is not it)
    claimed_wall: float = field(default_factory=time.time)

    def held(self) -> set[int]:
        return {c for rank in self.cores for c in rank}

    def bind_value(self) -> str:
        """The claim as ``VLLM_CPU_OMP_THREADS_BIND`` writes it (``0-1|2-3``)."""
        return "|".join(",".join(str(c) for c in rank) for rank in self.cores)

    def describe(self) -> str:
        return f"{self.server or 'a vLLM server'} (engine core pid {self.pid})"


def _live(claim: Claim) -> bool:
    return process.running(claim.pid, claim.started)


def read_claims(folder: Path | None = None) -> list[Claim]:
    """The claims of live engine cores (a dead one's file is removed on the way)."""
    folder = folder or claims_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            claim = Claim(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _live(claim):
            out.append(claim)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


def overlaps(mine: Claim, others: list[Claim]) -> list[tuple[Claim, set[int]]]:
    """The other claims sharing a core with ``mine``, and which cores."""
    held = mine.held()
    return [(o, held & o.held()) for o in others if o.pid != mine.pid and held & o.held()]


def siblings(cores: set[int]) -> set[int]:
    """``cores`` and their SMT siblings (the other logical CPUs of the same physical
    cores): a sibling of a busy core is no free core."""
    out = set(cores)
    for core in cores:
        path = Path(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
        with contextlib.suppress(OSError, ValueError):
            out |= _parse_list(path.read_text())
    return out


def _parse_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def rebind(
    lists: list[list[int]], allowed: set[int], held: set[int], avoid: set[int] | None = None
) -> list[list[int]] | None:
    """Per-rank core lists like ``lists`` that avoid the ``held`` cores, using only
    ``allowed`` ones and none of ``avoid`` (vLLM's reserved cores, siblings of held ones);
    None when that cannot be done (every free core is taken)."""
    ours = {c for rank in lists for c in rank}
    pool = sorted(allowed - held - ours - (avoid or set()))
    needy = [i for i, rank in enumerate(lists) if not set(rank) - held]
    out = []
    for i, rank in enumerate(lists):
        keep = [c for c in rank if c not in held]
        if not keep:
            if not pool:
                return None
            share = max(1, len(pool) // len(needy))
            keep, pool = pool[:share], pool[share:]
            needy.remove(i)
        out.append(keep)
    return out


LOCK_WAIT_S = 5.0  # a holder that is stopped or wedged must not hold up vLLM's start


class ClaimsBusy(RuntimeError):
    """The claims lock was not free within :data:`LOCK_WAIT_S`."""


@contextlib.contextmanager
def _locked(folder: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    with open(folder / ".lock", "a") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ClaimsBusy(f"{folder / '.lock'} held for over {wait_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(folder: Path, claim: Claim) -> Path:
    return process.write_json(folder / f"{claim.pid}.json", asdict(claim), indent=None)


def settle(
    lists: list[list[int]],
    auto: bool,
    server: str | None,
    folder: Path,
    allowed: set[int],
    pid: int | None = None,
    reserved: set[int] | None = None,
) -> tuple[Claim, list[tuple[Claim, set[int]]], list[list[int]] | None]:
    """Claim cores for an engine about to start its workers: (the claim, the overlaps
    left, the old lists when they were changed). ``reserved``: the cores vLLM keeps
    for this engine's other threads, never given to a worker."""
    pid = os.getpid() if pid is None else pid
    with _locked(folder):
        others = [c for c in read_claims(folder) if c.pid != pid]
        held = {core for other in others for core in other.held()}
        before = None
        source = "vllm_auto" if auto else "operator"
        if auto and held & {c for rank in lists for c in rank}:
            # best: a core no one uses, not one vLLM reserves for this engine's other
            # threads, not a sibling of a held core; failing that, a reserved core (a
            # mostly idle engine thread beats another server's spinning OpenMP threads);
            # failing that, a held core's sibling
            sibs = siblings(held) - held
            for avoid in (sibs | (reserved or set()), sibs, set()):
                moved = rebind(lists, allowed, held, avoid)
                if moved is not None:
                    before, lists, source = lists, moved, "watchdog_kv"
                    break
        claim = Claim(pid, server, [list(r) for r in lists], source, process.start_ticks(pid))
        _write(folder, claim)
    return claim, overlaps(claim, others), before


def claim_for(
    lists: list[list[int]],
    auto: bool,
    reserved: set[int],
    server: str | None,
    publish: Callable[[dict[str, Any]], None] | None,
) -> list[list[int]] | None:
    """The engine built here binds its workers' OpenMP threads to ``lists`` (vLLM's
    choice; ``auto``: its own pick): claim them host-wide and warn about overlaps;
    return the cores to use instead when vLLM's ``auto`` choice was moved off cores
    other servers hold, else None."""
    folder = claims_dir()
    if not _private(folder):
        _log.warning("cpus.claims_skipped", folder=str(folder), reason="not a private directory")
        return None
    try:
        claim, shared, before = settle(
            lists, auto, server, folder, set(os.sched_getaffinity(0)), reserved=reserved
        )
    except ClaimsBusy as exc:
        _log.warning("cpus.claims_skipped", folder=str(folder), reason=str(exc))
        return None
    if before is not None:
        _log.warning(
            "cpus.rebound",
            was=before,
            now=claim.cores,
            reason="other vLLM servers on this host hold those cores",
        )
    for other, cores in shared:
        _log.warning(
            "cpus.overlap",
            cores=sorted(cores),
            other=other.describe(),
            consequence="their OpenMP threads spin on the same cores: steps slow down and "
            "may be declared stalled",
            fix="give each server its own cores with VLLM_CPU_OMP_THREADS_BIND "
            f"(this one has {claim.bind_value()!r}, the other {other.bind_value()!r})",
        )
    if publish is not None:
        publish(asdict(claim) | {"overlaps": {o.describe(): sorted(c) for o, c in shared}})
    return claim.cores if before is not None else None
