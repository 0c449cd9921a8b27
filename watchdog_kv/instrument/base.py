"""Instrumentors: the one way watchdog_kv changes vLLM's code, reversibly.

An :class:`Instrumentor` owns one place where vLLM is touched. It declares the
vLLM attributes it needs (:class:`Target`, its *table*), wraps them with
``wrapt`` when their module is imported (at once if it already is), and undoes
exactly its own wrappers. In the OpenTelemetry style:

* :meth:`Instrumentor.instrument` is idempotent, :meth:`Instrumentor.uninstrument`
  too, and instrument -> uninstrument -> instrument leaves the wrappers active
  exactly once (the post-import hook of a module is registered once per process
  and dispatches to whichever instrumentors are active now);
* a target missing from the installed vLLM (a renamed method) is logged by name
  and the whole instrumentor stays off, its other wrappers undone: it never
  reports a hook it did not install (:attr:`Instrumentor.patched` lists the
  targets actually wrapped);
* two wrappers on one attribute (two instrumentors, or one installed twice over
  an uninstall) can be undone in either order: :func:`wrap` leaves a
  :class:`Layer`; :func:`unwrap` turns it into a pass-through and removes from
  the top of the attribute every layer that is no longer active, so a layer
  below one still active stays until the one above goes, calling straight
  through meanwhile.

:func:`wrap` serves classes and modules (``vars(owner)`` must define the name: a
method a subclass inherits is wrapped where it is defined) and live objects
(an instance attribute shadowing the class's method, deleted again on unwrap).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import wrapt

from watchdog_kv.guard import contained
from watchdog_kv.telemetry import get_logger

__all__ = [
    "Instrumentor",
    "Layer",
    "Target",
    "Wrapper",
    "active_layers",
    "missing_targets",
    "unwrap",
    "wrap",
]

# wrapt's wrapper signature: (wrapped, instance, args, kwargs) -> result
Wrapper = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]

_log = get_logger("watchdog_kv.instrument")
_lock = threading.RLock()
_MISSING = object()


class Layer(wrapt.FunctionWrapper):  # type: ignore[misc,type-arg,unused-ignore]
    """One of our wrappers on one attribute; inactive, it calls straight through."""

    def __init__(self, wrapped: Any, wrapper: Wrapper, owner: Any, name: str, before: Any):
        super().__init__(wrapped, self._dispatch)
        self._self_wkv_wrapper = wrapper
        self._self_wkv_active = True
        self._self_wkv_owner = owner
        self._self_wkv_name = name
        self._self_wkv_before = (
            before  # what vars(owner)[name] was (or _MISSING): put back on removal
        )

    def _dispatch(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if self._self_wkv_active:
            return self._self_wkv_wrapper(wrapped, instance, args, kwargs)
        return wrapped(*args, **kwargs)


def _own(owner: Any) -> dict[str, Any]:
    try:
        return vars(owner)  # type: ignore[no-any-return]
    except TypeError:
        return {}


def wrap(owner: Any, name: str, wrapper: Wrapper) -> Layer:
    """Wrap ``owner.name`` (a class's or module's own attribute, or a live object's
    method) with ``wrapper``; return the layer, for :func:`unwrap`."""
    with _lock:
        own = _own(owner)
        if isinstance(owner, type) or type(owner).__name__ == "module":
            if name not in own:
                raise AttributeError(f"{owner!r} does not define {name!r} itself")
            current = own[name]
        else:
            current = getattr(owner, name)
        before = own.get(name, _MISSING)
        layer = Layer(current, wrapper, owner, name, before)
        setattr(owner, name, layer)
        return layer


def unwrap(layer: Layer) -> None:
    """Make ``layer`` a pass-through; remove inactive layers from the top of its attribute."""
    with _lock:
        layer._self_wkv_active = False
        owner, name = layer._self_wkv_owner, layer._self_wkv_name
        while True:
            top = _own(owner).get(name, _MISSING)
            if not isinstance(top, Layer) or top._self_wkv_active:
                return
            if top._self_wkv_before is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, top._self_wkv_before)


def active_layers(owner: Any, name: str) -> int:
    """How many of our active wrappers ``owner.name`` goes through (for tests and status)."""
    count = 0
    current = _own(owner).get(name, _MISSING)
    while isinstance(current, Layer):
        count += int(current._self_wkv_active)
        current = current.__wrapped__
    return count


@dataclass(frozen=True)
class Target:
    """A vLLM attribute an instrumentor needs: ``module:owner.name`` (``owner`` "" for a
    module-level name). ``optional`` targets are wrapped when present (vLLM calls one
    or another), never a reason to stay off."""

    module: str
    owner: str
    name: str
    optional: bool = False

    @property
    def label(self) -> str:
        return f"{self.module}:{self.owner + '.' if self.owner else ''}{self.name}"

    def resolve(self, module: Any) -> Any | None:
        """The object whose own attribute ``name`` is, or None when vLLM has no such thing."""
        owner = getattr(module, self.owner, None) if self.owner else module
        if owner is None or self.name not in _own(owner):
            return None
        return owner


def missing_targets(targets: Iterable[Target], import_modules: bool = False) -> list[str]:
    """The required targets the installed vLLM lacks. Modules not yet imported count as
    present unless ``import_modules`` (then they are imported: doctor does this)."""
    missing = []
    for target in targets:
        if target.optional:
            continue
        module = sys.modules.get(target.module)
        if module is None:
            if not import_modules:
                if importlib.util.find_spec(target.module.split(".")[0]) is None:
                    missing.append(target.label)
                continue
            try:
                module = importlib.import_module(target.module)
            except Exception:
                missing.append(target.label)
                continue
        if target.resolve(module) is None:
            missing.append(target.label)
    return missing


_hooked: set[str] = set()  # modules with our post-import hook (wrapt cannot remove one)
_active: list[Instrumentor] = []


def _on_import(module: Any) -> None:
    with _lock:
        for inst in list(_active):
            inst._module_loaded(module)


class Instrumentor:
    """One place vLLM is touched. Subclasses set :attr:`name` and :attr:`targets` and
    implement :meth:`wrapper` (the wrapper of each target); :meth:`setup` and
    :meth:`teardown` hold whatever else they start and stop."""

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[Target, ...]] = ()

    def __init__(self) -> None:
        self.settings: Any = None
        self.active = False
        self.off_reason: str | None = None
        self._layers: dict[Target, Layer] = {}
        self._lock = threading.RLock()
        self.on_change: Callable[[], None] | None = None  # what it patched changed

    # -- subclass API ----------------------------------------------------------------------
    def wrapper(self, target: Target) -> Wrapper:
        raise NotImplementedError

    def setup(self) -> None:
        """Called once by :meth:`instrument`, before any target is wrapped."""

    def teardown(self) -> None:
        """Called once by :meth:`uninstrument`, after the wrappers are undone."""

    def hooks(self) -> list[str]:
        """What this instrumentor reports as installed (its status-record entries)."""
        return [f"{self.name}:{t.owner + '.' if t.owner else ''}{t.name}" for t in self._layers]

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def patched(self) -> list[str]:
        with self._lock:
            return [t.label for t in self._layers]

    def instrument(self, settings: Any) -> bool:
        """Install (idempotent). False when the installed vLLM lacks a target: logged by
        name, nothing of this instrumentor is installed."""
        with _lock, self._lock:
            if self.active:
                self.settings = settings
                return True
            missing = missing_targets(self.targets)
            if missing:
                self._off(missing)
                return False
            self.settings = settings
            self.off_reason = None
            self.active = True
            with contained(f"{self.name}.setup", on_error=self.uninstrument):
                self.setup()
            if not self.active:
                return False
            _active.append(self)
            for module in {t.module for t in self.targets}:
                if module not in _hooked:
                    _hooked.add(module)
                    wrapt.register_post_import_hook(_on_import, module)  # at once if imported
                elif module in sys.modules:
                    self._module_loaded(sys.modules[module])
            return self.active

    def uninstrument(self) -> None:
        with _lock, self._lock:
            if self in _active:
                _active.remove(self)
            for layer in self._layers.values():
                unwrap(layer)
            self._layers.clear()
            was = self.active
            self.active = False
            if was:
                with contained(f"{self.name}.teardown"):
                    self.teardown()

    def _off(self, missing: list[str]) -> None:
        self.off_reason = "missing in this vLLM: " + ", ".join(missing)
        _log.error(
            "watchdog_kv.instrumentor_off",
            instrumentor=self.name,
            missing=missing,
            consequence="this part of the watchdog is off in this process; vLLM runs on",
        )

    def _module_loaded(self, module: Any) -> None:
        with self._lock:
            if not self.active:
                return
            mine = [t for t in self.targets if t.module == module.__name__]
            missing = [t.label for t in mine if not t.optional and t.resolve(module) is None]
            if missing:
                self.uninstrument()
                self._off(missing)
                self._changed()
                return
            with contained(f"{self.name}.wrap", on_error=self.uninstrument):
                for target in mine:
                    owner = target.resolve(module)
                    if owner is None or target in self._layers:
                        continue
                    self._layers[target] = wrap(owner, target.name, self.wrapper(target))
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with contained(f"{self.name}.on_change"):
                self.on_change()
