"""``deepspeed.env_report``: ``ds_report``'s output (``main()``, which Megatron-DeepSpeed calls at
startup, and ``cli_main()``), produced by ds_kernels' ``ds-report``: accelerator, torch,
toolchain, what each op would load as, and every package's report section."""

from __future__ import annotations

import argparse
import warnings

import ds_kernels


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds_report")
    parser.add_argument("--hide_operator_status", action="store_true",
                        help="Suppress display of installation and compatibility statuses of ops.")  # fmt: skip
    parser.add_argument("--hide_errors_and_warnings", action="store_true",
                        help="Suppress warning and error messages.")  # fmt: skip
    return parser.parse_args()


def main(hide_operator_status: bool = False, hide_errors_and_warnings: bool = False) -> None:
    """Print the report; ``hide_operator_status`` leaves out the op table,
    ``hide_errors_and_warnings`` silences the warnings probing may raise."""
    with warnings.catch_warnings():
        if hide_errors_and_warnings:
            warnings.simplefilter("ignore")
        rep = ds_kernels.report()
    if hide_operator_status:
        rep["ops"] = []
    print(ds_kernels.format_report(rep))


def cli_main() -> None:
    args = parse_arguments()
    main(args.hide_operator_status, args.hide_errors_and_warnings)


if __name__ == "__main__":
    cli_main()


__all__ = ["cli_main", "main", "parse_arguments"]
