"""Where ``zero.Init`` builds tensors, as DeepSpeed 0.19.8's does: on an accelerator other than
the CPU, torch's constructors make tensors on the local device in the parameter dtype while the
context is active, and partitions stay there or go to host memory (remote_device / offload_param
cpu or nvme). On the CPU accelerator nothing is redirected.

The machine running CI has no GPU: the resolution is tested as a unit with a stand-in
accelerator, the redirect with real devices (CPU for dtypes, ``meta`` for the device) and a
whole Init with a stand-in accelerator whose device is ``meta``. The CUDA run is the GPU test
at the end (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds_accel
import ds_all
from ds_all.runtime.zero import partition_parameters as pp
from ds_all.runtime.zero.partition_parameters import DeepSpeedTensorOverride as Override
from ds_comm.testing import distributed_test


class _StandIn(ds_accel.CPUAccelerator):
    """An accelerator named like a device torch knows without hardware (``cuda`` names for the
    resolution unit, ``meta`` for whole runs); collectives stay gloo's."""

    def __init__(self, name: str, current: int = 0) -> None:
        super().__init__()
        self.name = name
        self.current = current
        self.set_to: list[int] = []

    def current_device(self) -> int:
        return self.current

    def device_count(self) -> int:
        return 4

    def set_device(self, index: int) -> None:
        self.set_to.append(index)

    def device_name(self, device_index: int | None = None) -> str:
        return self.name if device_index is None else f"{self.name}:{device_index}"


@pytest.fixture
def stand_in():
    def use(name: str, current: int = 0) -> _StandIn:
        return ds_accel.set_accelerator(_StandIn(name, current))  # type: ignore[return-value]

    yield use
    ds_accel.reset_accelerator()


ALL = pp.DEFAULT_TENSOR_OVERRIDES


