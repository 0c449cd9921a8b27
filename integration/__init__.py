"""Drivers that run the real stack end to end, outside the test suite.

* :mod:`integration.bench` -- ``nox -s bench``: overhead, detection and recovery
  times, restart time, measured side by side in one run.
* :mod:`integration.soak` -- ``nox -s soak``: many requests through the router
  while faults of every kind are injected at random.

Both start real ``watchdog-kv serve`` services on the embedded model
(:mod:`integration.stack`) and drive them over HTTP, as a client would.
"""
