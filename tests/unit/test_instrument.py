"""Instrumentors: reversible, idempotent, honest about what they installed.

The wrapping mechanics run on stand-in classes and modules (no vLLM needed: these
also run in the lint session, which has no vLLM); the last tests install the real
instrumentors into vLLM's own classes, in fresh interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog_kv import config
from watchdog_kv.instrument.base import Instrumentor, Target, active_layers, unwrap, wrap


class Thing:
    def f(self, x: int) -> int:
        return x + 1


ORIGINAL = vars(Thing)["f"]


def _tagger(tag: str, calls: list[str]):
    def wrapper(wrapped, instance, args, kwargs):
        calls.append(tag)
        return wrapped(*args, **kwargs)

    return wrapper


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30),
    st.booleans(),
)
def test_wrappers_on_one_target_undone_in_any_order(ops, on_instance):
    """Any sequence of wraps and unwraps on one attribute (a class's method or a live
    object's): a call goes through exactly the wrappers still in place, newest outside,
    and with none left the attribute is the original again."""
    owner = Thing() if on_instance else Thing
    calls: list[str] = []
    live: list[tuple[str, object]] = []  # oldest first
    made = 0
    for add, pick in ops:
        if add or not live:
            tag = f"w{made}"
            made += 1
            live.append((tag, wrap(owner, "f", _tagger(tag, calls))))
        else:
            tag, layer = live.pop(pick % len(live))
            unwrap(layer)
        calls.clear()
        assert (owner if on_instance else Thing()).f(1) == 2
        assert calls == [t for t, _ in reversed(live)]
        assert active_layers(owner, "f") == len(live)
    for _, layer in live:
        unwrap(layer)
    assert vars(Thing)["f"] is ORIGINAL
    if on_instance:
        assert "f" not in vars(owner)


def _stand_in_module(name: str, with_g: bool = True) -> types.ModuleType:
    module = types.ModuleType(name)

    class Engine:
        def step(self) -> str:
            return "stepped"

        if with_g:

            def g(self) -> str:
                return "g"

    module.Engine = Engine
    return module


class Counting(Instrumentor):
    name = "test.counting"

    def __init__(self, module: str) -> None:
        super().__init__()
        self.targets = (Target(module, "Engine", "step"), Target(module, "Engine", "g"))
        self.calls: list[str] = []
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def wrapper(self, target: Target):
        return _tagger(target.name, self.calls)


def test_instrument_is_idempotent_and_reinstalls_exactly_once(monkeypatch):
    module = _stand_in_module("wkv_stand_in_a")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    inst = Counting(module.__name__)
    cfg = config.load({})
    for _ in range(3):  # instrument -> uninstrument -> instrument ... in one process
        assert inst.instrument(cfg) and inst.instrument(cfg)  # the second is a no-op
        assert active_layers(module.Engine, "step") == 1
        assert sorted(inst.patched) == [
            "wkv_stand_in_a:Engine.g",
            "wkv_stand_in_a:Engine.step",
        ]
        inst.calls.clear()
        assert module.Engine().step() == "stepped" and inst.calls == ["step"]
        inst.uninstrument()
        inst.uninstrument()
        assert active_layers(module.Engine, "step") == 0 and inst.patched == []
        inst.calls.clear()
        module.Engine().step()
        assert inst.calls == []
    assert inst.setups == 3


def test_a_module_imported_later_is_wrapped_when_it_is_imported(monkeypatch, tmp_path):
    (tmp_path / "wkv_stand_in_late.py").write_text(
        "class Engine:\n    def step(self):\n        return 'stepped'\n"
        "    def g(self):\n        return 'g'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    inst = Counting("wkv_stand_in_late")
    assert inst.instrument(config.load({}))
    assert inst.patched == []  # nothing imported, nothing claimed
    changed = []
    inst.on_change = lambda: changed.append(list(inst.patched))
    try:
        import wkv_stand_in_late  # noqa: F401

        assert len(inst.patched) == 2 and changed
        assert active_layers(sys.modules["wkv_stand_in_late"].Engine, "step") == 1
    finally:
        inst.uninstrument()
        sys.modules.pop("wkv_stand_in_late", None)


def test_a_missing_target_keeps_the_instrumentor_off_and_says_which(monkeypatch):
    module = _stand_in_module("wkv_stand_in_b", with_g=False)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    inst = Counting(module.__name__)
    assert not inst.instrument(config.load({}))
    assert inst.patched == [] and not inst.active
    assert inst.off_reason == "missing in this vLLM: wkv_stand_in_b:Engine.g"
    assert active_layers(module.Engine, "step") == 0  # nothing half-installed


def test_a_target_missing_from_a_module_imported_later_undoes_the_rest(monkeypatch, tmp_path):
    first = _stand_in_module("wkv_stand_in_c")
    monkeypatch.setitem(sys.modules, first.__name__, first)
    (tmp_path / "wkv_stand_in_d.py").write_text("class Engine:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class TwoModules(Counting):
        def __init__(self) -> None:
            super().__init__(first.__name__)
            self.targets = (
                Target(first.__name__, "Engine", "step"),
                Target("wkv_stand_in_d", "Engine", "h"),
            )

    inst = TwoModules()
    try:
        assert inst.instrument(config.load({}))
        assert active_layers(first.Engine, "step") == 1
        import wkv_stand_in_d  # noqa: F401  (has no Engine.h)

        assert not inst.active and "wkv_stand_in_d:Engine.h" in (inst.off_reason or "")
        assert active_layers(first.Engine, "step") == 0 and inst.hooks() == []
    finally:
        inst.uninstrument()
        sys.modules.pop("wkv_stand_in_d", None)


def test_an_optional_target_vllm_lacks_is_skipped(monkeypatch):
    module = _stand_in_module("wkv_stand_in_e", with_g=False)
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class Optional(Counting):
        def __init__(self) -> None:
            super().__init__(module.__name__)
            self.targets = (
                Target(module.__name__, "Engine", "step"),
                Target(module.__name__, "Engine", "g", optional=True),
            )

    inst = Optional()
    try:
        assert inst.instrument(config.load({}))
        assert inst.patched == ["wkv_stand_in_e:Engine.step"]
    finally:
        inst.uninstrument()


# -- against vLLM's own classes -----------------------------------------------------------

REINSTALL = r"""
import importlib, json, multiprocessing, os
multiprocessing.current_process().name = os.environ["AS_PROCESS"]
from watchdog_kv import plugin
from watchdog_kv.instrument import registry
from watchdog_kv.instrument.base import active_layers

TARGETS = [t for targets in registry.TABLE.values() for t in targets if t.module.startswith("vllm")]
for module in {t.module for t in TARGETS}:  # vLLM's modules first: installs apply at once
    importlib.import_module(module)

def layers():
    out = {}
    for t in TARGETS:
        owner = getattr(importlib.import_module(t.module), t.owner)
        if t.name in vars(owner):
            out[t.label] = active_layers(owner, t.name)
    return out

rounds = []
for _ in range(2):
    reg = plugin.register()
    rec = json.load(open(reg.record_path))
    rounds.append({"layers": layers(), "hooks": reg.hooks, "record": rec["hooks"]})
    plugin.unregister()
rounds.append({"layers": layers()})
print(json.dumps(rounds))
"""


@pytest.mark.needs_vllm
@pytest.mark.parametrize("role", ["VllmWorker-0", "EngineCore_DP0"])
def test_register_unregister_register_in_vllm_leaves_hooks_active_once(tmp_path, role):
    pytest.importorskip("vllm", reason="vLLM is not installed here (nox -s tests has it)")
    env = {
        **os.environ,
        "AS_PROCESS": role,
        "WATCHDOG_KV_STATE_DIR": str(tmp_path),
        "VLLM_PLUGINS": "",
    }
    out = subprocess.run(
        [sys.executable, "-c", REINSTALL], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first, second, after = json.loads(out.stdout.splitlines()[-1])
    wrapped = {label for label, n in first["layers"].items() if n}
    if role.startswith("VllmWorker"):
        assert "vllm.v1.worker.gpu_worker:Worker.execute_model" in wrapped
        assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states" in wrapped
        assert "step.worker:Worker.execute_model" in first["hooks"]
    else:
        assert "vllm.v1.engine.core:EngineCoreProc._process_engine_step" in wrapped
        assert "step.engine_core:EngineCoreProc._process_engine_step" in first["hooks"]
    assert (
        "vllm.distributed.kv_transfer.kv_connector.factory:KVConnectorFactory.create_connector"
        in wrapped
    )
    assert set(first["layers"].values()) <= {0, 1}  # never twice
    assert second["layers"] == first["layers"]  # the second install is the first again
    assert second["hooks"] == first["hooks"] == first["record"] == second["record"], (first, second)
    assert set(after["layers"].values()) == {0}  # and nothing of ours is left


@pytest.mark.needs_vllm
def test_every_vllm_method_in_the_table_exists_in_the_installed_vllm():
    pytest.importorskip("vllm", reason="vLLM is not installed here (nox -s tests has it)")
    from watchdog_kv.instrument import registry

    assert registry.missing() == []


def test_the_docs_list_every_vllm_touch_point():
    """docs/architecture.md's table of touch points is the registry's."""
    from pathlib import Path

    from watchdog_kv.instrument import registry

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    table = doc[doc.index("### Where watchdog_kv touches vLLM") :]
    for name, targets in registry.TABLE.items():
        assert f"`{name}`" in table, name
        for target in targets:
            assert f"`{target.label}`" in table or target.label in table, target.label
