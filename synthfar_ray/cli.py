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

# Every sub-command: name -> (module that defines it, one-line help), in the order `--help` lists
# them. Only the module of the stage being run is imported (its torch/Ray/diffusers imports happen
# when it runs), so `synthfar --help` and a config error answer at once.
STAGES: dict[str, tuple[str, str]] = {
    "generate": ("synthfar_ray.generate", "generate a synthetic face dataset (Ray Data actor pool)"),
    "ingest": ("synthfar_ray.ingest", "real datasets (UTKFace, FairFace) into Parquet with fixed splits"),
    "prepare": ("synthfar_ray.prepare", "a training-resolution copy of a dataset (small JPEGs, cheap decode)"),
    "quality": ("synthfar_ray.quality_config", "per-row and set-level quality of a synthetic set (faces, labels, duplicates)"),
    "sample": ("synthfar_ray.sampling_config", "select synthetic rows (random, cl-sam, cr-sam top-K per class)"),
    "train": ("synthfar_ray.train", "train the face-attribute net (Ray Train, DDP)"),
    "evaluate": ("synthfar_ray.evaluate", "score a checkpoint on dataset splits (Ray Data batch inference)"),
    "tune": ("synthfar_ray.tune", "Ray Tune sweep over mixing ratio, sampler, top-K and learning rate"),
    "report": ("synthfar_ray.report", "results table, distributions, sample grids, Tune results"),
    "pipeline": ("synthfar_ray.pipeline", "run the whole chain (generate ... report) for one config"),
}


def stage_parser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """The sub-command parser of a stage (its help text from STAGES); stage modules' `add_cli` use it."""
    return sub.add_parser(name, help=STAGES[name][1], **kwargs)


def _chosen_stage(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only `stage`'s module is imported and adds its real sub-command; the others
    appear in `--help` with their one-line help. stage=None imports every stage (full parser)."""
    parser = argparse.ArgumentParser(prog="synthfar", description="Synthetic face data and face-attribute training on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, _) in STAGES.items():
        if stage is None or name == stage:
            importlib.import_module(module).add_cli(sub)
        else:
            stage_parser(sub, name, add_help=False)
    return parser


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The `CONFIG [key=value ...]` arguments shared by config-driven stages."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_images=128")


def main(argv: list[str] | None = None) -> int:
    # Stages log their own progress; Ray Data's per-dataset bars from every worker drown it in a job
    # log. Set RAY_DATA_DISABLE_PROGRESS_BARS=0 to get them back. (Read when ray.data is imported.)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = _chosen_stage(argv)
    parser = build_parser(stage if stage in STAGES else "")  # "": an unknown stage imports nothing
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
