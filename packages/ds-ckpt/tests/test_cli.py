"""Tier 1: the ds-ckpt command line: inspect, verify, consolidate (bounded memory)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ckpt_layouts import flat_ranges, fragments, make_state
from safetensors.torch import load_file

import ds_ckpt
from ds_ckpt._cli import main


@pytest.fixture
def ckpt(tmp_path):
    state = make_state()
    frs = [f for r in range(3) for f in fragments(state, flat_ranges(state, 3, r, uneven=True))]
    ds_ckpt.save(tmp_path / "c", "step9", frs, {"step": 9})
    return tmp_path / "c", state


def test_inspect(ckpt, capsys):
    root, state = ckpt
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tag step9" in out and "layers.2.mlp.weight" in out
    assert main(["inspect", str(root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s["tensors"]) == set(state) and s["client_state_keys"] == ["step"]


def test_verify_ok_and_missing_dir(ckpt, tmp_path, capsys):
    root, _ = ckpt
    assert main(["verify", str(root)]) == 0
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [None, "bf16", "fp16"])
def test_consolidate_matches_state(ckpt, tmp_path, dtype):
    root, state = ckpt
    out = tmp_path / "model.safetensors"
    args = ["consolidate", str(root), "--out", str(out), "--chunk-mb", "1"]
    assert main(args + (["--dtype", dtype] if dtype else [])) == 0
    got = load_file(str(out))
    params = {n: t for n, t in state.items() if not n.startswith("optimizer.")}
    assert set(got) == set(params)
    conv = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    for n, t in params.items():
        assert torch.equal(got[n], t.to(conv) if conv else t), n
    assert main(args + ["--include-optimizer"]) == 0
    assert set(load_file(str(out))) == set(state)


_MEM_SCRIPT = r"""
import resource, sys, torch, ds_ckpt
from ds_ckpt._consolidate import consolidate
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
consolidate(sys.argv[1], sys.argv[2], dtype=torch.bfloat16, chunk_bytes=4 << 20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_consolidate_memory_is_bounded(tmp_path):
    """256 MB of fp32 in 8 fragments, consolidated to bf16 through a 4 MB buffer in a fresh
    process: its peak RSS grows by far less than the model (a whole-model gather would add
    384 MB: 256 MB fp32 + 128 MB bf16)."""
    frs = []
    for i in range(4):
        t = torch.full((16 << 20,), float(i))
        frs += [
            ds_ckpt.Fragment.slice_of(f"w{i}", t, 0, 8 << 20),
            ds_ckpt.Fragment.slice_of(f"w{i}", t, 8 << 20, 8 << 20),
        ]
    ds_ckpt.save(tmp_path / "c", "t", frs)
    del frs, t
    r = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(tmp_path / "c"), str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 48 << 20, f"consolidate grew RSS by {grew / 2**20:.0f} MB"
    got = load_file(str(tmp_path / "m.safetensors"))
    assert got["w3"].dtype == torch.bfloat16 and bool((got["w3"] == 3).all())


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{root}"],
        ["verify", "{root}"],
        ["consolidate", "{root}", "--out", "{out}"],
        ["--help"],
    ],
    ids=["inspect", "verify", "consolidate", "help"],
)
def test_closed_stdout_is_quiet_exit_141(ckpt, tmp_path, args):
    """`ds-ckpt inspect DIR | head` must not end in a BrokenPipeError traceback: the reader of
    stdout is gone before the command writes (closed at once), as after `head` has its lines."""
    import os

    root, _ = ckpt
    argv = [a.format(root=root, out=tmp_path / "m.safetensors") for a in args]
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # no reader: every write to the pipe fails with EPIPE
    try:
        p = subprocess.run(
            [sys.executable, "-m", "ds_ckpt._cli", *argv],
            stdout=w_fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w_fd)
    # argparse swallows the write error of --help itself and exits 0; that is quiet too
    assert p.returncode in ((0, 141) if args == ["--help"] else (141,)), p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.stderr == ""
