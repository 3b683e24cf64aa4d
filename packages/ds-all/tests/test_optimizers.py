"""The config's optimizer {type, params} with DeepSpeed's names: each type builds the right
class with the params applied; DeepSpeed's extra params are understood; errors name the key."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, config  # noqa: E402

import ds_all  # noqa: E402


def _optimizer(type_name: str, params: dict) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    cfg = config(0, 2, optimizer={"type": type_name, "params": params}, scheduler=None)
    engine, opt, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    assert opt is engine.optimizer
    engine.close()
    return opt


@pytest.mark.parametrize(
    "type_name, params, cls_name, group",
    [
        # DeepSpeed: "Adam" is AdamW unless adam_w_mode is false; torch_adam picks torch's class
        ("Adam", {"lr": 2e-3, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.1}, "AdamW",
         {"lr": 2e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}),
        ("Adam", {"lr": 1e-3, "adam_w_mode": False, "weight_decay": 0.1}, "Adam", {"weight_decay": 0.1}),
        ("Adam", {"lr": 1e-3, "torch_adam": True, "bias_correction": True}, "AdamW", {"lr": 1e-3}),
        ("AdamW", {"lr": 1e-3, "adam_w_mode": False}, "AdamW", {"lr": 1e-3}),  # AdamW stays AdamW
        ("Lamb", {"lr": 1e-3, "bias_correction": True, "max_coeff": 0.3, "min_coeff": 0.01,
                  "max_grad_norm": 0.0}, "FusedLamb", {"lr": 1e-3}),
        ("Lion", {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.01}, "FusedLion", {"lr": 1e-4}),
        ("Adagrad", {"lr": 1e-2, "eps": 1e-10}, "Adagrad", {"lr": 1e-2, "eps": 1e-10}),
        ("OneBitAdam", {"lr": 1e-3, "freeze_step": 400, "cuda_aware": False,
                        "comm_backend_name": "gloo"}, "OneBitAdam", {"lr": 1e-3}),
        ("OneBitLamb", {"lr": 1e-3, "freeze_step": 400, "max_coeff": 0.3, "min_coeff": 0.01},
         "OneBitLamb", {"lr": 1e-3}),
        ("ZeroOneAdam", {"lr": 1e-3, "var_freeze_step": 100, "local_step_scaler": 1000},
         "ZeroOneAdam", {"lr": 1e-3}),
        ("sgd", {"lr": 0.1, "momentum": 0.9}, "SGD", {"lr": 0.1, "momentum": 0.9}),  # torch.optim
        ("RMSprop", {"lr": 0.01}, "RMSprop", {"lr": 0.01}),
    ],
)  # fmt: skip
def test_optimizer_types_and_params(type_name, params, cls_name, group):
    opt = _optimizer(type_name, params)
    assert type(opt).__name__ == cls_name
    for key, value in group.items():
        got = opt.param_groups[0][key]
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, key


@pytest.mark.parametrize(
    "type_name, params, message",
    [
        ("Adamm", {}, "optimizer.type 'Adamm' is not a known optimizer; did you mean 'Adam'?"),
        ("AdamW", {"lrr": 1e-3}, "optimizer.params.lrr: not a parameter of AdamW"),
        ("AdamW", {"betass": [0.9, 0.9]}, "did you mean 'betas'?"),
        ("Adam", {"bias_correction": False}, "optimizer.params.bias_correction=False"),
        ("Lamb", {"max_grad_norm": 1.0}, 'clip with the top-level "gradient_clipping"'),
        ("Lamb", {"eps_inside_sqrt": True}, "optimizer.params.eps_inside_sqrt=True"),
    ],
)
def test_optimizer_errors_name_the_key(type_name, params, message):
    with pytest.raises(ds_all.ConfigError) as e:
        _optimizer(type_name, params)
    assert message in str(e.value), str(e.value)
