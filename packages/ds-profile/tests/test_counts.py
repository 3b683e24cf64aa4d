"""Exact FLOP/MAC counts against hand-derived formulas and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from _profile_models import (
    CNN,
    MLP,
    SDPA,
    Attention,
    B,
    D,
    E,
    H,
    L,
    TiedLM,
    attention_input,
    attention_macs,
    cnn_bias_flops,
    cnn_input,
    cnn_macs,
    mlp_input,
    mlp_macs,
    sdpa_inputs,
    sdpa_macs,
    tied_input,
    tied_macs,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ds_profile import FlopsProfiler, attention_pairs, get_model_profile


def profile(model: nn.Module, *args: torch.Tensor) -> tuple[int, int]:
    flops, macs, _ = get_model_profile(
        model, args=list(args), print_profile=False, as_string=False, warm_up=0
    )
    return flops, macs


def torch_flops(model: nn.Module, *args: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def test_mlp_macs_and_flops():
    flops, macs = profile(MLP(), mlp_input())
    assert macs == mlp_macs()
    # GELU 1 per element, affine LayerNorm 5 per element (DeepSpeed's factors), products 2/MAC
    assert flops == 2 * mlp_macs() + B * L * 32 * (1 + 5)


def test_cnn_stride_padding_dilation_groups_transposed():
    flops, macs = profile(CNN(), cnn_input())
    assert macs == cnn_macs()
    # + ReLU per element + each convolution's bias add per output element
    assert flops == 2 * cnn_macs() + B * 8 * 9 * 9 + cnn_bias_flops()


def test_conv_bias_add_counted():
    """A convolution's bias add is out_channels x output positions FLOPs (DeepSpeed's count),
    for a forward and a transposed convolution, and nothing without a bias."""
    x = torch.randn(B, 3, 9, 9)
    with_bias, macs = profile(nn.Conv2d(3, 8, 3), x)
    without, macs_nb = profile(nn.Conv2d(3, 8, 3, bias=False), x)
    assert macs == macs_nb == B * 7 * 7 * 8 * 3 * 3 * 3
    assert without == 2 * macs
    assert with_bias == 2 * macs + B * 8 * 7 * 7
    t_flops, t_macs = profile(nn.ConvTranspose1d(4, 6, 3, stride=2), torch.randn(B, 4, 5))
    assert t_macs == B * 5 * 4 * 6 * 3  # every input position scatters a kernel per filter
    assert t_flops == 2 * t_macs + B * 6 * 11  # output length (5 - 1) * 2 + 3 = 11


def test_attention_with_matmul_einsum_bmm():
    flops, macs = profile(Attention(), attention_input())
    assert macs == attention_macs()
    assert flops == 2 * attention_macs() + B * H * L * L  # + softmax per element


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(L, L), (5, 9), (9, 5)])
def test_sdpa(causal, lq, lk):
    flops, macs = profile(SDPA(causal), *sdpa_inputs(lq, lk, D))
    assert macs == sdpa_macs(lq, lk, D, causal)
    pairs = sdpa_macs(lq, lk, D, causal) // (2 * D)
    assert flops == 2 * macs + pairs  # + softmax per kept score


def test_sdpa_math_backend_same_count():
    """A value head size unlike the query's sends CPU SDPA to the math backend (bmm, softmax
    kernels): same total as the fused kernel's formula."""
    flops, macs = profile(SDPA(False), *sdpa_inputs(5, 9, 6))
    assert macs == sdpa_macs(5, 9, 6, False)
    assert flops == 2 * macs + B * H * 5 * 9


def test_causal_pairs_match_torch_mask():
    for lq, lk in [(1, 1), (4, 4), (3, 7), (7, 3)]:
        mask = torch.ones(lq, lk, dtype=torch.bool).tril()
        assert attention_pairs(lq, lk, True) == int(mask.sum())


def test_embedding_and_tied_head():
    model = TiedLM()
    flops, macs = profile(model, tied_input())
    assert macs == tied_macs()
    assert flops == 2 * tied_macs() + 5 * B * L * E  # lookup is free; LayerNorm 5/element
    # the shared weight is one parameter
    assert (
        get_model_profile(model, args=[tied_input()], print_profile=False, as_string=False)[2]
        == 50 * E + 2 * E
    )


@pytest.mark.parametrize(
    "model,args",
    [
        (nn.Sequential(nn.Linear(12, 32), nn.Linear(32, 5)), lambda: [mlp_input()]),
        # groups=1 here: FlopCounterMode (torch 2.13) charges a grouped convolution's backward
        # 5x its forward instead of 2x (see test_grouped_conv_backward)
        (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)
            ),
            lambda: [cnn_input()],
        ),
        (Attention(), lambda: [attention_input()]),
    ],
)
def test_products_agree_with_flop_counter_mode(model, args):
    """Same ops on both sides (products only, no norms or softmax): same total, forward and
    forward + backward."""
    inputs = args()
    flops, _ = profile(model, *inputs)
    if isinstance(model, Attention):
        flops -= B * H * L * L  # softmax: FlopCounterMode counts products only
    if isinstance(model[0] if isinstance(model, nn.Sequential) else model, nn.Conv2d):
        flops -= 2 * B * 8 * 9 * 9  # conv bias adds (one per output): FlopCounterMode omits them
    assert flops == torch_flops(model, *inputs)

    model.train()
    prof = FlopsProfiler(model)
    x = [t.requires_grad_() for t in args()]
    with FlopCounterMode(display=False) as counter:
        prof.start_profile()
        model(*x).sum().backward()
        prof.stop_profile()
    ours = int(prof.get_total_flops()) + int(prof.get_total_backward_flops())
    if isinstance(model[0] if isinstance(model, nn.Sequential) else model, nn.Conv2d):
        ours -= 2 * B * 8 * 9 * 9  # forward bias adds, as above
    softmax = 3 * B * H * L * L if isinstance(model, Attention) else 0  # fwd 1 + bwd 2 per element
    assert ours - softmax == counter.get_total_flops()
    prof.end_profile()


