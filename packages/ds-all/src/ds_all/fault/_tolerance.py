"""Fault tolerance for the engine: auto-resume, save on SIGTERM, the stall watchdog and the
control-flow check. ``attach(engine, config)`` is called once by ``initialize()``;
``on_step_boundary(engine)`` by ``engine.step()`` after each optimizer step.

What each piece is for:

* ``checkpoint.auto_resume`` + ``checkpoint.save_dir``: on start, load the newest complete
  checkpoint (ds_ckpt's ``latest``, falling back to the newest committed tag), so that a job
  restarted by ``ds-launch --max_restarts`` continues where the last checkpoint left off, with
  the RNG state, scheduler and step counters: the loss curve continues bitwise.
* ``checkpoint.save_on_signal``: SIGTERM (the launcher forwards it on preemption) saves at the
  next step boundary on every rank and exits 0; the next launch resumes from it.
* ``fault_tolerance.watchdog``: see ``_watchdog``.
* ``fault_tolerance.check_control_flow``: see ``_control_flow``.

The engine is reached through :class:`~ds_all.fault._host.FaultHost` (a Protocol), so this
package never imports the engine module.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ds_all._config_base import ConfigError
from ds_all._paths import check_output_dir
from ds_all.fault._config import FaultToleranceSection
from ds_all.fault._control_flow import CallCounter, explain_divergence
from ds_all.fault._host import FaultHost
from ds_all.fault._signal import SignalFlag
from ds_all.fault._store import open_store
from ds_all.fault._watchdog import Watchdog, groups_of

log = logging.getLogger("ds_all")


def _default_timeout_s() -> float:
    """torch's default collective timeout for the default group's backend."""
    try:
        backend = dist.get_backend()
        return dist.distributed_c10d._get_default_timeout(backend).total_seconds()
    except Exception:  # noqa: BLE001 - private helper; fall back to torch's documented default
        return timedelta(minutes=30).total_seconds()


class FaultTolerance:
    """The engine's fault-tolerance state (``engine.fault``)."""

    def __init__(self, engine: FaultHost, config: Any) -> None:
        ft: FaultToleranceSection = getattr(config, "fault_tolerance", None) or (
            FaultToleranceSection()
        )
        ck = config.checkpoint
        for key in ("auto_resume", "save_on_signal"):
            if getattr(ck, key) and not ck.save_dir:
                raise ConfigError(
                    f"checkpoint.{key} needs checkpoint.save_dir: add "
                    '"save_dir": "<directory shared by all ranks>" to the "checkpoint" section'
                )
        if ck.save_dir:
            check_output_dir(ck.save_dir, "checkpoint.save_dir")
        self.engine = engine
        self.save_dir: str | None = ck.save_dir
        self.multi = dist.is_available() and dist.is_initialized() and engine.world_size > 1
        self.timeout_s = ft.comms_timeout or (_default_timeout_s() if self.multi else 0.0)
        #: the tag auto-resume loaded (None: fresh start) and its client_state
        self.resumed_tag: str | None = None
        self.client_state: dict[str, Any] | None = None
        self._flow_warned = False

        check_flow = ft.check_control_flow
        if check_flow is None:
            check_flow = engine.zero_optimization_stage() == 3
        self.flow = CallCounter(engine.module) if check_flow and self.multi else None
        self.signal = SignalFlag() if ck.save_on_signal else None
        if self.signal is not None and not self.signal.installed:
            log.warning("checkpoint.save_on_signal: initialize() ran off the main thread, where "
                        "Python cannot install a SIGTERM handler; saving on signal is off")  # fmt: skip
        self.watchdog: Watchdog | None = None
        if ft.watchdog and self.multi:
            interval = ft.heartbeat_interval or min(2.0, self.timeout_s / 10)
            self.watchdog = Watchdog(
                open_store(timeout_s=min(10.0, self.timeout_s)), engine.global_rank,
                dist.get_world_size(), groups_of(engine.dp_group), self.timeout_s, interval,
                progress=lambda: {"step": engine.global_steps, "micro": engine.micro_steps},
                flow=self.flow,
            )  # fmt: skip
            self.watchdog.start()
        if ck.auto_resume:
            self.resume()

    # ------------------------------------------------------------------ resume
    def resume(self) -> str | None:
        """Load the newest complete checkpoint of save_dir, if any; returns its tag."""
        assert self.save_dir is not None
        path, client = self.engine.load_checkpoint(self.save_dir)
        if path is None:
            if self.engine.global_rank == 0:
                log.info("auto-resume: no checkpoint in %s yet; starting at step 0", self.save_dir)
            return None
        self.resumed_tag = os.path.basename(path)
        self.client_state = client
        if self.engine.global_rank == 0:
            log.info("auto-resume: loaded %s from %s; continuing at step %d",
                     self.resumed_tag, self.save_dir, self.engine.global_steps)  # fmt: skip
        return self.resumed_tag

    # ------------------------------------------------------------------ step boundary
    def on_step_boundary(self) -> None:
        """Agree on a pending SIGTERM and compare control flow, in one tiny all-reduce."""
        want_signal = self.signal is not None and self.signal.installed
        if not want_signal and self.flow is None:
            return
        flag = 1 if (self.signal is not None and self.signal.requested is not None) else 0
        fp = self.flow.fingerprint() if self.flow is not None else 0
        if self.multi:
            # MAX of (flag, fp, -fp): any rank's signal wins; fps differ iff max(fp) != min(fp)
            t = torch.tensor([flag, fp, -fp], dtype=torch.int64, device=self.engine.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.engine.dp_group)
            flag, differs = int(t[0]), int(t[1]) + int(t[2]) != 0
        else:
            differs = False
        if differs:
            self._warn_flow()
        if self.flow is not None:
            self.flow.reset()
        if flag:
            self._save_and_exit()

    def _warn_flow(self) -> None:
        assert self.flow is not None
        counts: list[Any] = [None] * dist.get_world_size(self.engine.dp_group)
        dist.all_gather_object(counts, self.flow.snapshot(), group=self.engine.dp_group)
        if self._flow_warned or self.engine.global_rank != 0:
            return
        self._flow_warned = True
        why = explain_divergence(dict(enumerate(counts)))
        log.warning("step %d: %s. It did not hang this time (the collectives happened to line "
                    "up), but gathered parameters may have been mixed up", self.engine.global_steps,
                    why)  # fmt: skip

    def _save_and_exit(self) -> None:
        assert self.save_dir is not None and self.signal is not None
        signum = self.signal.requested
        self.engine.save_checkpoint(self.save_dir)
        self.engine.close()  # waits for an async save to commit
        self.close()
        log.info("rank %d: signal %s: saved %s/global_step%d; exiting 0", self.engine.global_rank,
                 signum, self.save_dir, self.engine.global_steps)  # fmt: skip
        raise SystemExit(0)

    def stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self.signal is not None:
            self.signal.restore()
        if self.flow is not None:
            self.flow.remove()
            self.flow = None


def attach(engine: FaultHost, config: Any) -> FaultTolerance:
    """Build the engine's fault tolerance (``engine.fault``); runs auto-resume if configured."""
    fault = FaultTolerance(engine, config)
    engine.fault = fault  # type: ignore[attr-defined]  # the engine's optional attribute
    return fault


def on_step_boundary(engine: FaultHost) -> None:
    fault: FaultTolerance | None = getattr(engine, "fault", None)
    if fault is not None:
        fault.on_step_boundary()
