"""``deepspeed.zero.Init`` in a script that torchrun started as one of 2 ranks, before any
``init_distributed()``: like DeepSpeed's, it initialises the process group itself and partitions
the parameters (ds_zero.Init alone refuses a launched rank without a group)."""

from __future__ import annotations

from ds_comm.testing import run_readme_example

SCRIPT = """\
import torch
import torch.distributed as dist

import ds_all

with ds_all.zero.Init():  # no init_distributed() before: Init does it, as DeepSpeed's does
    layer = torch.nn.Linear(8, 6)
held = [p.untyped_storage().nbytes() for p in layer.parameters()]  # 0: partitioned away
print(f"rank {dist.get_rank()}: world {dist.get_world_size()} full bytes held {held}")
"""


def test_zero_init_initialises_the_group_in_a_launched_rank(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- readme-example nproc=2 -->\n```python\n{SCRIPT}```\n")
    run = run_readme_example(readme)
    (line,) = run.assert_ranks_agree()
    # partitioned: no rank holds the full weight or bias outside a gather
    assert line == "world 2 full bytes held [0, 0]", line
