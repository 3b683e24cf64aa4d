"""The experts one rank holds, run over tokens already grouped by local expert.

Two implementations of one interface, ``forward(x, group_sizes) -> y`` where ``x`` holds the
rows of local expert 0, then 1, ... (``group_sizes`` rows each, possibly padded):

- ``GroupedMLPExperts``: when the user's expert is ``Sequential(Linear, activation, Linear)``,
  the weights of all local experts are stacked into [E_local, out, in] tensors and run with one
  grouped GEMM per layer (``torch._grouped_mm``; a loop of GEMMs where that is unavailable).
  On CUDA with Triton, the first layer's bias and a ReLU/GELU/SiLU can run as one fused pass
  (``_bias_act``; opt-in).
- ``LoopExperts``: any other module, deep-copied once per local expert and called per group.

Both start every local expert as a copy of the user's ``expert`` (DeepSpeed does the same); the
router breaks the symmetry.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ds_moe._bias_act import bias_act, fused_bias_act_requested, fused_code
from ds_moe._grouped_gemm import (
    group_onehot,
    grouped_linear,
    grouped_mm_available,
    row_alignment,
)
from ds_moe._params import deepcopy_keeping_marks

#: element-wise activations that may run on the packed rows of all experts at once
_ELEMENTWISE = (
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
)


def mlp_parts(expert: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear] | None:
    """The (fc1, activation, fc2) of a plain 2-layer MLP expert, else None."""
    if not isinstance(expert, nn.Sequential) or len(expert) != 3:
        return None
    fc1, act, fc2 = expert[0], expert[1], expert[2]
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        return None
    if not isinstance(act, _ELEMENTWISE) or list(act.parameters()):
        return None
    if fc1.out_features != fc2.in_features or (fc1.bias is None) != (fc2.bias is None):
        return None
    return fc1, act, fc2


class GroupedMLPExperts(nn.Module):
    """``E_local`` two-layer MLPs stored stacked: ``w1`` [E, ffn, d], ``w2`` [E, d, ffn].

    The [E, out, in] layout is ``nn.Linear``'s per expert, so a stacked weight slices back into
    a Linear's; its transpose is the column-major B operand the grouped kernel prefers.
    """

    w1: nn.Parameter
    b1: nn.Parameter | None
    w2: nn.Parameter
    b2: nn.Parameter | None
    activation: nn.Module
    use_grouped_mm: bool | None
    #: the fused bias + activation kernel: True on (where its probe passes), False off, None
    #: as DS_MOE_FUSED_BIAS_ACT says (1: on; unset: off, until it is timed on a GPU)
    fuse_bias_act: bool | None = None

    def __init__(
        self, expert: nn.Module, num_local_experts: int, use_grouped_mm: bool | None = None
    ):
        super().__init__()
        parts = mlp_parts(expert)
        if parts is None:
            raise TypeError(
                "GroupedMLPExperts needs an expert of the form nn.Sequential(nn.Linear, "
                "<element-wise activation>, nn.Linear); pass grouped_experts=False to run any "
                "other module in a loop"
            )
        fc1, act, fc2 = parts

        def stack(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().unsqueeze(0).repeat(num_local_experts, *[1] * t.dim()))

        self.w1 = stack(fc1.weight)
        self.w2 = stack(fc2.weight)
        self.b1 = stack(fc1.bias) if fc1.bias is not None else None
        self.b2 = stack(fc2.bias) if fc2.bias is not None else None
        self.activation = copy.deepcopy(act)
        self.use_grouped_mm = use_grouped_mm

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def __deepcopy__(self, memo):
        return deepcopy_keeping_marks(self, memo)

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is False:
            return False
        # The kernels need 16-byte aligned rows of both operands.
        aligned = all((n * x.element_size()) % 16 == 0 for n in self.w1.shape[1:])
        ok = aligned and x.dtype == self.w1.dtype and grouped_mm_available(x.device, x.dtype)
        if self.use_grouped_mm and not ok:
            raise RuntimeError(
                f"grouped GEMM was requested but torch._grouped_mm cannot run here "
                f"(device {x.device}, dtype {x.dtype}, weight {tuple(self.w1.shape)}, "
                f"torch {torch.__version__}); pass use_grouped_mm=None to fall back to a loop"
            )
        return ok

    def row_alignment(self, x: torch.Tensor) -> int:
        return row_alignment(x.device) if self._grouped_ok(x) else 1

    def forward(
        self,
        x: torch.Tensor,
        group_sizes: list[int] | None = None,
        *,
        offs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows of local expert g are ``group_sizes[g]`` rows, or end at ``offs[g]``.

        With ``offs`` (int32 on x's device) and the grouped kernel nothing syncs with the
        host; rows after ``offs[-1]`` are left undefined in the output (nobody reads them).
        """
        if self._grouped_ok(x) and x.shape[0] > 0:
            if offs is None:
                assert group_sizes is not None
                ends = torch.tensor(group_sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                offs = ends.to(x.device, non_blocking=True)
            onehot = None
            if self.b1 is not None:
                onehot = group_onehot(offs, x.shape[0], x.dtype)
            fuse = fused_bias_act_requested(self.fuse_bias_act)
            act = fused_code(self.activation, self.b1, x) if fuse else None
            if act is not None:
                # one pass over [rows, ffn] for b1 and the activation, each way (_bias_act)
                h = bias_act(grouped_linear(x, self.w1, None, offs), self.b1, offs, act)
            else:
                h = self.activation(grouped_linear(x, self.w1, self.b1, offs, onehot=onehot))
            return grouped_linear(h, self.w2, self.b2, offs, onehot=onehot)
        sizes, tail = _host_sizes(x, group_sizes, offs)
        h = self.activation(grouped_linear(x[: x.shape[0] - tail], self.w1, self.b1, None, sizes))
        y = grouped_linear(h, self.w2, self.b2, None, sizes)
        return torch.cat([y, y.new_zeros(tail, y.shape[1])]) if tail else y


def _host_sizes(
    x: torch.Tensor, group_sizes: list[int] | None, offs: torch.Tensor | None
) -> tuple[list[int], int]:
    """Group sizes on the host and the number of rows after the last group.

    Only the loop implementations need them; from device ``offs`` this is one host sync
    (the grouped kernel path never gets here).
    """
    if group_sizes is not None:
        return list(group_sizes), x.shape[0] - sum(group_sizes)
    assert offs is not None
    ends = offs.tolist()
    sizes = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    return sizes, x.shape[0] - (ends[-1] if ends else 0)


class LoopExperts(nn.Module):
    """Any expert module, one deep copy per local expert, called on its group of rows."""

    experts: nn.ModuleList

    def __init__(self, expert: nn.Module, num_local_experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_local_experts))

    @property
    def num_local_experts(self) -> int:
        return len(self.experts)

    def __deepcopy__(self, memo):
        return deepcopy_keeping_marks(self, memo)

    def row_alignment(self, x: torch.Tensor) -> int:
        return 1

    def forward(
        self,
        x: torch.Tensor,
        group_sizes: list[int] | None = None,
        *,
        offs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sizes, tail = _host_sizes(x, group_sizes, offs)
        # Every expert runs, even on zero rows, so that hooks (ZeRO-3 gathers) fire on all ranks.
        outs = [e(seg) for e, seg in zip(self.experts, x[: x.shape[0] - tail].split(sizes))]
        # an expert returning (output, bias), as Megatron-style MLPs do: the bias is ignored,
        # as DeepSpeed's Experts does
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        if tail:
            outs.append(x.new_zeros(tail, outs[0].shape[1] if outs else x.shape[1]))
        return torch.cat(outs)


def build_local_experts(
    expert: nn.Module, num_local_experts: int, grouped: bool | None
) -> GroupedMLPExperts | LoopExperts:
    """Stacked MLP experts when the expert is a plain MLP (or ``grouped=True``), else a loop."""
    if grouped is False:
        return LoopExperts(expert, num_local_experts)
    if mlp_parts(expert) is None:
        if grouped:
            raise TypeError(
                "grouped_experts=True needs expert=nn.Sequential(nn.Linear(d, f), <element-wise "
                f"activation>, nn.Linear(f, d)); got {type(expert).__name__}. Use "
                "grouped_experts=None to fall back to a loop over expert copies"
            )
        return LoopExperts(expert, num_local_experts)
    return GroupedMLPExperts(expert, num_local_experts)
