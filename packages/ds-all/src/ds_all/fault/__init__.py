"""Fault tolerance for ds_all's engine: auto-resume, save on SIGTERM, the stall watchdog and
the ZeRO-3 control-flow check.

Modules, one responsibility each: ``_config`` (the ``fault_tolerance`` section), ``_host`` (what
the fault layer needs from the engine, as a Protocol), ``_tolerance`` (the per-engine state that
``initialize()`` attaches and ``step()`` drives), ``_watchdog`` (heartbeats and the diagnosis of a
stalled collective), ``_control_flow`` (per-step module call counts), ``_signal`` (the SIGTERM
flag), ``_stack`` (where a thread is) and ``_store`` (the watchdog's store connection).
"""

from ds_all.fault._config import FaultToleranceSection
from ds_all.fault._control_flow import CallCounter, explain_divergence
from ds_all.fault._host import FaultHost
from ds_all.fault._signal import SignalFlag
from ds_all.fault._stack import Where, collective_from_traceback, thread_where, where
from ds_all.fault._store import open_store, try_get
from ds_all.fault._tolerance import FaultTolerance, attach, on_step_boundary
from ds_all.fault._watchdog import EXIT_STALLED, Watchdog, groups_of

__all__ = [
    "EXIT_STALLED",
    "CallCounter",
    "FaultHost",
    "FaultTolerance",
    "FaultToleranceSection",
    "SignalFlag",
    "Watchdog",
    "Where",
    "attach",
    "collective_from_traceback",
    "explain_divergence",
    "groups_of",
    "on_step_boundary",
    "open_store",
    "thread_where",
    "try_get",
    "where",
]
