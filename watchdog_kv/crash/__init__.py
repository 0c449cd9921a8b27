"""Native crashes, inside a vLLM process: :mod:`~watchdog_kv.crash.record` keeps the
process's crash record (faulthandler's dump, written by the dying process itself)
and parses it. Reading it after the death is :mod:`watchdog_kv.monitor.crashes`'s job.
"""
