"""`synthfar STAGE ...`: one command line for every stage.

Each stage module defines `add_cli(subparsers)`, which adds its sub-command and sets `func` (called
with the parsed args, returning an exit code). Stages with a YAML config take
`synthfar STAGE CONFIG [dotted.key=value ...]`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from synthfar_ray.errors import UserError

# Modules that contribute a sub-command, in the order `--help` lists them.
STAGE_MODULES: tuple[str, ...] = (
    "synthfar_ray.generate",
    "synthfar_ray.ingest",
    "synthfar_ray.sampling",
    "synthfar_ray.train",
    "synthfar_ray.evaluate",
    "synthfar_ray.tune",
    "synthfar_ray.report",
    "synthfar_ray.pipeline",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthfar", description="Synthetic face data and face-attribute training on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGE_MODULES:
        if importlib.util.find_spec(name) is None:
            continue  # stage not built yet
        importlib.import_module(name).add_cli(sub)
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The `CONFIG [key=value ...]` arguments shared by config-driven stages."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_images=128")


def main(argv: list[str] | None = None) -> int:
    # Stages log their own progress; Ray Data's per-dataset bars from every worker drown it in a job
    # log. Set RAY_DATA_DISABLE_PROGRESS_BARS=0 to get them back. (Read when ray.data is imported.)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        # The user's mistakes and failed stages: one line (the traceback with -v). Anything else is
        # a bug, and a bug shows its traceback.
        if args.verbose:
            traceback.print_exc()
        print(f"synthfar {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"synthfar {args.stage}: unexpected error (a bug, please report it with the traceback above)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
