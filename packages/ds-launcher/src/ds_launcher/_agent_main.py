"""`python -m ds_launcher._agent_main`: the per-node agent's entry point (see `_agent.py`).

A module of its own because `_agent` is imported by the package, and runpy warns when the
module it runs is already imported.
"""

import sys

from ds_launcher._agent import main

sys.exit(main())
