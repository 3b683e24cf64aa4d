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


def _offload_run(monkeypatch, in_place: bool):
    """3 steps: two backward passes summed in step 0, block 3 unused in step 1."""
    import ds_offload._param as param_mod

    if not in_place:  # the stepper copies each gradient into a buffer of its own
        monkeypatch.setattr(param_mod, "_Part", _NoHostGrad)
    m = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = ParamOffloader(m, {"device": "cpu"}, hparams={"lr": 1e-2, "weight_decay": 0.1},
                             device="cpu")  # fmt: skip
        skip = m.blocks[3].forward
        for s in range(3):
            if s == 1:
                m.blocks[3].forward = lambda x: x
            m(*_data(s)).backward()
            if s == 0:
                m(*_data(10)).backward()
            m.blocks[3].forward = skip
            off.step()
    monkeypatch.undo()
    memory = off.stepper.host_memory()["gradient_buffers"]
    host = off.stepper._grad_host
    adopted = all(host[u.index].data_ptr() == u.grad.data_ptr() for u in off.units)
    got = off.full_parameters()
    off.close()
    return got, memory, adopted


class _NoHostGrad:
    def __init__(self, index, group_index, master, host_grad=None):
        del host_grad
        self.index, self.group_index, self.master, self.param_shard = (
            index, group_index, master, None,
        )  # fmt: skip


def test_stepper_reads_the_unit_gradient_buffers_in_place(monkeypatch):
    """The stepper takes each unit's host gradient buffer as its own (no copy into a second
    buffer, no 4 bytes per parameter of it) and the first gradient of a step overwrites its
    slot (no zeroing pass): bitwise the training of the copied, zeroed buffers, with gradients
    summed over two backward passes and a unit without gradient in a step."""
    want, want_memory, want_adopted = _offload_run(monkeypatch, in_place=False)
    got, memory, adopted = _offload_run(monkeypatch, in_place=True)
    n = sum(p.numel() for p in _net().parameters())
    assert adopted and not want_adopted
    assert memory == 0 and want_memory == 4 * n
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # and the gradients were summed, and zero for the unused block, as plain training's
    m = _net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for s in range(3):
        blocks = m.blocks
        if s == 1:
            m.blocks = nn.ModuleList(blocks[:3])
        m(*_data(s)).backward()
        if s == 0:
            m(*_data(10)).backward()
        m.blocks = blocks
        opt.step()
        opt.zero_grad(set_to_none=False)  # an unused parameter is stepped with zeros
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), atol=1e-6, rtol=0, msg=n)
