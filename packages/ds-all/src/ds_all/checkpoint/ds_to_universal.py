"""``deepspeed.checkpoint.ds_to_universal``: turn a DeepSpeed ZeRO 1/2/3 checkpoint into one
this engine loads at any layout (``python -m deepspeed.checkpoint.ds_to_universal
--input_folder ckpt/global_step100 --output_folder ckpt/global_step100_universal``).

The conversion is ds_ckpt's DeepSpeed import: DeepSpeed's ``.pt`` files are read without running
their pickles and written as ds_ckpt's reshardable format (which is what "universal" means
here: every checkpoint of this engine loads at any data/tensor/pipeline layout). As with
DeepSpeed, the result is the tag ``basename(output_folder)`` next to the input, to load with
``engine.load_checkpoint(dirname(output_folder), tag=basename(output_folder))``. As
DeepSpeed's, the parent's ``latest_universal`` names the new tag and its ``latest`` keeps
naming the DeepSpeed checkpoint it named before (where the parent had none, ``latest`` names
the new tag). Carried over: the fp32 master weights, the optimizer
states (``exp_avg``, ``exp_avg_sq``, ``step``), buffers and frozen parameters; DeepSpeed's step
counters and scheduler state are kept under the checkpoint's ``client_state["deepspeed"]``.
Only ZeRO checkpoints without tensor or pipeline parallelism are accepted (an error says so).
The worker-count options are accepted and unused (the conversion streams one rank file at a
time).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# ds_ckpt's importer; its CLI (`ds-ckpt import-deepspeed`) is the public entry to it
from ds_ckpt._deepspeed import import_deepspeed


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds_to_universal")
    parser.add_argument("--input_folder", type=str, required=True,
                        help="Input DeepSpeed Checkpoint folder")  # fmt: skip
    parser.add_argument("--output_folder", type=str, required=True,
                        help="Output DeepSpeed checkpoint folder")  # fmt: skip
    parser.add_argument("--num_extract_workers", default=4, type=int, help="(unused)")
    parser.add_argument("--num_merge_workers", default=2, type=int, help="(unused)")
    parser.add_argument("--keep_temp_folder", action="store_true", help="(no temporary folder)")
    parser.add_argument("--no_strict", dest="strict", action="store_false",
                        help="(the checks always run)")  # fmt: skip
    parser.add_argument("--inject_missing_state", action="store_true",
                        help="(the universal info is not needed)")  # fmt: skip
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Convert ``args.input_folder`` (a tag folder, or the folder holding ``latest``) into
    the tag ``basename(args.output_folder)`` under ``dirname(args.output_folder)``."""
    out = os.path.normpath(os.path.abspath(args.output_folder))
    print("Convert DeepSpeed Checkpoint to Universal Checkpoint")
    print(
        f"Converting DeepSpeed checkpoint in {args.input_folder} to Universal checkpoint in {out}"
    )
    parent = os.path.dirname(out)
    latest = os.path.join(parent, "latest")
    # the importer points `latest` at what it wrote; the DeepSpeed checkpoint's own `latest`
    # (which DeepSpeed itself and its zero_to_fp32 read) is put back afterwards
    before = Path(latest).read_bytes() if os.path.isfile(latest) else None
    tag = import_deepspeed(args.input_folder, parent, out_tag=os.path.basename(out))
    if before is not None:
        Path(latest).write_bytes(before)
    Path(parent, "latest_universal").write_text(tag)
    print(f"wrote tag {tag!r} under {parent} (named by its latest_universal)")


if __name__ == "__main__":
    main(parse_arguments())


__all__ = ["main", "parse_arguments"]
