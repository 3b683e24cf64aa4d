"""``init_distributed``: discover the rank layout, pick the backend, initialise torch.distributed.

The process group itself is torch.distributed's; this module keeps no state of its own, so
calling ``init_distributed`` after someone else (a test harness, Lightning, torchrun's own code)
initialised the default group is a no-op that reports the existing layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist

from ds_comm._discovery import DiscoveryError, DistEnv, Source, discover
from ds_comm._exit import release_world_refs, teardown_at_exit


def _backend_from_accelerator() -> str:
    from ds_accel import get_accelerator

    return get_accelerator().communication_backend_name()


def _as_timedelta(timeout: timedelta | float | int | None) -> timedelta | None:
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    if isinstance(timeout, (int, float)) and timeout > 0:
        return timedelta(seconds=float(timeout))
    raise ValueError(
        f"init_distributed: timeout={timeout!r}; pass a datetime.timedelta or positive seconds"
    )


def _existing_layout(dist_backend: str | None) -> DistEnv:
    current = dist.get_backend()
    if dist_backend is not None and dist_backend != current:
        raise RuntimeError(
            f"init_distributed(dist_backend={dist_backend!r}): torch.distributed is already "
            f"initialised with backend {current!r}; call destroy_process_group() first or drop "
            f"the dist_backend argument"
        )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        master_addr=os.environ.get("MASTER_ADDR", ""),
        master_port=int(os.environ.get("MASTER_PORT", "0")),
        source=Source.EXISTING,
    )


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    timeout: timedelta | float | None = None,
    init_method: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    export_env: bool = True,
) -> DistEnv:
    """Initialise the default process group once; later calls return the existing layout.

    Args:
        dist_backend: ``"nccl"``, ``"gloo"``, ...; default: the accelerator's
            ``communication_backend_name()`` (nccl on CUDA, gloo on CPU).
        auto_mpi_discovery: when started by mpirun (and no torchrun variables are set), read the
            layout from mpi4py and broadcast rank 0's address and a free port.
        timeout: collective timeout (timedelta or seconds); default torch's.
        init_method: rendezvous URL; default ``env://`` from the discovered layout.
        env: the environment to read (default ``os.environ``), for embedding and tests.
        export_env: after MPI or SLURM discovery, set the torchrun variables that are not
            already set, so code that reads ``LOCAL_RANK``/``RANK`` sees the same layout.

    Returns the :class:`DistEnv` (rank, world size, local rank, address, port, source).
    """
    if dist.is_initialized():
        return _existing_layout(dist_backend)
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed support")
    layout = discover(env, auto_mpi_discovery)
    backend = dist_backend or _backend_from_accelerator()
    if backend != "gloo":
        # NCCL-like backends bind a device per process; do it before the group exists so the
        # communicator is created on the right device.
        from ds_accel import get_accelerator

        accel = get_accelerator()
        if accel.device_name() != "cpu" and accel.is_available():
            accel.set_device(layout.local_rank)
    if export_env and layout.source is not Source.ENV and env is None:
        for k, v in layout.as_environ().items():
            os.environ.setdefault(k, v)
    if init_method is None:
        init_method = f"tcp://{_url_host(layout.master_addr)}:{layout.master_port}"
        if layout.source is Source.ENV and env is None:
            init_method = "env://"  # keeps torchrun's agent store and its other variables
    kwargs = {"timeout": _as_timedelta(timeout)} if timeout is not None else {}
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=layout.rank,
            world_size=layout.world_size,
            **kwargs,
        )
    except ValueError as e:
        raise DiscoveryError(f"init_distributed: torch.distributed rejected the setup: {e}") from e
    teardown_at_exit()
    return layout


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def destroy_process_group() -> None:
    """Tear down the default group (no-op when none exists).

    Every rank calls it. Under gloo the ranks first meet at a barrier: a rank that tore its
    connections down while a peer's gloo threads still read from them made that peer abort at
    exit ("terminate called without an active exception", exit -6) after a clean run.
    References torch keeps to the group are dropped first, so that it is really destroyed here
    and its threads joined, not left running into interpreter exit (same abort; see
    ``ds_comm._exit``). A reference the caller still holds keeps it alive: drop it before.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        dist.barrier()
    release_world_refs()
    dist.destroy_process_group()
