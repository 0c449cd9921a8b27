"""Suite-wide rules.

* Every test fails if it leaves a swallowed watchdog_kv internal error behind
  (see ``watchdog_kv.guard``): "never crash vLLM" must not hide our bugs. A test
  that provokes one on purpose clears it after asserting it.
"""

from __future__ import annotations

import pytest

from watchdog_kv import guard


@pytest.fixture(autouse=True)
def _no_swallowed_internal_errors():
    guard.clear_internal_errors()
    yield
    errors = guard.internal_errors()
    guard.clear_internal_errors()
    if errors:
        pytest.fail(f"watchdog_kv swallowed internal errors: {errors}")
