"""Run DeepSpeed's flops profiler (or ours, with --ours) on the hand-derivable test models and
print one JSON line per model: the formula's MACs and what the profiler reported.

    /work/dsenv/bin/python tests/compare_deepspeed.py      # DeepSpeed 0.19.8
    python tests/compare_deepspeed.py --ours               # ds-profile

The README's comparison table comes from these two runs.
"""

from __future__ import annotations

import json
import sys

import torch
from _profile_models import (
    CNN,
    MLP,
    SDPA,
    Attention,
    TiedLM,
    attention_input,
    attention_macs,
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


class Broadcast(nn.Module):
    """[L, E] @ [B, E, E]: matmul broadcasting the first operand over the batch."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w


CASES = [
    ("MLP (Linear, GELU, LayerNorm)", MLP(), lambda: [mlp_input()], mlp_macs()),
    (
        "CNN (stride, padding, dilation, groups, transposed)",
        CNN(),
        lambda: [cnn_input()],
        cnn_macs(),
    ),
    ("attention with @, einsum, bmm", Attention(), lambda: [attention_input()], attention_macs()),
    ("SDPA", SDPA(False), lambda: sdpa_inputs(), sdpa_macs(8, 8, 4, False)),
    ("SDPA causal", SDPA(True), lambda: sdpa_inputs(), sdpa_macs(8, 8, 4, True)),
    ("embedding + tied head", TiedLM(), lambda: [tied_input()], tied_macs()),
    (
        "broadcast matmul [8,12] @ [2,12,12]",
        Broadcast(),
        lambda: [torch.randn(8, 12), torch.randn(2, 12, 12)],
        2 * 8 * 12 * 12,
    ),
]


def main() -> None:
    if "--ours" in sys.argv:
        from ds_profile import get_model_profile
    else:
        from deepspeed.profiling.flops_profiler import get_model_profile
    for name, model, args, formula in CASES:
        torch.manual_seed(0)
        flops, macs, _ = get_model_profile(model, args=args(), print_profile=False, as_string=False)
        print(json.dumps({"model": name, "formula_macs": formula, "macs": macs, "flops": flops}))


if __name__ == "__main__":
    main()
