"""The ``fault_tolerance`` config section (ours, not DeepSpeed's): collective timeout and the
stall watchdog. Resume and preemption keys live in ``checkpoint`` (``auto_resume``,
``save_dir``, ``save_on_signal``) because they are about checkpoints."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from ds_all._config_base import ConfigError, Section


class FaultToleranceSection(Section):
    path = "fault_tolerance"
    #: collective timeout in seconds, passed to init_distributed; None: torch's default
    #: (10 min for NCCL, 30 min for gloo). A rank that stops taking part makes the others fail
    #: after this long, with a message naming it (see ds_all/fault/_watchdog.py).
    comms_timeout: float | None = None
    #: per-rank heartbeat thread (through the rendezvous store) that names a stalled rank and
    #: the collective on a timeout, and stops the whole job instead of leaving survivors hanging
    watchdog: bool = True
    #: seconds between heartbeats; None: min(2, comms_timeout / 10)
    heartbeat_interval: float | None = None
    #: count module calls per step so that control flow that differs across ranks (a module
    #: called a different number of times, which deadlocks ZeRO-3's per-module all-gathers) is
    #: reported naming the module. None: on for ZeRO stage 3 only.
    check_control_flow: bool | None = None

    @field_validator("comms_timeout", "heartbeat_interval")
    @classmethod
    def _positive(cls, v: float | None, info: Any) -> float | None:
        if v is not None and v <= 0:
            raise ConfigError(
                f"fault_tolerance.{info.field_name} must be a positive number of seconds, got {v}"
            )
        return v

    @model_validator(mode="after")
    def _beats_within_timeout(self) -> FaultToleranceSection:
        timeout, beat = self.comms_timeout, self.heartbeat_interval
        if timeout is not None and beat is not None and beat >= timeout:
            # the diagnosis of a timed-out collective reads the heartbeats: with no beat
            # within the timeout, every rank would look stalled
            raise ConfigError(
                f"fault_tolerance.heartbeat_interval ({beat:g} s) must be less than "
                f"fault_tolerance.comms_timeout ({timeout:g} s); leave heartbeat_interval out "
                "to use min(2 s, comms_timeout / 10)"
            )
        return self
