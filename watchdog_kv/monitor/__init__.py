"""Outside the vLLM processes: what reads them from files and /proc.

Nothing here runs inside a watched process, so it keeps working when one holds
the GIL, is stopped or has died: ``watcher`` (the monitor loop over beacons,
applying :mod:`watchdog_kv.stalls`), ``evidence`` (py-spy stacks and the
incident folder of a stall), ``report`` (the culprit of a stall incident) and
``crashes`` (which process died of what signal, the culprit frame, crash
incidents). It runs in the supervisor, ``watchdog-kv monitor`` and
``watchdog-kv report``, on any machine that can read the state directory.
"""
