"""The few collectives a save needs, over torch.distributed when initialised, else one process.

Metadata travels as JSON bytes (not all_gather_object, which pickles), in keeping with the rule
that nothing this package produces or consumes is a pickle.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from ds_ckpt._stfile import byte_view


class Comm:
    """Rank/world of `group` and JSON all-gather/barrier; a world of one without a group."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            backend = str(dist.get_backend(group))
            # NCCL moves only device tensors; gloo (alone or in a mixed backend) moves CPU ones.
            use_cuda = "nccl" in backend and "gloo" not in backend
            self.device = (
                torch.device("cuda", torch.cuda.current_device())
                if use_cuda
                else torch.device("cpu")
            )
        else:
            self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    def all_gather_json(self, obj: Any) -> list[Any]:
        if not self.distributed or self.world == 1:
            return [json.loads(json.dumps(obj))]
        data = json.dumps(obj, separators=(",", ":")).encode()
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        width = int(max(int(s.item()) for s in sizes))
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(outs, buf, group=self.group)
        return [
            json.loads(bytes(byte_view(o[: int(s.item())].cpu().contiguous())))
            for o, s in zip(outs, sizes)
        ]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        return self.all_gather_json(obj if self.rank == src else None)[src]

    def barrier(self) -> None:
        if self.distributed and self.world > 1:
            dist.barrier(group=self.group)