def test_backward_is_twice_forward_for_products():
    model = nn.Sequential(nn.Linear(12, 32, bias=False), nn.Linear(32, 5, bias=False))
    prof = FlopsProfiler(model)
    x = mlp_input().requires_grad_()
    prof.start_profile()
    model(x).sum().backward()
    prof.stop_profile()
    assert prof.get_total_backward_macs() == 2 * prof.get_total_macs() == 2 * mlp_macs()
    # without an input gradient the first layer's dgrad product is not run (and not counted)
    prof.start_profile()
    model(mlp_input()).sum().backward()
    prof.stop_profile()
    assert prof.get_total_backward_macs() == 2 * mlp_macs() - B * L * 12 * 32
    prof.end_profile()


def test_grouped_conv_backward():
    """Input and weight gradients of a grouped convolution: one forward-sized product each."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    x = torch.randn(B, 8, 9, 9, requires_grad=True)
    prof = FlopsProfiler(conv)
    prof.start_profile()
    conv(x).sum().backward()
    prof.stop_profile()
    fwd_macs = B * 9 * 9 * 8 * 2 * 3 * 3
    assert prof.get_total_macs() == fwd_macs
    assert prof.get_total_backward_macs() == 2 * fwd_macs
    prof.end_profile()


def test_sdpa_backward_twice_forward():
    model = SDPA(causal=True)
    q, k, v = (t.requires_grad_() for t in sdpa_inputs())
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(q, k, v).sum().backward()
    prof.stop_profile()
    assert (
        prof.get_total_backward_macs() == 2 * prof.get_total_macs() == 2 * sdpa_macs(L, L, D, True)
    )
    assert prof.get_total_backward_flops() == 2 * prof.get_total_flops()
    prof.end_profile()


def test_per_module_attribution_and_depth():
    model = MLP()
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(mlp_input())
    assert prof.module_macs(model.fc1) == B * L * 12 * 32
    assert prof.module_macs(model.fc2) == B * L * 32 * 5
    assert prof.module_flops(model.norm) == 5 * B * L * 32
    assert prof.module_macs(model) == mlp_macs()
    assert prof.get_total_params() == sum(p.numel() for p in model.parameters())
    assert prof.get_total_duration() > 0
    prof.end_profile()


def test_ops_outside_modules_are_not_charged():
    """A loss computed outside the model is not part of the model's forward (as DeepSpeed)."""
    model = nn.Linear(4, 4, bias=False)
    prof = FlopsProfiler(model)
    prof.start_profile()
    y = model(torch.randn(2, 4))
    _ = y @ torch.randn(4, 4)
    assert prof.get_total_macs() == 2 * 4 * 4
    prof.end_profile()


def test_ignore_list_charges_the_parent():
    model = MLP()
    prof = FlopsProfiler(model)
    prof.start_profile(ignore_list=[nn.Linear])
    model(mlp_input())
    assert prof.module_macs(model.fc1) == 0  # not profiled itself...
    assert prof.get_total_macs() == mlp_macs()  # ...its work lands in MLP's own count
    prof.end_profile()


def test_strings_and_reset():
    model = MLP()
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(mlp_input())
    assert prof.get_total_macs(as_string=True) == "8.7 KMACs"
    assert prof.get_total_params(as_string=True) == "640"
    prof.reset_profile()
    assert prof.get_total_macs() == 0
    model(mlp_input())
    assert prof.get_total_macs() == mlp_macs()
    prof.end_profile()
    with pytest.raises(RuntimeError, match="start_profile"):
        prof.get_total_flops()
    # DeepSpeed raises AttributeError there: code catching that keeps working
    with pytest.raises(AttributeError, match="start_profile"):
        prof.get_total_macs()


def test_get_model_profile_as_strings_and_input_shape():
    flops, macs, params = get_model_profile(MLP(), input_shape=(B, L, 12), print_profile=False)
    assert (flops, macs, params) == ("20.48 K", "8.7 KMACs", "640")


def test_bad_input_errors():
    with pytest.raises(ValueError, match="input_shape"):
        get_model_profile(MLP(), input_shape=[2, 12])
    with pytest.raises(ValueError, match="args"):
        get_model_profile(MLP())
    with pytest.raises(TypeError, match="nn.Module"):
        FlopsProfiler(lambda x: x)
    with pytest.raises(ValueError, match="mode"):
        get_model_profile(MLP(), args=[mlp_input()], mode="backward")
