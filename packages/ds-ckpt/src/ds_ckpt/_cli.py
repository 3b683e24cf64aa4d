"""`ds-ckpt`: inspect, verify, consolidate and import-deepspeed."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ds_ckpt._dtypes import CLI_DTYPES
from ds_ckpt._errors import CheckpointError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-ckpt", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("inspect", help="print a checkpoint's tag, files, tensors and states")
    s.add_argument("dir")
    s.add_argument("--tag", default=None, help="default: the one `latest` names")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("verify", help="check sizes, headers, coverage and SHA-256 of every piece")
    s.add_argument("dir")
    s.add_argument("--tag", default=None)
    s.add_argument("--no-hashes", action="store_true", help="skip SHA-256 (sizes/headers only)")
    s = sub.add_parser("consolidate", help="stream the full tensors into one safetensors file")
    s.add_argument("dir")
    s.add_argument("--out", required=True, help="output .safetensors path")
    s.add_argument("--tag", default=None)
    s.add_argument(
        "--dtype",
        default=None,
        choices=sorted(CLI_DTYPES),
        help="convert floating-point tensors (default: as saved)",
    )
    s.add_argument(
        "--include-optimizer",
        action="store_true",
        help="also write optimizer.* tensors (default: model tensors only)",
    )
    s.add_argument("--chunk-mb", type=int, default=64, help="memory bound of the copy buffer")
    s = sub.add_parser(
        "import-deepspeed",
        help="convert a DeepSpeed ZeRO 1/2/3 checkpoint (read without pickle code execution)",
    )
    s.add_argument("ds_dir", help="DeepSpeed checkpoint dir (holding `latest`) or a tag dir")
    s.add_argument("out", help="ds-ckpt checkpoint directory to write into")
    s.add_argument("--tag", default=None, help="DeepSpeed tag (default: its `latest`)")
    s.add_argument("--out-tag", default=None, help="tag to write (default: the DeepSpeed tag)")
    return p


# Exit status after the reader of our stdout went away (`ds-ckpt inspect DIR | head`): what a
# process killed by SIGPIPE reports through a shell (128 + 13), as `cat file | head` does.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit:  # --help, usage errors: what was printed must reach stdout first
            sys.stdout.flush()
            raise
        try:
            code = _run(args)
        except (CheckpointError, ValueError, TypeError, OSError) as e:
            if isinstance(e, BrokenPipeError):
                raise
            print(f"ds-ckpt {args.cmd}: error: {e}", file=sys.stderr)
            code = 1
        sys.stdout.flush()  # a closed pipe surfaces here for output still buffered
        return code
    except BrokenPipeError:
        # Python would print a traceback and, at exit, "Exception ignored ... BrokenPipeError"
        # when flushing stdout again; point stdout at /dev/null so that final flush succeeds.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "inspect":
        from ds_ckpt._verify import summary

        s = summary(args.dir, args.tag)
        if args.json:
            print(json.dumps(s, indent=1))
            return 0
        print(
            f"{s['path']}: tag {s['tag']}, format v{s['format_version']}, saved by "
            f"{s['world_size']} rank(s), {s['files']} file(s), {s['bytes'] / 1e6:.1f} MB, "
            f"{len(s['tensors'])} tensors"
        )
        print(f"client_state keys: {s['client_state_keys']}")
        for name, t in s["tensors"].items():
            print(
                f"  {name:60s} {t['dtype']:5s} {str(t['shape']):20s} {t['fragments']} fragment(s)"
            )
        return 0
    if args.cmd == "verify":
        from ds_ckpt._verify import verify

        problems = verify(args.dir, args.tag, hashes=not args.no_hashes)
        for p in problems:
            print(p, file=sys.stderr)
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 0 if not problems else 1
    if args.cmd == "consolidate":
        from ds_ckpt._consolidate import consolidate

        r = consolidate(
            args.dir,
            args.out,
            tag=args.tag,
            dtype=CLI_DTYPES[args.dtype] if args.dtype else None,
            include_optimizer=args.include_optimizer,
            chunk_bytes=args.chunk_mb * 1024 * 1024,
        )
        print(f"wrote {args.out}: {r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB")
        return 0
    if args.cmd == "import-deepspeed":
        from ds_ckpt._deepspeed import import_deepspeed

        tag = import_deepspeed(args.ds_dir, args.out, tag=args.tag, out_tag=args.out_tag)
        print(f"imported into {args.out}/{tag}")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
