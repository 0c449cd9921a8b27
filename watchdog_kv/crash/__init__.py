"""Native crashes: a process of a vLLM server killed by a signal.

:mod:`~watchdog_kv.crash.record` runs inside each vLLM process the plugin loads
into and keeps its crash record (faulthandler's dump, written by the dying
process itself); :mod:`~watchdog_kv.crash.incident` runs outside, in the
supervisor or ``watchdog-kv report``: it reads the record, the exit code and
the server's log, names the signal and the culprit frame, and writes or reads
crash incidents.
"""
