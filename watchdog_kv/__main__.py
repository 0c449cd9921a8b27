"""``python -m watchdog_kv``: the same as the ``watchdog-kv`` command."""

import sys

from watchdog_kv.cli import main

sys.exit(main())
