"""The layout's rules, checked on the source (no vLLM needed; the lint session runs it).

* Only ``watchdog_kv/instrument/`` touches vLLM: no other module reads a private
  name that watchdog_kv does not define itself (``x._recving_transfers``), and the
  watchdog logic (``kv/``, ``step/``, the stall rules, the wire, the beacon) imports
  no vLLM at all.
* What runs outside the vLLM processes (``monitor/``, ``supervisor/``, ``router/``)
  imports nothing that runs inside them (``instrument/``, ``kv/``, ``step/``,
  ``plugin``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "watchdog_kv"
ADAPTERS = ("instrument",)
NO_VLLM = ("kv", "step", "stalls.py", "wire.py", "beacon.py", "monitor", "guard.py")
OUTSIDE = ("monitor", "supervisor", "router")
# Private names of the standard library watchdog_kv reads, by design.
STDLIB_PRIVATE = {"_exit", "_value2member_map_"}  # os._exit, an Enum's value map
INSIDE = ("watchdog_kv.instrument", "watchdog_kv.kv", "watchdog_kv.step", "watchdog_kv.plugin")


def _modules() -> dict[str, ast.Module]:
    return {
        str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every name watchdog_kv defines outside the adapters: functions, classes,
    arguments, assigned names and attributes, imported names. (An adapter's
    assignment to one of vLLM's private attributes defines nothing of ours.)"""
    names: set[str] = set()
    for path, tree in trees.items():
        if _under(path, ADAPTERS):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
    return names


def _under(path: str, parts: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in parts)


def _foreign_private_reads(trees: dict[str, ast.Module]) -> list[str]:
    own = _own_names(trees) | STDLIB_PRIVATE
    found = []
    for path, tree in trees.items():
        if _under(path, ADAPTERS):
            continue
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                name = node.attr
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                name = next((a.name for a in node.names if a.name.startswith("_")), None)
            if name and name.startswith("_") and not name.startswith("__") and name not in own:
                found.append(f"{path}:{node.lineno}: {name}")
    return found


def test_only_the_instrumentors_read_vllms_private_names():
    assert _foreign_private_reads(_modules()) == []


def test_the_check_finds_a_private_read_outside_the_instrumentors():
    """The rule can fail: a read of NixlConnector's insides put into the KV watch."""
    trees = _modules()
    trees["kv/worker.py"].body.append(
        ast.parse("def peek(worker):\n    return worker._recving_transfers\n").body[0]
    )
    assert [f for f in _foreign_private_reads(trees) if f.startswith("kv/worker.py")] == [
        "kv/worker.py:2: _recving_transfers"
    ]


@pytest.mark.parametrize("path", sorted(p for p in _modules() if _under(p, NO_VLLM)))
def test_the_watchdog_logic_imports_no_vllm(path):
    tree = _modules()[path]
    imported = [
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    ]
    assert not [m for m in imported if m == "vllm" or m.startswith(("vllm.", "torch"))], path


@pytest.mark.parametrize("path", sorted(p for p in _modules() if _under(p, OUTSIDE)))
def test_code_outside_vllm_imports_nothing_that_runs_inside_it(path):
    tree = _modules()[path]
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if m.startswith(INSIDE)], path
