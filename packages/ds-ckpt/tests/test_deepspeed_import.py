"""Tier 2: real DeepSpeed ZeRO 1/2/3 checkpoints (CPU, gloo, 2 ranks) imported and checked.

Needs the optional extra `ds-ckpt[deepspeed-test]` (deepspeed==0.19.8); skipped without it.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

import ds_ckpt


def _real_deepspeed() -> bool:
    """DeepSpeed itself, not this project's `deepspeed` alias over ds-all (ds-deepspeed, whose
    version carries '+dsall'), which writes no DeepSpeed checkpoint files."""
    try:
        return "+dsall" not in importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(
    not _real_deepspeed(),
    reason="DeepSpeed not installed (pip install 'ds-ckpt[deepspeed-test]')",
)
STEPS = 3


class Tiny(torch.nn.Module):
    """Odd sizes (padding in every layout), a buffer and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("scale", torch.tensor([2.0, 0.5, 1.0]))

    def forward(self, x):
        return (self.fc2(torch.relu(self.fc1(x))) * self.scale + self.frozen).pow(2).mean()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(step))


def _make_ds_checkpoints(out: str) -> None:
    """Runs on each of 2 ranks: ZeRO 1, 2, 3 training then save_checkpoint."""
    import deepspeed

    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = Tiny()
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        eng, *_ = deepspeed.initialize(
            model=model,
            config=cfg,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        for s in range(STEPS):
            loss = eng(_batch(s))
            eng.backward(loss)
            eng.step()
        eng.save_checkpoint(
            os.path.join(out, f"z{stage}"), tag=f"global_step{STEPS}", client_state={"hello": 1}
        )


def _reference() -> tuple[dict[str, torch.Tensor], torch.optim.AdamW, Tiny]:
    """The same training in one process with torch AdamW (both ranks saw the same batches)."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in range(STEPS):
        opt.zero_grad()
        model(_batch(s)).backward()
        # DeepSpeed clips the gradient norm at 1.0 by default (its optimizer state says so)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
    return dict(model.named_parameters()), opt, model


@pytest.fixture(scope="module")
def ds_ckpts(tmp_path_factory):
    from ds_comm.testing import run_distributed

    out = str(tmp_path_factory.mktemp("ds"))
    run_distributed(
        _make_ds_checkpoints, 2, args=(out,), timeout=240, env={"DS_ACCELERATOR": "cpu"}
    )
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_import_deepspeed_zero(ds_ckpts, tmp_path, stage):
    from ds_ckpt._cli import main

    src = os.path.join(ds_ckpts, f"z{stage}")
    out = tmp_path / "ours"
    assert main(["import-deepspeed", src, str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    params, opt, model = _reference()
    cs = ds_ckpt.load(out)
    assert cs["hello"] == 1
    assert cs["deepspeed"]["global_steps"] == STEPS and cs["deepspeed"]["zero_stage"] == stage
    assert cs["deepspeed"]["param_groups"][0]["lr"] == 1e-2
    for name, p in params.items():
        got = ds_ckpt.load_tensor(out, name)
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        if not p.requires_grad:
            continue
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                ds_ckpt.load_tensor(out, f"optimizer.{key}.{name}"),
                st[key],
                rtol=1e-5,
                atol=1e-7,
                msg=f"{key} {name}",
            )
        assert float(ds_ckpt.load_tensor(out, f"optimizer.step.{name}")) == STEPS
    assert torch.equal(ds_ckpt.load_tensor(out, "scale"), model.scale)


@pytest.mark.parametrize("stage", [1, 3])
def test_import_matches_deepspeeds_own_fp32_reconstruction(ds_ckpts, tmp_path, stage):
    """Bitwise against zero_to_fp32 (DeepSpeed's reader, which unpickles: test-only peer)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = os.path.join(ds_ckpts, f"z{stage}")
    ds_ckpt._deepspeed.import_deepspeed(src, str(tmp_path / "ours"))
    ref = get_fp32_state_dict_from_zero_checkpoint(src)
    for name, t in ref.items():
        assert torch.equal(ds_ckpt.load_tensor(tmp_path / "ours", name), t.contiguous()), name
