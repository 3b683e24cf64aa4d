"""Run under `mpirun -np 2`: init_distributed discovers the ranks through mpi4py, and the mpi4py
and torch.distributed transports of compressed_allreduce give identical results."""

import torch

import ds_comm
from ds_comm import ErrorFeedback, MpiComm, Source, compressed_allreduce


def main() -> None:
    from mpi4py import MPI

    layout = ds_comm.init_distributed(dist_backend="gloo")
    world = MPI.COMM_WORLD
    assert layout.source is Source.MPI, layout
    assert (layout.rank, layout.world_size) == (world.Get_rank(), world.Get_size()), layout
    assert ds_comm.get_rank() == layout.rank and ds_comm.get_world_size() == layout.world_size
    assert layout.local_rank == layout.rank  # one host
    r, n = layout.rank, layout.world_size
    t = torch.full((3,), float(r))
    ds_comm.all_reduce(t)
    assert torch.equal(t, torch.full((3,), float(sum(range(n)))))

    x = torch.randn(1001, generator=torch.Generator().manual_seed(r))
    via_torch, via_mpi = x.clone(), x.clone()
    ef_torch, ef_mpi = ErrorFeedback(), ErrorFeedback()
    mpi = MpiComm()
    lg = ds_comm.CommsLogger(enabled=True)
    mpi.logger = lg
    for _ in range(5):
        compressed_allreduce(via_torch, ef_torch)
        compressed_allreduce(via_mpi, ef_mpi, comm=mpi)
        assert torch.equal(via_torch, via_mpi), (via_torch - via_mpi).abs().max()
    assert torch.equal(ef_torch.worker_error, ef_mpi.worker_error)
    assert torch.equal(ef_torch.server_error, ef_mpi.server_error)
    assert (
        lg.wire_bytes("compressed_allreduce.signs")
        == 5 * ds_comm.compressed_wire_bytes(1001, n)["signs"]
    )
    # The optimizers' exact averaging over MPI matches torch's.
    g1, g2 = [x.clone(), x[:7].clone()], [x.clone(), x[:7].clone()]
    mpi.all_reduce_mean(g1)
    ds_comm.TorchComm().all_reduce_mean(g2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    print(f"MPI-PARITY-OK rank={r} world={n}", flush=True)
    ds_comm.destroy_process_group()


if __name__ == "__main__":
    main()
