"""ds-comm: process groups, collectives with comms logging, 1-bit compressed communication.

    >>> import ds_comm
    >>> ds_comm.init_distributed()            # torchrun / ds-launch / mpirun / srun
    >>> ds_comm.require_initialized_if_launched("my_pkg.Thing")  # refuse lone launched ranks
    >>> ds_comm.all_reduce(t)                 # torch.distributed names, logged
    >>> ds_comm.get_comms_logger().enable(); ...; ds_comm.log_summary()

The multi-process test harness is ``ds_comm.testing`` (imported explicitly, not from here).
"""

from ds_comm._bitpack import pack_signs, unpack_signs
from ds_comm._coalesced import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_coalesced,
    plan_buckets,
    reduce_scatter_coalesced,
    shard_numel,
)
from ds_comm._collectives import (
    ReduceOp,
    all_gather,
    all_gather_into_tensor,
    all_gather_single,
    all_reduce,
    all_to_all,
    all_to_all_single,
    barrier,
    broadcast,
    gather,
    get_rank,
    get_world_size,
    irecv,
    is_initialized,
    isend,
    new_group,
    recv,
    reduce,
    reduce_scatter,
    reduce_scatter_single,
    reduce_scatter_tensor,
    scatter,
    send,
)
from ds_comm._compressed import (
    CompressedComm,
    ErrorFeedback,
    MpiComm,
    TorchComm,
    compressed_allreduce,
    compressed_wire_bytes,
    make_compressed_comm,
)
from ds_comm._discovery import DiscoveryError, DistEnv, Source, discover, first_slurm_host
from ds_comm._exit import EXIT_BARRIER_S, teardown_at_exit
from ds_comm._init import destroy_process_group, init_distributed
from ds_comm._launch_check import (
    LaunchedRank,
    NotInitializedError,
    launched_rank,
    require_initialized_if_launched,
)
from ds_comm._logger import (
    CommsLogger,
    OpKind,
    OpStats,
    busbw_factor,
    get_comms_logger,
    set_comms_logger,
)
from ds_comm._onebit_adam import OneBitAdam
from ds_comm._onebit_lamb import OneBitLamb
from ds_comm._version import __version__
from ds_comm._zero_one_adam import ZeroOneAdam


def log_summary() -> str:
    """Print and return the default comms logger's table (see :class:`CommsLogger`)."""
    return get_comms_logger().log_summary()


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "EXIT_BARRIER_S",
    "CommsLogger",
    "CompressedComm",
    "DiscoveryError",
    "DistEnv",
    "ErrorFeedback",
    "LaunchedRank",
    "MpiComm",
    "NotInitializedError",
    "OneBitAdam",
    "OneBitLamb",
    "OpKind",
    "OpStats",
    "ReduceOp",
    "Source",
    "TorchComm",
    "ZeroOneAdam",
    "__version__",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "busbw_factor",
    "compressed_allreduce",
    "compressed_wire_bytes",
    "destroy_process_group",
    "discover",
    "first_slurm_host",
    "gather",
    "get_comms_logger",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "irecv",
    "is_initialized",
    "isend",
    "launched_rank",
    "log_summary",
    "make_compressed_comm",
    "new_group",
    "pack_signs",
    "plan_buckets",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_coalesced",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "require_initialized_if_launched",
    "scatter",
    "send",
    "set_comms_logger",
    "shard_numel",
    "teardown_at_exit",
    "unpack_signs",
]
