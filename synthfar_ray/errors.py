"""The project's own exception types.

`UserError` is a mistake or a failure the user can act on (a config field, a missing file, storage
that cannot be reached, a failed trial or stage): the CLI prints it as one line. Anything else is
a bug and the CLI shows its traceback. Code raises these types and catches them by type; nobody
parses Ray's exception strings.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, described in one line that names the file, setting or field."""


class StageFailed(UserError):
    """A stage ran but did not do its job (a Tune trial errored, a pipeline stage failed)."""


def last_line(error: BaseException | str | None) -> str:
    """The last non-empty line of an error (Ray wraps the worker's traceback around the cause)."""
    text = str(error or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__ if isinstance(error, BaseException) else ""


def first_line(error: BaseException | str | None) -> str:
    """The first non-empty line: our own multi-line errors (e.g. every bad file of an ingest) lead
    with their summary."""
    text = str(error or "").strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__ if isinstance(error, BaseException) else "")
