"""``nn.Module.apply`` inside ``zero.Init`` gathers each module's partitioned parameters around
the function, as DeepSpeed's ``override_module_apply`` (default true): a parent's
``self.apply(init_weights)`` in its ``__init__`` initialises children that were partitioned as
they finished, and the model equals the one built without ZeRO-3 (DeepSpeed 0.19.8 gives the
same values, and the same non-initialised ones with the key set to false)."""

from __future__ import annotations

import torch
from torch import nn

from ds_comm.testing import distributed_test


class _Net(nn.Module):
    """nanoGPT's pattern: children built first, then one ``apply`` over the whole tree."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def _cfg(**zero: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zero}}


def _built(cfg: dict) -> dict[str, torch.Tensor]:
    import ds_all

    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path=cfg):
        model = _Net()
    assert model.a.weight.numel() == 0  # partitioned
    with ds_all.zero.GatheredParameters(list(model.parameters())):
        return {k: v.clone() for k, v in model.state_dict().items()}


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _Net().state_dict()


def test_apply_in_init_reaches_partitioned_children() -> None:
    got, want = _built(_cfg()), _reference()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert nn.Module.apply is nn.Module.__dict__["apply"]  # put back at exit
    assert nn.Module.apply.__qualname__ == "Module.apply"


def test_override_module_apply_false_leaves_apply_alone() -> None:
    got, want = _built(_cfg(override_module_apply=False)), _reference()
    # the children's weights keep their own init: apply wrote into released parameters
    assert not torch.equal(got["a.weight"], want["a.weight"])
    assert torch.equal(got["b.1.weight"], want["b.1.weight"])  # LayerNorm: apply leaves it


def test_an_enclosing_gather_is_not_gathered_again() -> None:
    """Parameters an outer GatheredParameters holds whole are modified in place by the
    function and written back by that context."""
    import ds_all

    with ds_all.zero.Init(config_dict_or_path=_cfg()):
        layer = nn.Linear(4, 4)
        with ds_all.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
            layer.apply(lambda m: nn.init.ones_(m.weight) if isinstance(m, nn.Linear) else None)
    with ds_all.zero.GatheredParameters(list(layer.parameters())):
        assert torch.equal(layer.weight, torch.ones(4, 4))


@distributed_test(world_size=[2])
def test_apply_in_init_on_two_ranks() -> None:
    got, want = _built(_cfg()), _reference()
    assert all(torch.equal(got[k], want[k]) for k in want)
