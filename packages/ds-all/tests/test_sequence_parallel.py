"""``sequence_parallel_size`` through the engine: dp x sp = 2 x 2 on 4 gloo ranks with ZeRO 1, 2
and 3 equals one process over whole sequences (losses and parameters after every step, SGD with
momentum so that the parameters move by the gradient itself); a checkpoint saved at sp = 2
loads at sp = 4 and at sp = 1 and training continues as the single-process reference does.

The model's attention is ds-seq's Ulysses ``DistributedAttention`` (GQA), its loss the
whole-sequence mean of ``ds_seq.sequence_parallel_causal_lm_loss``; the reference runs the same
module over a one-rank group (the exchanges are the identity) on every data-parallel sample.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_comm.testing import distributed_test

VOCAB, D, HEADS, KV, SEQ = 32, 32, 8, 4, 8
TOL = dict(rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import ds_seq

        self.ln = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, (HEADS + 2 * KV) * (D // HEADS))
        self.out = nn.Linear(D, D)
        self.mlp = nn.Sequential(
            nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)
        )
        self.attn = ds_seq.DistributedAttention(self._sdpa, None, scatter_idx=2, gather_idx=1)

    @staticmethod
    def _sdpa(q, k, v):  # [b, s, h, d]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    def forward(self, x):
        b, s, _ = x.shape
        hd = D // HEADS
        q, k, v = self.qkv(self.ln(x)).split([HEADS * hd, KV * hd, KV * hd], dim=-1)
        ctx = self.attn(q.view(b, s, HEADS, hd), k.view(b, s, KV, hd), v.view(b, s, KV, hd), 0)
        x = x + self.out(ctx.reshape(b, s, D))
        return x + self.mlp(x)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def set_group(self, group) -> None:
        for b in self.blocks:
            b.attn.spg = group

    def forward(self, ids, pos):
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _sample(step: int, i: int):
    g = torch.Generator().manual_seed(1000 * step + i)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : 1 + i % 3] = -100  # ignored prompt tokens, a different count per sample
    return ids, labels


def _clone(model, group):
    """A deep copy whose attention runs over ``group`` (process groups do not deep-copy)."""
    model.set_group(None)
    twin = copy.deepcopy(model)
    twin.set_group(group)
    return twin


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _ref_step(model, opt, step: int, dp: int) -> float:
    """One step of the plain reference: mean over the dp samples of each whole-sequence loss."""
    opt.zero_grad()
    total = 0.0
    for i in range(dp):
        ids, labels = _sample(step, i)
        logits = model(ids, torch.arange(SEQ)[None])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)) / dp
        loss.backward()
        total += float(loss.detach())
    opt.step()
    return total


def _engine(model, sp: int, stage: int, alone):
    import ds_all

    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "sequence_parallel_size": sp,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = ds_all.initialize(
        model=model, optimizer=_sgd, config=cfg, dist_init_required=False
    )
    # sp = 1: no sequence-parallel group (None would mean the world): this rank alone
    model.set_group(engine.get_sequence_parallel_group() if sp > 1 else alone)
    return engine


def _sp_step(engine, step: int, alone) -> float:
    import ds_seq

    sp = engine.sequence_parallel_size
    rank = dist.get_rank()
    dp_rank, sp_rank = divmod(rank, sp)
    ids, labels = _sample(step, dp_rank)
    shifted = ds_seq.shift_labels(labels)
    n = SEQ // sp
    sl = slice(sp_rank * n, (sp_rank + 1) * n)
    logits = engine(ids[:, sl], torch.arange(SEQ)[None, sl])
    loss = ds_seq.sequence_parallel_causal_lm_loss(
        logits, shifted[:, sl], engine.get_sequence_parallel_group() if sp > 1 else alone
    )
    engine.backward(loss)
    engine.step()
    value = loss.detach().clone()
    dist.all_reduce(value)  # the same on every sp rank; the mean over the dp replicas
    return float(value) / dist.get_world_size()


def _check_params(engine, ref, where) -> None:
    state = engine.zero.full_state_dict()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(
            state[name].float(), p.detach(), **TOL, msg=lambda m, name=name: f"{name} {where}: {m}"
        )


@distributed_test(world_size=4, timeout=240)
def test_dp2_sp2_zero_stages_and_checkpoint_across_sp_sizes(tmp_path):
    # the reference's exchanges run over a group of one rank (the identity)
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    torch.manual_seed(0)
    base = _Model()
    for stage in (1, 2, 3):
        ref = _clone(base, alone)
        ref_opt = _sgd(ref.parameters())
        engine = _engine(_clone(base, None), sp=2, stage=stage, alone=alone)
        assert engine.train_batch_size() == 2  # two data-parallel replicas of one sample
        for step in range(2):
            loss = _sp_step(engine, step, alone)
            ref_loss = _ref_step(ref, ref_opt, step, dp=2)
            assert abs(loss - ref_loss) < 1e-5, (stage, step, loss, ref_loss)
            _check_params(engine, ref, f"stage {stage} step {step}")
        if stage == 2:
            engine.save_checkpoint(str(tmp_path), tag="sp2")
            saved_ref, saved_opt = ref, ref_opt
        engine.close()
    # resume the stage-2 run at other sequence-parallel sizes (the momentum buffers included)
    for sp, stage in ((4, 2), (1, 3)):
        ref = _clone(saved_ref, alone)
        ref_opt = _sgd(ref.parameters())
        ref_opt.load_state_dict(copy.deepcopy(saved_opt.state_dict()))  # no shared buffers
        engine = _engine(_Model(), sp=sp, stage=stage, alone=alone)
        engine.load_checkpoint(str(tmp_path), tag="sp2")
        _check_params(engine, ref, f"loaded at sp {sp}")
        loss = _sp_step(engine, 2, alone)
        ref_loss = _ref_step(ref, ref_opt, 2, dp=4 // sp)
        assert abs(loss - ref_loss) < 1e-5, (sp, loss, ref_loss)
        _check_params(engine, ref, f"step after loading at sp {sp}")
        engine.close()


def test_sequence_parallel_size_errors_name_the_key():
    import pytest

    import ds_all
    from ds_all._config_base import ConfigError

    with pytest.raises(ConfigError, match="sequence_parallel_size must be >= 1"):
        ds_all.initialize(
            model=_Model(),
            optimizer=_sgd,
            config={"train_batch_size": 1, "sequence_parallel_size": 0},
        )
    with pytest.raises(
        ConfigError, match="sequence_parallel_size 2 does not divide the world size 1"
    ):
        ds_all.initialize(
            model=_Model(), optimizer=_sgd, config={"train_batch_size": 1, "sequence_parallel_size": 2},
            dist_init_required=False,
        )  # fmt: skip


def test_deepspeed_module_paths_reexport_ds_seq():
    import ds_seq
    from ds_all.runtime.sequence_parallel import ulysses_sp
    from ds_all.sequence.layer import DistributedAttention

    assert DistributedAttention is ds_seq.DistributedAttention
    for name in ulysses_sp.__all__:
        assert getattr(ulysses_sp, name) is getattr(ds_seq, name), name
