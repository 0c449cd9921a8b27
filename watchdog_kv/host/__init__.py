"""What a host needs for stock vLLM to run on it.

Two kinds of code live here, neither of which touches vLLM's objects:

* fixes the plugin applies in each vLLM process it loads into
  (:mod:`~watchdog_kv.host.amx`: AMX tile permission;
  :mod:`~watchdog_kv.host.cpus`: OpenMP core bindings that do not overlap);
* facts ``watchdog-kv doctor`` and ``watchdog-kv serve`` check before a server
  is started (:mod:`watchdog_kv.doctor` puts them in one table).
"""
