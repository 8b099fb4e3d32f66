"""The command-line flags every job shares, and the spec they name.

    parser = job_parser("raydar finetune", __doc__)
    parser.add_argument("--run-name", ...)
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
"""

from __future__ import annotations

import argparse
import functools
import sys

from raydar.spec import DatasetSpec, SpecError, load_spec, parse_override


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for the job `prog`, described by the first line of `doc` (its module docstring), with
    the flags every job shares."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--spec, --storage, --address, --set, --quiet: shared by every job."""
    parser.add_argument("--spec", required=True, help="Dataset spec (YAML).")
    parser.add_argument(
        "--storage", default=None, help="Storage root: folder or URI (default: $RAYDAR_STORAGE or ~/.raydar)."
    )
    parser.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray).")
    parser.add_argument(
        "--set", action="append", default=[], type=spec_override, metavar="FIELD=VALUE",
        help="Override a spec field, e.g. --set teacher.concurrency=8. Repeatable.",
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")


def spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    """The spec named by --spec with the --set overrides; an invalid one ends the job with exit code 2."""
    try:
        return load_spec(args.spec, overrides=dict(args.set))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def job_main(main):
    """A job's entry point whose spec turns out unusable while it runs (its images missing, say) ends with the
    message and exit code 2, not a traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def spec_override(text: str) -> tuple[str, object]:
    """One --set FIELD=VALUE as (field, value): an argparse type."""
    try:
        return parse_override(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None
