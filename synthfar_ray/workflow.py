"""Shared body of the `workflows/*.py` entrypoints that `ray job submit` runs.

`python workflows/STAGE.py --config CONFIG [key=value ...]` is `synthfar STAGE CONFIG [key=value ...]`
with job-friendly logging: it states the stage, the arguments, the exit status and the run time,
and exits non-zero on any failure so `ray job status` shows FAILED.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback

from synthfar_ray import cli

logger = logging.getLogger("synthfar.workflow")


def to_cli_args(stage: str, argv: list[str]) -> list[str]:
    """`--config X rest` -> `[stage, X, *rest]` (also `--config=X`); other arguments pass through."""
    args: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--config":
            args.append(next(it, ""))
        elif a.startswith("--config="):
            args.append(a.split("=", 1)[1])
        else:
            args.append(a)
    return [stage, *args]


def run_workflow(stage: str, argv: list[str] | None = None) -> int:
    args = to_cli_args(stage, list(sys.argv[1:] if argv is None else argv))
    print(f"[synthfar] workflow {stage}: synthfar {' '.join(args)}", flush=True)
    t0 = time.time()
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse errors
        rc = int(e.code or 0)
    except Exception:
        traceback.print_exc()
        rc = 1
    status = "succeeded" if rc == 0 else f"FAILED (exit {rc})"
    print(f"[synthfar] workflow {stage} {status} after {time.time() - t0:.1f} s", flush=True)
    return rc
