"""One meaning for every path: local paths in configs are made absolute on the driver, at validation.

A Ray task, actor, Train worker or Tune trial has its own working directory (Tune `chdir`s into the
trial folder; a multi-node worker is on another machine), so a relative path shipped to one points
somewhere else. Every location field of every stage config is typed `InputPath` or `OutputPath`:
pydantic resolves it once, when the config is validated on the driver, and what is shipped is
absolute. URIs with a scheme (`s3://`, `file://`) pass unchanged.

Inside a `ray job submit` job that uploaded a `--working-dir`, the driver's working directory is
Ray's temporary copy of that folder: a relative *output* would land in that copy and vanish with it,
so it is refused (`OutputPath`); relative inputs (configs, a vocab shipped with the code) are fine.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator

from synthfar_ray.errors import UserError

# Ray unpacks an uploaded working_dir under <session>/runtime_resources/working_dir_files/<pkg>.
_JOB_WORKING_DIR_MARK = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep


class PathError(UserError, ValueError):
    """A location that cannot mean what the user wants (a ValueError, so pydantic names the field)."""


def has_scheme(uri: str) -> bool:
    return "://" in uri


def in_job_working_dir(cwd: str | None = None) -> bool:
    """True when this process runs inside a copy of a `ray job submit --working-dir` upload."""
    return _JOB_WORKING_DIR_MARK in (cwd or os.getcwd()) + os.sep


def absolute_location(uri: str) -> str:
    """A local path made absolute (and ~ expanded); a URI with a scheme unchanged."""
    if has_scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def absolute_output(uri: str) -> str:
    """`absolute_location` for a location that is written: refuses a relative local path inside a job
    whose working directory is Ray's temporary copy of the upload."""
    if not has_scheme(uri) and not os.path.isabs(os.path.expanduser(uri)) and in_job_working_dir():
        raise PathError(
            f"relative output path {uri!r} inside a `ray job submit` job would be written into Ray's temporary "
            f"copy of the working_dir ({os.getcwd()}) and lost: use s3://BUCKET/... or an absolute path on "
            "shared storage")
    return absolute_location(uri)


InputPath = Annotated[str, AfterValidator(absolute_location)]
OutputPath = Annotated[str, AfterValidator(absolute_output)]


def display(uri: str) -> str:
    """How logs name a location: the full URI, or the absolute local path."""
    return absolute_location(uri)


def _weights_location(value: str | None) -> str | None:
    # 'torchvision' names the local torch hub cache, not a file.
    return value if value in (None, "torchvision") else absolute_location(value)


# Backbone weights: a file (path or URI, made absolute like InputPath) or 'torchvision' (the hub cache).
WeightsLocation = Annotated[str | None, AfterValidator(_weights_location)]
