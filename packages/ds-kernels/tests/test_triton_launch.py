"""``DirectLauncher``: which launches go through Triton's JIT and which call the compiled kernel,
with what arguments. A stand-in kernel records both (no Triton needed); the GPU test in
``test_quantize_kernels`` checks the real thing bit for bit."""

import types

import pytest
import torch

from ds_kernels._triton_launch import (
    DIRECT_VERSIONS,
    DirectLauncher,
    LaunchPlan,
    direct_launch_supported,
)


class _Compiled:
    """What a JIT launch returns: the launcher (``run``) and its handles."""

    def __init__(self, kernel, spec):
        self.spec = spec
        self.function = object()
        self.packed_metadata = ("packed", spec)
        self.calls = []
        kernel.compiled.append(self)

    def run(self, *args):
        self.calls.append(args)


class _Kernel:
    """A JIT kernel with runtime parameters ``x_ptr, n`` then constexprs ``BLOCK, BPP``."""

    arg_names = ["x_ptr", "out_ptr", "n", "BLOCK", "BPP"]
    constexprs = [3, 4]

    def __init__(self):
        self.jit = []
        self.compiled = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit.append((grid, args, kwargs))
            return _Compiled(self, (args, kwargs))

        return launch


class _Driver:
    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 1000 + device


class _HookChain:
    """Triton's (3.6 on) launch hook: a chain, empty unless a profiler adds a hook."""

    def __init__(self):
        self.calls = []


def _launcher(direct=True, chains=False):
    kernel = _Kernel()
    if chains:
        knobs = types.SimpleNamespace(launch_enter_hook=_HookChain(), launch_exit_hook=_HookChain())
    else:
        knobs = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    launcher = DirectLauncher(kernel, direct, driver=_Driver(), knobs=knobs)
    plan = LaunchPlan.build(kernel, (5, 2), {"BLOCK": 64, "num_warps": 2, "BPP": 8})
    return kernel, launcher, plan


def test_plan_orders_constexprs_by_signature_and_keys_options():
    kernel, _, plan = _launcher()
    assert plan.grid == (5, 2, 1)
    assert plan.tail == (64, 8)
    assert plan.kwargs == {"BLOCK": 64, "num_warps": 2, "BPP": 8}
    other = LaunchPlan.build(kernel, (5, 2), {"BLOCK": 64, "num_warps": 4, "BPP": 8})
    assert other.key != plan.key  # another option, another compiled kernel
    with pytest.raises(ValueError, match=r"constexpr \['BPP'\] not given"):
        LaunchPlan.build(kernel, (1,), {"BLOCK": 64})
    bad = _Kernel()
    bad.arg_names = ["x_ptr", "BLOCK", "n", "out_ptr", "BPP"]
    bad.constexprs = [1, 4]
    with pytest.raises(ValueError, match="must come last"):
        LaunchPlan.build(bad, (1,), {"BLOCK": 64, "BPP": 8})


def test_second_launch_of_a_specialization_calls_the_compiled_kernel():
    kernel, launcher, plan = _launcher()
    x, out = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    first = launcher(plan, x, out, 64)
    assert len(kernel.jit) == 1 and kernel.jit[0][1] == (x, out, 64)
    assert kernel.jit[0][2] == {"BLOCK": 64, "num_warps": 2, "BPP": 8}
    again = launcher(plan, x, out, 64)
    assert again is first and len(kernel.jit) == 1
    assert first.calls == [
        (5, 2, 1, 1000, first.function, first.packed_metadata, None, None, None,
         x, out, 64, 64, 8)
    ]  # fmt: skip
    assert (launcher.jit_launches, launcher.direct_launches) == (1, 1)


@pytest.mark.parametrize(
    "change",
    ["misaligned", "dtype", "n_one", "n_odd", "n_wide", "device", "plan"],
)
def test_anything_triton_specializes_on_gets_its_own_compiled_kernel(change):
    """A cached kernel is launched only with arguments of the same specialization: another
    dtype, a pointer off 16-byte alignment, an integer that is 1, not a multiple of 16 or
    past int32, another device or another plan each go through the JIT path first."""
    kernel, launcher, plan = _launcher()
    buf = torch.zeros(80, dtype=torch.float16)
    x, out, n = buf[:64], torch.zeros(64), 64
    launcher(plan, x, out, n)
    launcher(plan, x, out, n)
    assert len(kernel.jit) == 1
    if change == "misaligned":
        x = buf[1:65]  # 2 bytes past the allocation's start
    elif change == "dtype":
        x = buf.bfloat16()[:64]
    elif change == "n_one":
        n = 1
    elif change == "n_odd":
        n = 63
    elif change == "n_wide":
        n = 2**31 + 16
    elif change == "device":
        launcher._driver.device = 1
    else:
        plan = LaunchPlan.build(kernel, (5, 2), {"BLOCK": 128, "num_warps": 2, "BPP": 8})
    launcher(plan, x, out, n)
    assert len(kernel.jit) == 2, change
    launcher(plan, x, out, n)
    assert len(kernel.jit) == 2 and kernel.compiled[1].calls, change
    # a multiple of 16 other than the first keeps the first one's kernel
    if change == "plan":
        return
    kernel2, launcher2, plan2 = _launcher()
    launcher2(plan2, buf[:64], out, 64)
    launcher2(plan2, buf[16:], out, 32)
    assert len(kernel2.jit) == 1 and len(kernel2.compiled[0].calls) == 1


@pytest.mark.parametrize("chains", [False, True])
def test_launch_hooks_and_direct_off_take_the_jit_path(chains):
    """Hooks unset (None, or empty chains) launch directly; once a profiler adds one, the JIT
    path runs, which calls it."""
    kernel, launcher, plan = _launcher(chains=chains)
    x, out = torch.zeros(64), torch.zeros(64)
    launcher(plan, x, out, 64)
    launcher(plan, x, out, 64)
    assert launcher.direct_launches == 1
    if chains:
        launcher._knobs.launch_exit_hook.calls.append(print)
    else:
        launcher._knobs.launch_enter_hook = print
    launcher(plan, x, out, 64)
    assert len(kernel.jit) == 2 and launcher.direct_launches == 1
    kernel, launcher, plan = _launcher(direct=False)
    for _ in range(3):
        launcher(plan, x, out, 64)
    assert len(kernel.jit) == 3 and not any(c.calls for c in kernel.compiled)


def test_direct_launch_only_on_checked_triton_versions():
    def triton(version, knobs=True):
        mod = types.SimpleNamespace(__version__=version)
        if knobs:
            mod.knobs = object()
        return mod

    first, last = DIRECT_VERSIONS
    assert direct_launch_supported(triton(f"{first[0]}.{first[1]}.0"))
    assert direct_launch_supported(triton(f"{last[0]}.{last[1]}.1+git123"))
    assert not direct_launch_supported(triton(f"{first[0]}.{first[1] - 1}.0"))
    assert not direct_launch_supported(triton(f"{last[0]}.{last[1] + 1}.0"))
    assert not direct_launch_supported(triton(f"{last[0] + 1}.0.0"))
    assert not direct_launch_supported(triton(f"{first[0]}.{first[1]}.0", knobs=False))
    assert not direct_launch_supported(triton("nightly"))
