"""The ``fused_optim`` op: multi-tensor Adam/AdamW, LAMB and Lion steps on a device.

`TritonFusedOptim` launches the kernels of `_fused_triton` (one launch per bucket of tensors
sharing device and dtypes); `TorchFusedOptim` is the pure-PyTorch fallback with the same
semantics (used without Triton or a GPU, and as the reference in tests).

Shared semantics of every method:
- `params` are updated in place; with `masters` (fp32 copies of bf16/fp16 params) the update
  runs on the master and the param receives its rounded value in the same pass.
- `exp_avgs`/`exp_avg_sqs` are fp32; `grads` may be fp32, bf16 or fp16.
- `steps` are the per-param float32 step tensors, already incremented by the optimizer.
- `grad_scale` (1-element tensor): gradients are divided by it inline (loss-scale unscale).
- `found_inf` (1-element float tensor): when non-zero the whole update is skipped, decided on
  the device (no host synchronisation in the Triton path).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ds_kernels._registry import Backend, OpImpl

Tensors = Sequence[torch.Tensor]


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here (with the fix), or None when they can."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"Triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    from ds_accel import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cuda" or not accel.is_available():
        return (
            f"no CUDA device (accelerator {accel.device_name()!r}); the Triton kernels need a "
            "GPU (set TRITON_INTERPRET=1 to run them on CPU tensors for testing)"
        )
    return None


# ---------------------------------------------------------------------- fallback (pure torch)
def _scalar(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.item())


class TorchFusedOptim(OpImpl):
    """Reference implementation: per-tensor torch ops in fp32, torch.optim's formulas."""

    backend = Backend.FALLBACK

    def supports(self, device: torch.device) -> bool:
        return True

    @staticmethod
    def _work(p: torch.Tensor, master: torch.Tensor | None) -> torch.Tensor:
        if master is not None:
            return master
        return p if p.dtype == torch.float32 else p.float()

    @staticmethod
    def _grad(g: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
        g = g.float()
        return g / grad_scale if grad_scale is not None else g

    @staticmethod
    def _finish(p: torch.Tensor, w: torch.Tensor) -> None:
        if w is not p:
            p.copy_(w)

    def adam(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
        masters: Tensors | None, steps: Tensors, *, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, decoupled: bool, bias_correction: bool,
        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if found_inf is not None and _scalar(found_inf) != 0:
            return
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            w = self._work(p, masters[i] if masters else None)
            g = self._grad(g, grad_scale)
            step = float(steps[i].item())
            bc1 = 1 - beta1**step if bias_correction else 1.0
            bc2s = math.sqrt(1 - beta2**step) if bias_correction else 1.0
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g.add(w, alpha=weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2s).add_(eps)
            w.addcdiv_(m, denom, value=-(lr / bc1))
            self._finish(p, w)

    def lamb(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
        masters: Tensors | None, steps: Tensors, *, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, bias_correction: bool, max_coeff: float,
        min_coeff: float, grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if found_inf is not None and _scalar(found_inf) != 0:
            return
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            w = self._work(p, masters[i] if masters else None)
            g = self._grad(g, grad_scale)
            step = float(steps[i].item())
            bc1 = 1 - beta1**step if bias_correction else 1.0
            bc2 = 1 - beta2**step if bias_correction else 1.0
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (m / bc1) / ((v / bc2).sqrt() + eps) + weight_decay * w
            w_norm = w.norm()
            u_norm = update.norm()
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
            ratio = ratio.clamp(min_coeff, max_coeff)
            w.sub_(lr * ratio * update)
            self._finish(p, w)

    def lion(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, masters: Tensors | None,
        *, lr: float, beta1: float, beta2: float, weight_decay: float,
        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if found_inf is not None and _scalar(found_inf) != 0:
            return
        for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
            w = self._work(p, masters[i] if masters else None)
            g = self._grad(g, grad_scale)
            w.mul_(1 - lr * weight_decay)
            update = (m * beta1).add_(g, alpha=1 - beta1).sign_()
            w.add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
            self._finish(p, w)

    def check_finite(
        self, grads: Tensors, found_inf: torch.Tensor, grad_scale: torch.Tensor | None = None
    ) -> None:
        for g in grads:
            g = self._grad(g, grad_scale)
            if not bool(torch.isfinite(g).all()):
                found_inf.fill_(1.0)
                return


# ---------------------------------------------------------------------- Triton
class _Layout:
    """Device tables for one bucket: pointer tables per tensor role and the chunk table."""

    def __init__(self, roles: dict[str, Tensors], numels: list[int], device: torch.device):
        from ds_kernels._fused_triton import CHUNK

        self.tables = {
            role: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device)
            for role, ts in roles.items()
        }
        counts = torch.tensor([max(1, -(-n // CHUNK)) for n in numels], dtype=torch.int64)
        self.n_chunks = int(counts.sum())
        tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(self.n_chunks) - first[tensor_of_chunk]) * CHUNK
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        self.chunk_tensor = tensor_of_chunk.to(device=device, dtype=torch.int32)
        self.chunk_start = start.to(device=device, dtype=torch.int64)


class TritonFusedOptim(OpImpl):
    """Launches the Triton kernels; caches the tables of each tensor layout it has seen."""

    backend = Backend.TRITON
    _MAX_LAYOUTS = 64

    def __init__(self) -> None:
        from ds_kernels import _fused_triton

        self._k = _fused_triton
        self._interpret = os.environ.get("TRITON_INTERPRET") == "1"
        self._layouts: OrderedDict[tuple, _Layout] = OrderedDict()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (self._interpret and device.type == "cpu")

    def _layout(self, kind: str, roles: dict[str, Tensors]) -> _Layout:
        # The key holds every address and size (and the chunk size): a table is reused only
        # while it describes exactly the tensors of this call. Memory freed and reused by new
        # tensors of other sizes, or grads reallocated elsewhere, produce a new key.
        key = (
            kind,
            self._k.CHUNK,
            tuple((r, tuple((t.data_ptr(), t.numel()) for t in ts)) for r, ts in roles.items()),
        )
        layout = self._layouts.get(key)
        if layout is None:
            first = next(iter(roles.values()))
            layout = _Layout(roles, [t.numel() for t in first], first[0].device)
            self._layouts[key] = layout
            if len(self._layouts) > self._MAX_LAYOUTS:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout

    @staticmethod
    def _check(ref: Tensors, **lists: Tensors | None) -> None:
        for name, ts in lists.items():
            if ts is None:
                continue
            if len(ts) != len(ref):
                raise ValueError(f"fused_optim: {name} has {len(ts)} tensors for {len(ref)} params")
            for i, (t, p) in enumerate(zip(ts, ref)):
                if not t.is_contiguous() or t.numel() != p.numel() or t.device != p.device:
                    raise ValueError(
                        f"fused_optim: {name}[{i}] must be contiguous, on {p.device}, with "
                        f"{p.numel()} elements (got {tuple(t.shape)} on {t.device})"
                    )

    @staticmethod
    def _bias(steps: Tensors, beta: float, enabled: bool, device: torch.device) -> torch.Tensor:
        """1 - beta**step per tensor, formed in float64 on the device (no host sync)."""
        if not enabled:
            return torch.ones(len(steps), dtype=torch.float64, device=device)
        s = torch.stack([st.reshape(()) for st in steps]).to(device=device, dtype=torch.float64)
        return 1 - torch.pow(beta, s)

    def _common(self, params: Tensors, grads: Tensors, masters: Tensors | None, extra: dict):
        self._check(params, grads=grads, masters=masters, **extra)
        roles: dict[str, Tensors] = {"p": params, "g": grads, **extra}
        if masters:
            roles["w"] = masters
        layout = self._layout("+".join(roles), roles)
        w_tab = layout.tables["w"] if masters else layout.tables["p"]
        return layout, w_tab

    def _flags(self, params, grads, masters, grad_scale, found_inf) -> dict:
        return dict(
            P_DT=self._k.tl_dtype(params[0].dtype), G_DT=self._k.tl_dtype(grads[0].dtype),
            HAS_MASTER=bool(masters), HAS_SCALE=grad_scale is not None,
            HAS_INF=found_inf is not None, BLOCK=self._k.BLOCK, ITERS=self._k.ITERS,
        )  # fmt: skip

    def adam(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
        masters: Tensors | None, steps: Tensors, *, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, decoupled: bool, bias_correction: bool,
        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if not params:
            return
        layout, w_tab = self._common(params, grads, masters, {"m": exp_avgs, "v": exp_avg_sqs})
        dev = params[0].device
        bc1 = self._bias(steps, beta1, bias_correction, dev)
        bc2s = self._bias(steps, beta2, bias_correction, dev).sqrt().to(torch.float32)
        neg_step = (-lr / bc1).to(torch.float32)
        dummy = layout.numel
        flags = self._flags(params, grads, masters, grad_scale, found_inf)
        self._k._adam_kernel[(layout.n_chunks,)](
            layout.tables["p"], layout.tables["g"], layout.tables["m"], layout.tables["v"], w_tab,
            layout.numel, layout.chunk_tensor, layout.chunk_start, neg_step, bc2s,
            1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            DECOUPLED=bool(decoupled), num_warps=self._k.NUM_WARPS, **flags,
        )  # fmt: skip

    def lamb(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
        masters: Tensors | None, steps: Tensors, *, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, bias_correction: bool, max_coeff: float,
        min_coeff: float, grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if not params:
            return
        layout, w_tab = self._common(params, grads, masters, {"m": exp_avgs, "v": exp_avg_sqs})
        dev = params[0].device
        bc1 = self._bias(steps, beta1, bias_correction, dev).to(torch.float32)
        bc2 = self._bias(steps, beta2, bias_correction, dev).to(torch.float32)
        norms = torch.zeros(2 * len(params), dtype=torch.float32, device=dev)
        dummy = layout.numel
        flags = self._flags(params, grads, masters, grad_scale, found_inf)
        grid = (layout.n_chunks,)
        self._k._lamb_phase1[grid](
            layout.tables["p"], layout.tables["g"], layout.tables["m"], layout.tables["v"], w_tab,
            layout.numel, layout.chunk_tensor, layout.chunk_start, bc1, bc2, norms,
            beta1, beta2, eps, weight_decay,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            num_warps=self._k.NUM_WARPS, **flags,
        )  # fmt: skip
        self._k._lamb_phase2[grid](
            layout.tables["p"], layout.tables["m"], layout.tables["v"], w_tab,
            layout.numel, layout.chunk_tensor, layout.chunk_start, bc1, bc2, norms,
            lr, eps, weight_decay, max_coeff, min_coeff,
            found_inf if found_inf is not None else dummy,
            P_DT=flags["P_DT"], HAS_MASTER=flags["HAS_MASTER"], HAS_INF=flags["HAS_INF"],
            BLOCK=flags["BLOCK"], ITERS=flags["ITERS"], num_warps=self._k.NUM_WARPS,
        )  # fmt: skip

    def lion(
        self, params: Tensors, grads: Tensors, exp_avgs: Tensors, masters: Tensors | None,
        *, lr: float, beta1: float, beta2: float, weight_decay: float,
        grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        if not params:
            return
        layout, w_tab = self._common(params, grads, masters, {"m": exp_avgs})
        dummy = layout.numel
        flags = self._flags(params, grads, masters, grad_scale, found_inf)
        self._k._lion_kernel[(layout.n_chunks,)](
            layout.tables["p"], layout.tables["g"], layout.tables["m"], w_tab,
            layout.numel, layout.chunk_tensor, layout.chunk_start,
            1 - lr * weight_decay, -lr, beta1, beta2,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            num_warps=self._k.NUM_WARPS, **flags,
        )  # fmt: skip

    def check_finite(
        self, grads: Tensors, found_inf: torch.Tensor, grad_scale: torch.Tensor | None = None
    ) -> None:
        if not grads:
            return
        layout = self._layout("g", {"g": grads})
        self._k._nonfinite_kernel[(layout.n_chunks,)](
            layout.tables["g"], layout.numel, layout.chunk_tensor, layout.chunk_start,
            grad_scale if grad_scale is not None else layout.numel, found_inf,
            G_DT=self._k.tl_dtype(grads[0].dtype), HAS_SCALE=grad_scale is not None,
            BLOCK=self._k.BLOCK, ITERS=self._k.ITERS, num_warps=self._k.NUM_WARPS,
        )  # fmt: skip