def test_resolution_on_an_accelerator(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpu = _StandIn("cuda")
    t = pp._resolve_targets(gpu, ALL, torch.bfloat16, None, None)
    assert (t.local, t.device, t.dtype) == (torch.device("cuda:1"), torch.device("cuda:1"), torch.bfloat16)  # fmt: skip
    assert not t.shards_on_host
    # only the overrides asked for
    t = pp._resolve_targets(gpu, [Override.dtype], torch.float16, None, None)
    assert (t.local, t.device, t.dtype) == (torch.device("cuda:1"), None, torch.float16)
    t = pp._resolve_targets(gpu, [], torch.float16, None, None)
    assert (t.device, t.dtype, t.redirects) == (None, None, False)
    # no dtype known (no config, no argument): the model's own dtype is kept
    assert pp._resolve_targets(gpu, ALL, None, None, None).dtype is None
    # a LOCAL_RANK past the visible devices (one device per rank): modulo their number
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert pp._resolve_targets(gpu, ALL, None, None, None).local == torch.device("cuda:2")
    # without LOCAL_RANK: the current device
    monkeypatch.delenv("LOCAL_RANK")
    assert pp._resolve_targets(_StandIn("cuda", 3), ALL, None, None, None).local == torch.device("cuda:3")  # fmt: skip


def test_resolution_of_the_partitions_home() -> None:
    gpu = _StandIn("cuda")
    on = lambda remote, cfg=None: pp._resolve_targets(gpu, ALL, None, remote, cfg).shards_on_host  # noqa: E731
    assert on("cpu") and on("nvme")
    assert not on(None) and not on("none") and not on("cuda")
    # the config's offload_param decides over the argument, as in DeepSpeed
    assert on(None, {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert not on("cpu", {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}})
    assert on("cpu", {"zero_optimization": {"stage": 3}})  # no offload_param: the argument stands


def test_resolution_on_the_cpu_redirects_nothing() -> None:
    t = pp._resolve_targets(ds_accel.CPUAccelerator(), ALL, torch.bfloat16, "cpu", None)
    assert (t.local, t.device, t.dtype, t.shards_on_host, t.redirects) == (None, None, None, False, False)  # fmt: skip


def test_bad_tensor_overrides_are_refused() -> None:
    with pytest.raises(TypeError, match="DeepSpeedTensorOverride"):
        pp._resolve_targets(_StandIn("cuda"), ["device"], None, None, None)


def _targets(device: str | None, dtype: torch.dtype | None) -> pp._Targets:
    dev = torch.device(device) if device else None
    return pp._Targets(local=dev, device=dev, dtype=dtype, shards_on_host=False)


def test_redirect_casts_floating_constructors_and_restores_torch() -> None:
    before = {name: getattr(torch, name) for name in pp._CONSTRUCTORS}
    with pp._ConstructorRedirect(_targets(None, torch.bfloat16)):
        for t in (torch.zeros(3), torch.ones(2), torch.empty(2), torch.full((2,), 1.5),
                  torch.eye(2), torch.randn(2), torch.tensor([1.0]), torch.arange(3.0),
                  torch.empty(2, dtype=torch.float64)):  # fmt: skip
            assert t.dtype == torch.bfloat16  # an explicit dtype is cast too, as in DeepSpeed
        assert torch.arange(3).dtype == torch.int64 and torch.tensor([1]).dtype == torch.int64
        leaf = torch.tensor([1.0, 2.0], requires_grad=True)
        assert leaf.is_leaf and leaf.requires_grad and leaf.dtype == torch.bfloat16
        legacy = torch.Tensor(2, 3)
        assert legacy.shape == (2, 3) and legacy.dtype == torch.bfloat16
        assert torch.Tensor([1.0, 2.0]).tolist() == [1.0, 2.0]
        assert torch.Tensor().shape == (0,)
    assert {name: getattr(torch, name) for name in pp._CONSTRUCTORS} == before
    assert "__new__" not in torch.Tensor.__dict__ and torch.Tensor(2).dtype == torch.float32


def test_redirect_puts_tensors_on_the_target_device_unless_the_call_names_one() -> None:
    with pp._ConstructorRedirect(_targets("meta", None)):
        assert torch.zeros(3).is_meta and torch.Tensor(2, 2).is_meta and torch.arange(4).is_meta
        assert torch.zeros(3).dtype == torch.float32  # no dtype override asked
        assert torch.zeros(3, device="cpu").device.type == "cpu"
        assert nn.Linear(4, 2).weight.is_meta
    assert not torch.zeros(1).is_meta and not nn.Linear(4, 2).weight.is_meta


def test_nested_redirects_restore_the_outer_one() -> None:
    with pp._ConstructorRedirect(_targets(None, torch.bfloat16)):
        with pp._ConstructorRedirect(_targets(None, torch.float16)):
            assert torch.zeros(1).dtype == torch.float16
        assert torch.zeros(1).dtype == torch.bfloat16
    assert torch.zeros(1).dtype == torch.float32


def test_the_wrapper_factory_is_looked_up_when_init_enters(monkeypatch) -> None:
    """Transformers' ZeRO-3 loader replaces the module's wrapper factory (to keep
    ``torch.arange``'s dtype) before entering Init and recognises arange by identity."""
    original = pp.zero_wrapper_for_fp_tensor_constructor

    def keep_arange_dtype(fn, *args, **kwargs):
        if fn is pp._orig_torch_arange:
            return original(fn, target_fp_dtype=None, target_device=kwargs["target_device"])
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(pp, "zero_wrapper_for_fp_tensor_constructor", keep_arange_dtype)
    with pp._ConstructorRedirect(_targets(None, torch.bfloat16)):
        assert torch.arange(3.0).dtype == torch.float32
        assert torch.zeros(3).dtype == torch.bfloat16


class _Scaled(nn.Module):
    """A Transformers-style module naming a buffer to keep in fp32."""

    _keep_in_fp32_modules_strict = ["router_bias"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.register_buffer("router_bias", torch.ones(4))
        self.register_buffer("scale", torch.ones(4))


def test_whole_init_on_a_stand_in_accelerator(stand_in) -> None:
    acc = stand_in("meta")
    with ds_all.zero.Init(config_dict_or_path={"bf16": {"enabled": True}}) as ctx:
        assert ctx.targets.local == torch.device("meta:0") and acc.set_to == [0]
        inside = torch.zeros(2)
        model = _Scaled()
    assert inside.is_meta and inside.dtype == torch.bfloat16
    assert not torch.zeros(1).is_meta and "__new__" not in torch.Tensor.__dict__
    # built on the device in bf16, partitioned there; the named buffer back in fp32
    assert model.proj.weight.numel() == 0 and model.proj.weight.ds_shape == (4, 8)
    assert model.router_bias.dtype == torch.float32 and model.scale.dtype == torch.bfloat16
    assert model.router_bias.is_meta and model.scale.is_meta
    with ds_all.zero.GatheredParameters(list(model.parameters())):
        w = model.proj.weight
        assert w.shape == (4, 8) and w.is_meta and w.dtype == torch.bfloat16


def test_tensor_overrides_empty_on_a_stand_in_accelerator(stand_in) -> None:
    stand_in("meta")
    with ds_all.zero.Init(config_dict_or_path={"bf16": {"enabled": True}}, tensor_overrides=[]):
        inside = torch.zeros(2)
        layer = nn.Linear(8, 4, device="meta")
    assert inside.device.type == "cpu" and inside.dtype == torch.float32
    assert layer.weight.numel() == 0 and layer.weight.dtype == torch.bfloat16  # cast as partitioned


def test_the_cpu_accelerator_builds_where_the_code_says() -> None:
    """A real run on this machine: nothing is redirected, a model is built and cast as before."""
    ds_accel.reset_accelerator()
    torch.manual_seed(0)
    reference = nn.Linear(8, 4)
    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path={"bf16": {"enabled": True}}, remote_device="cpu"):
        assert torch.zeros(1).dtype == torch.float32 and "__new__" not in torch.Tensor.__dict__
        layer = nn.Linear(8, 4)
        wide = torch.zeros(2, dtype=torch.float64)
    assert wide.dtype == torch.float64
    with ds_all.zero.GatheredParameters(list(layer.parameters())):
        assert layer.weight.device.type == "cpu" and layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight, reference.weight.to(torch.bfloat16))


@distributed_test(world_size=[2])
def test_partitions_are_cut_from_the_first_ranks_values() -> None:
    """As DeepSpeed's Init broadcasts each new parameter from rank 0 before partitioning: ranks
    that drew different numbers (here: different seeds) hold one model, the first rank's."""
    import torch.distributed as dist

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))
    torch.manual_seed(dist.get_rank())  # rank 1 draws other values
    with ds_all.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1}):
        model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))
    assert model[0].weight.numel() == 0
    with ds_all.zero.GatheredParameters(list(model.parameters())):
        for got, want in zip(model.parameters(), reference.parameters()):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------- one CUDA GPU
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@_cuda
def test_init_on_cuda_builds_on_the_device_as_deepspeed() -> None:
    ds_accel.reset_accelerator()
    cfg = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3}}  # fmt: skip
    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path=cfg):
        inside = torch.empty(3)
        layer = nn.Linear(16, 8)
    assert inside.device.type == "cuda" and inside.dtype == torch.bfloat16
    # DeepSpeed's construction: parameters created on the device in bf16, then initialised
    # there (the device's generator), then partitioned on the device
    torch.manual_seed(0)
    reference = nn.Linear(16, 8, device="cuda", dtype=torch.bfloat16)
    assert layer.weight.numel() == 0 and layer.weight.device.type == "cuda"
    with ds_all.zero.GatheredParameters(list(layer.parameters())):
        assert layer.weight.device.type == "cuda"  # gathered from partitions on the device
        assert torch.equal(layer.weight, reference.weight)
        assert torch.equal(layer.bias, reference.bias)

    # remote_device="cpu": drawn on the device the same way, partitions kept in host memory
    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path=cfg, remote_device="cpu", pin_memory=True):
        hosted = nn.Linear(16, 8)
    with ds_all.zero.GatheredParameters(list(hosted.parameters())):
        assert hosted.weight.device.type == "cpu"
        assert torch.equal(hosted.weight, reference.weight.cpu())


