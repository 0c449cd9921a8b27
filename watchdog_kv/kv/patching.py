"""Replacing methods on one object, reversibly.

Every watch wraps methods of a live vLLM object (a connector, NIXL's worker or
agent wrapper) by setting an *instance* attribute that shadows the class's
method; :meth:`InstancePatches.undo` deletes those attributes so the class's
own methods show through again, exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["InstancePatches"]


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
