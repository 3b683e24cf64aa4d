"""``python -m ds_profile.autotune tune|run --world_size N [--launcher_args JSON] -- script ...``"""

from __future__ import annotations

import argparse
import json
import sys

from ds_profile.autotune._driver import AutotuneError, run_best, tune
from ds_profile.autotune._settings import AutotuneConfigError
from ds_profile.autotune._trials import Job


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("ds-autotune: error: put the script and its arguments after '--'", file=sys.stderr)
        return 2
    cut = argv.index("--")
    own, program = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="ds-autotune", description="DeepSpeed-compatible autotuner"
    )
    parser.add_argument("mode", choices=("tune", "run"))
    parser.add_argument("--world_size", type=int, required=True, help="ranks each trial runs on")
    parser.add_argument("--launcher_args", default="[]", help="ds-launch options as a JSON list")
    ns = parser.parse_args(own)
    if not program:
        parser.error("no script after '--'")
    if ns.world_size < 1:
        parser.error("--world_size must be at least 1")
    try:
        launcher_args = json.loads(ns.launcher_args)
        if not isinstance(launcher_args, list) or not all(
            isinstance(a, str) for a in launcher_args
        ):
            raise ValueError
    except ValueError:
        parser.error(f"--launcher_args must be a JSON list of strings, got {ns.launcher_args!r}")
    job = Job(tuple(launcher_args), program[0], tuple(program[1:]))
    try:
        result = tune(job, ns.world_size)
        if result.optimal_config_path is not None:
            print(f"autotuning: best config written to {result.optimal_config_path}", flush=True)
        if ns.mode == "run":
            return run_best(job, result)
        return 0 if result.best is not None else 1
    except (AutotuneError, AutotuneConfigError, ValueError) as exc:
        print(f"ds-autotune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
