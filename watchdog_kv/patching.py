"""Replacing vLLM's methods, reversibly.

* :class:`InstancePatches`: every watch wraps methods of a live vLLM object (a
  connector, NIXL's worker or agent wrapper) by setting an *instance* attribute
  that shadows the class's method; :meth:`InstancePatches.undo` deletes those
  attributes so the class's own methods show through again, exactly as before.
* :class:`ClassPatches`: the hooks replace attributes of vLLM classes and
  modules (``Scheduler.__init__``, ``EngineCoreProc._process_engine_step``...);
  :meth:`ClassPatches.undo` puts every original back, newest first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["ClassPatches", "InstancePatches"]


class InstancePatches:
    def __init__(self) -> None:
        self._done: list[tuple[Any, str]] = []

    def replace(self, obj: Any, name: str, replacement: Callable[..., Any]) -> Any:
        """Shadow ``obj.name`` with ``replacement``; return the method it shadows."""
        original = getattr(obj, name)
        setattr(obj, name, replacement)
        self._done.append((obj, name))
        return original

    def undo(self) -> None:
        for obj, name in reversed(self._done):
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        self._done.clear()


class ClassPatches:
    def __init__(self) -> None:
        self._done: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)

    def replace(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        """Set ``owner.name`` to ``make(original)``, where ``original`` is the attribute
        the owner itself defines (not one it inherits)."""
        original = vars(owner)[name]
        setattr(owner, name, make(original))
        self._done.append((owner, name, original))

    def patched(self, owner: Any, name: str) -> bool:
        return any(o is owner and n == name for o, n, _ in self._done)

    def undo(self) -> None:
        for owner, name, original in reversed(self._done):
            setattr(owner, name, original)
        self._done.clear()