def test_initialize_inside_init_sees_torchs_own_constructors(stand_in) -> None:
    stand_in("meta")
    with ds_all.zero.Init(config_dict_or_path={"bf16": {"enabled": True}}):
        assert torch.zeros(2).is_meta and nn.Module.apply is not pp._orig_module_apply
        with pp.init_context_suspended():
            t = torch.zeros(2)
            assert t.device.type == "cpu" and t.dtype == torch.float32
            assert torch.Tensor(2).dtype == torch.float32 and not torch.Tensor(2).is_meta
            assert nn.Module.apply is pp._orig_module_apply
        inside = torch.zeros(2)
        assert inside.is_meta and inside.dtype == torch.bfloat16  # Init's redirect is back
        assert nn.Module.apply is not pp._orig_module_apply
    assert not torch.zeros(1).is_meta and nn.Module.apply is pp._orig_module_apply


@pytest.mark.parametrize("inside", [False, True], ids=["after-init", "inside-init"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _cuda])])
def test_a_model_built_under_init_trains_as_plain_pytorch(device: str, inside: bool) -> None:
    """fp32, ZeRO-3: built under Init (on the device when it is an accelerator), then
    initialize() after the context or inside it (which suspends Init's redirects while the
    engine is built): the same losses as the model built on the device by plain PyTorch with
    the same seed."""
    ds_accel.reset_accelerator()
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
           "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}  # fmt: skip

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 math on both sides
    try:
        with ds_all.zero.Init(config_dict_or_path=cfg):
            model = build()
            if inside:
                engine, *_ = ds_all.initialize(model=model, model_parameters=model.parameters(),
                                               config=cfg)  # fmt: skip
        if not inside:
            engine, *_ = ds_all.initialize(model=model, model_parameters=model.parameters(),
                                           config=cfg)  # fmt: skip
        with torch.device(device):
            reference = build()
        opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, 16, generator=g).to(device)
            y = torch.randn(4, 4, generator=g).to(device)
            loss = nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            ref = nn.functional.mse_loss(reference(x), y)
            ref.backward()
            opt.step()
            opt.zero_grad()
            assert float(loss) == pytest.approx(float(ref), abs=1e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
