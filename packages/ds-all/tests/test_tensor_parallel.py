"""tensor_parallel.autotp_size on gloo ranks: tp=2 x dp=2 (4 ranks) with ZeRO 1 and 2 trains a
Llama-shaped model with the losses and parameters of one process (fp32, 1e-5 relative),
with gradient clipping active (the norm is over the whole model: sharded parameters' squares
added over the tensor-parallel group, replicated ones counted once), and its checkpoint loads at
tp=4; checkpoints between tp=2 and tp=1 both ways; partition_activations; the config's checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_all
from ds_all import ConfigError
from ds_comm.testing import run_distributed

STEPS = 3
CLIP = 0.3  # below the first steps' norms: clipping is active


class _Block(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, nn.Linear(h, h, bias=False))
        self.self_attn.num_heads = 4
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(h, 2 * h), nn.Linear(h, 2 * h)
        self.mlp.down_proj = nn.Linear(2 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, s = self.self_attn, x.shape[0], x.shape[1]
        y = self.input_layernorm(x)
        q, k, v = (
            getattr(a, n)(y).view(b, s, a.num_heads, -1).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        o = (
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            .transpose(1, 2)
            .reshape(b, s, -1)
        )
        x = x + a.o_proj(o)
        m = self.mlp
        return x + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))  # fmt: skip


class _Model(nn.Module):
    def __init__(self, h: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([_Block(h), _Block(h)])
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _batch(step: int, replica: int) -> torch.Tensor:
    return torch.randint(
        0, 32, (2, 8), generator=torch.Generator().manual_seed(100 * step + replica)
    )


def _config(stage: int, tp: int = 2) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
        "tensor_parallel": {"autotp_size": tp, "preset_model": "llama"},
    }  # fmt: skip


def _rank_main(root: str):
    # both stages in one spawn of 4 ranks: starting them dominates the test's time
    trained = [_train(stage, root) for stage in (1, 2)]
    # the stage-2 run's checkpoint (tp=2 x dp=2) loads at tp=4 (dp=1)
    import ds_tp

    torch.manual_seed(1)  # other initial weights: the load must replace them all
    model = _Model()
    engine, _, _, _ = ds_all.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=_config(2, tp=4)
    )
    engine.load_checkpoint(root, tag="tp2", load_optimizer_states=False)
    assert engine.module.layers[0].mlp.up_proj.weight.shape == (8, 16)
    at_tp4 = ds_tp.gather_full_state_dict(engine.module)
    import torch.distributed as dist

    # the first forward checks that the tensor-parallel ranks got the same batch
    with pytest.raises(RuntimeError, match="got different batches"):
        engine(_batch(0, dist.get_rank()))
    engine.close()
    return trained, at_tp4


def _train(stage: int, root: str):
    import torch.distributed as dist

    import ds_tp

    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before sharding
    engine, _, _, _ = ds_all.initialize(model=model, optimizer=opt, config=_config(stage))
    assert engine.world_size == 2 and engine.train_batch_size() == 4  # dp=2, not the world
    assert engine.module.layers[0].self_attn.num_heads == 2
    replica = dist.get_rank() // 2  # tensor-parallel ranks of a replica read the same batch
    losses, norms = [], []
    for step in range(STEPS):
        loss = engine(_batch(step, replica))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        norms.append(engine.get_global_grad_norm())
    state = ds_tp.gather_full_state_dict(engine.module)
    if stage == 2:
        engine.save_checkpoint(root, tag="tp2")
    engine.close()
    return losses, norms, state


def _plain():
    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, norms = [], []
    for step in range(STEPS):
        per_replica = []
        for replica in (0, 1):
            loss = model(_batch(step, replica)) / 2  # the data-parallel mean
            loss.backward()
            per_replica.append(float(loss.detach()) * 2)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(per_replica)
    return losses, norms, model.state_dict()


def test_tp2_dp2_zero1_and_zero2_equal_one_process(tmp_path):
    results = run_distributed(_rank_main, 4, args=(str(tmp_path),), timeout=240)
    ref_losses, ref_norms, ref_state = _plain()
    for rank, (per_stage, at_tp4) in enumerate(results):
        for k, v in ref_state.items():  # the tp=2 x dp=2 checkpoint, loaded at tp=4
            torch.testing.assert_close(
                at_tp4[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"tp4 {k}: {m}"
            )
        for losses, norms, state in per_stage:
            assert losses == pytest.approx([pair[rank // 2] for pair in ref_losses], rel=1e-5)
            assert norms == pytest.approx(ref_norms, rel=1e-5)
            for k, v in ref_state.items():
                torch.testing.assert_close(
                    state[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
                )


@pytest.mark.parametrize(
    "section, match",
    [
        ({"autotp_size": 2, "tp_overlap_comm": True}, "tp_overlap_comm"),
        ({"autotp_size": 2, "preset_model": "gpt9"}, "preset_model 'gpt9' is not a preset"),
        ({"autotp_size": 2, "partition_config": {"layer_specs": [{"patterns": ["x"], "partition_type": "diag"}]}},
         "not one of 'column'"),
        ({"autotp_size": 2, "tp": {"tp_size": 4}}, r"tp.tp_size \(4\) does not match"),
        ({"autotp_size": 2, "vocab_parallel_lm_head": True}, "vocab_parallel_lm_head"),
    ],
)  # fmt: skip
def test_unsupported_tensor_parallel_settings_are_refused(section, match):
    cfg = ds_all.DeepSpeedConfig.load({"train_batch_size": 1, "tensor_parallel": section})
    with pytest.raises(ConfigError, match=match):
        cfg.tensor_parallel.check_supported()


def test_unknown_key_and_stage3_refused():
    with pytest.raises(ConfigError, match="autotp: unknown key; did you mean 'autotp_size'"):
        ds_all.DeepSpeedConfig.load({"train_batch_size": 1, "tensor_parallel": {"autotp": 2}})
    from ds_all._tensor_parallel import setup_tensor_parallel

    cfg = ds_all.DeepSpeedConfig.load({"train_batch_size": 1, "zero_optimization": {"stage": 3},
                                       "tensor_parallel": {"autotp_size": 2}})  # fmt: skip
    with pytest.raises(ConfigError, match="stage 3"):
        setup_tensor_parallel(_Model(), cfg, None)
    m = ds_all.tp_model_init(_Model(), tp_size=4, dtype=torch.float32)
    cfg = ds_all.DeepSpeedConfig.load(
        {"train_batch_size": 1, "tensor_parallel": {"autotp_size": 2}}
    )
    with pytest.raises(ConfigError, match=r"tp_model_init\(tp_size=4\) does not match"):
        setup_tensor_parallel(m, cfg, None)
    cfg = ds_all.DeepSpeedConfig.load({"train_batch_size": 1})
    with pytest.raises(ConfigError, match="no tensor-parallel group source"):
        setup_tensor_parallel(copy.deepcopy(m), cfg, None)


def test_deepspeed_module_paths():
    from ds_all.module_inject.autotp_config import AutoTPPresets, TPLayerSpec
    from ds_all.module_inject.layers import LinearAllreduce, LinearLayer
    from ds_all.runtime.tensor_parallel import TPTrainingConfig, get_tensor_parallel_config

    assert get_tensor_parallel_config({"tensor_parallel": {"autotp_size": 4}}).autotp_size == 4
    assert TPTrainingConfig().autotp_size == 0 and TPTrainingConfig().dtype == torch.float16
    assert AutoTPPresets.get_preset("llama").layer_specs and AutoTPPresets.get_preset("x") is None
    assert isinstance(AutoTPPresets.get_preset("phi3").layer_specs[0], TPLayerSpec)
    # without a model-parallel group the layers compute the Linear they were built from
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for cls in (LinearAllreduce, LinearLayer):
        lin = nn.Linear(8, 8)
        want = lin(x)
        torch.testing.assert_close(cls(lin, None)(x), want)


def _ckpt_main(root: str):
    """2 ranks: a checkpoint written at tp=2 loads at tp=1 (dp=2) and one written at tp=1
    loads at tp=2, weights and optimizer state (the next step matches)."""
    import ds_tp

    def engine(tp: int):
        torch.manual_seed(0)
        model = _Model()
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}  # fmt: skip
        if tp > 1:
            cfg["tensor_parallel"] = {"autotp_size": tp, "preset_model": "llama"}
        return ds_all.initialize(model=model, config=cfg)[0]

    def step(e, s: int) -> float:
        # every rank the same batch: tp=2 x dp=1 and tp=1 x dp=2 then take the same step
        loss = e(_batch(s, 0))
        e.backward(loss)
        e.step()
        return float(loss.detach())

    out = {}
    for src, dst in ((2, 1), (1, 2)):
        a = engine(src)
        step(a, 0)
        a.save_checkpoint(f"{root}/tp{src}", tag="t")
        saved = ds_tp.gather_full_state_dict(a.module)
        b = engine(dst)
        b.load_checkpoint(f"{root}/tp{src}", tag="t")
        loaded = ds_tp.gather_full_state_dict(b.module)
        # one more step: equal only if the Adam moments and step count came back too
        losses = (step(a, 1), step(b, 1))
        after = (ds_tp.gather_full_state_dict(a.module), ds_tp.gather_full_state_dict(b.module))
        out[(src, dst)] = (saved, loaded, losses, after)
        a.close()
        b.close()
    return out


def test_checkpoint_reshards_between_tensor_parallel_sizes(tmp_path):
    results = run_distributed(_ckpt_main, 2, args=(str(tmp_path),), timeout=240)
    for out in results:
        for (src, dst), (saved, loaded, losses, (after_a, after_b)) in out.items():
            assert losses[1] == pytest.approx(losses[0], rel=1e-5)
            for k, v in saved.items():
                where = f"tp{src}->tp{dst} {k}"
                torch.testing.assert_close(
                    loaded[k], v, rtol=0, atol=0, msg=lambda m, w=where: f"{w}: {m}"
                )
                torch.testing.assert_close(after_b[k], after_a[k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, w=where: f"{w} after a step: {m}")  # fmt: skip


def _partitioned_main():
    """partition_activations over the tensor-parallel group: gradients equal those of the
    block without checkpointing (dropout masks repeat), and each rank keeps half the input."""
    from ds_all import checkpointing
    from ds_tp import build_tensor_parallel_groups

    groups = build_tensor_parallel_groups(2)
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 8))
    x = torch.randn(4, 5, 8)
    out = {}
    saved: list[int] = []
    for mode in ("plain", "partitioned"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        if mode == "plain":
            y = block(xi)
        else:
            checkpointing.configure(groups, partition_activations=True)
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t
            ):
                y = checkpointing.checkpoint(block, xi)
            checkpointing.configure(partition_activations=False)
            out["saved"] = saved
        (y * torch.arange(8.0)).sum().backward()
        out[mode] = (y.detach(), xi.grad, [p.grad.clone() for p in block.parameters()])
    return out


def test_partition_activations_over_the_tensor_parallel_group():
    for out in run_distributed(_partitioned_main, 2, timeout=120):
        (y0, gx0, gp0), (y1, gx1, gp1) = out["plain"], out["partitioned"]
        torch.testing.assert_close(y1, y0)
        torch.testing.assert_close(gx1, gx0)
        for a, b in zip(gp1, gp0):
            torch.testing.assert_close(a, b)
        assert out["saved"] == [4 * 5 * 8 // 2]  # only this rank's half of the input is kept
