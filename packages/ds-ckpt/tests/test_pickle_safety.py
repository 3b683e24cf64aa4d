"""Tier 1: a pickle payload planted in a checkpoint is never executed (canary file)."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

import ds_ckpt
from ds_ckpt import Fragment
from ds_ckpt._cli import main
from ds_ckpt._deepspeed import import_deepspeed


class _Payload:
    """Unpickling this creates the canary file: proof that a pickle was executed."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.canary),))


def _plant(path, canary, *, zip_format=True):
    if zip_format:
        torch.save({"optimizer_state_dict": _Payload(canary), "module": {}}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(canary)))


def test_canary_works(tmp_path):
    """The payload really executes under a plain unpickler (else the tests below prove nothing)."""
    canary = tmp_path / "canary"
    _plant(tmp_path / "x.pt", str(canary))
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_import_deepspeed_never_unpickles_code(tmp_path, zip_format):
    canary = tmp_path / "canary"
    ds = tmp_path / "ds" / "global_step1"
    ds.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step1")
    for f in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        _plant(ds / f, str(canary), zip_format=zip_format)
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=r"\.pt: refused to load"):
        import_deepspeed(str(tmp_path / "ds"), str(tmp_path / "out"))
    assert main(["import-deepspeed", str(tmp_path / "ds"), str(tmp_path / "out")]) == 1
    assert not canary.exists()


def test_own_format_never_unpickles(tmp_path):
    canary = tmp_path / "canary"
    root = tmp_path / "c"
    ds_ckpt.save(root, "t", [Fragment.whole("w", torch.ones(8))])
    (f,) = (root / "t").glob("*.safetensors")
    _plant(f, str(canary))
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=f.name):
        ds_ckpt.load(root, "t", [Fragment.whole("w", torch.zeros(8))])
    assert main(["verify", str(root)]) == 1
    assert main(["consolidate", str(root), "--out", str(tmp_path / "m.safetensors")]) == 1
    for name in ("manifest.json", "../latest"):
        _plant(root / "t" / name, str(canary), zip_format=False)
    with pytest.raises(ds_ckpt.CheckpointNotFoundError):
        ds_ckpt.load(root, None, [Fragment.whole("w", torch.zeros(8))])
    assert not canary.exists()
