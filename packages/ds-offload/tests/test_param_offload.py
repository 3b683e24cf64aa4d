"""Parameter offload (stage-3 style, one device): same parameters as plain training."""

import warnings

import pytest
import torch
from torch import nn

from ds_offload import ParamOffloader


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self, d=16, layers=4, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, tgt):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), tgt.flatten())


def _data(step):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 32, (4, 8), generator=g)
    return idx, (idx * 3 + 1) % 32


def _net():
    torch.manual_seed(0)
    return Net()


def _reference(steps):
    m = _net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for s in range(steps):
        m(*_data(s)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in m.named_parameters()}


@pytest.mark.parametrize(
    "device,buffer_count,max_in_cpu,buffer_size",
    [
        ("cpu", 3, 0, 10_000),
        ("cpu", 8, 0, 10),  # DeepSpeed: buffer_size is for NVMe only; units are ~1100 elements
        ("nvme", 3, 0, 10_000),
        ("nvme", 3, 2000, 10_000),
        ("nvme", 8, 10**9, 10_000),
        ("nvme", 3, 0, 300),  # units read in 300-element pieces (unaligned file offsets)
        ("nvme", 4, 0, 1100),  # 1024-element (one page) pieces: O_DIRECT body + short tail
    ],
)
def test_matches_plain_training(tmp_path, device, buffer_count, max_in_cpu, buffer_size):
    m = _net()
    cfg = {
        "device": device,
        "buffer_count": buffer_count,
        "buffer_size": buffer_size,
        "max_in_cpu": max_in_cpu,
    }
    if device == "nvme":
        cfg["nvme_path"] = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hook on the root with integer inputs
        off = ParamOffloader(m, cfg, hparams={"lr": 1e-2, "weight_decay": 0.1}, device="cpu")
        # parameters are not on the device between uses
        assert all(p.numel() == 0 for p in m.parameters())
        steps = 4
        for s in range(steps):
            m(*_data(s)).backward()
            # bounded: never more units on the device than buffers
            assert len(off._resident) <= buffer_count
            off.step()
    got = off.full_parameters()
    want = _reference(steps)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=n)
    # after the first iteration the order is known and later units are prefetched
    assert off._order == [4, 0, 1, 2, 3]
    if device == "nvme":
        biggest = max(u.numel for u in off.units)
        page = 1024  # fp32 elements per 4096-byte page
        want = buffer_size // page * page if buffer_size >= page else buffer_size
        assert off._chunk == min(biggest, want)
        assert all(b.numel() == off._chunk for b in off._staging)  # bounded host buffers
    off.close()


def test_errors():
    with pytest.raises(ValueError, match="buffer_count must be >= 3"):
        ParamOffloader(_net(), {"device": "cpu", "buffer_count": 2}, device="cpu")
    with pytest.raises(ValueError, match="offload_param.device is 'none'"):
        ParamOffloader(_net(), {"device": "none"}, device="cpu")
    with pytest.raises(ValueError, match="offload_param.bufer_count"):
        ParamOffloader(_net(), {"device": "cpu", "bufer_count": 4}, device="cpu")
    with pytest.raises(ValueError, match="must be float32"):
        ParamOffloader(_net().to(torch.bfloat16), {"device": "cpu"}, device="cpu")
