"""Transient storage faults: which errors are worth another try, and the bounded backoff loop.

A long job (hours of generation, days of training) must not die because the object store hiccuped
for a few seconds: connection refused/reset, timeouts, 5xx and SlowDown are retried with
exponential backoff and jitter inside a total window; a missing key, a denied request or a bad
bucket are not (no amount of waiting fixes them). Only an outage longer than the window fails, with
one line naming the operation, the URI, how long it was retried and the last error.

`RetryingHandler` applies the same loop to every call of a pyarrow filesystem, for the writers we do
not call ourselves (Ray Train's checkpoint uploads): its output streams keep the bytes in memory and
upload them on close, so a failed upload is retried whole.
"""

from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from synthfar_ray.errors import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(UserError, RuntimeError):
    """A location that cannot be read or written; the message names the URI."""


# Exception class names (anywhere in the cause chain) that mean "the store or the network is
# briefly unavailable": botocore/aiohttp (s3fs), requests/google (gcsfs), azure-core (adlfs).
_TRANSIENT_TYPES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
    "FSTimeoutError", "ServiceRequestError", "ServiceResponseError", "IncompleteRead",
})
# Words in an error message (pyarrow's S3 errors are plain OSErrors: "AWS Error NETWORK_CONNECTION
# during PutObject operation: curlCode: 7 ..."); permanent markers win over transient ones.
_PERMANENT_MARKERS = ("ACCESS_DENIED", "AccessDenied", "NO_SUCH_BUCKET", "NoSuchBucket", "NoSuchKey",
                      "InvalidBucketName", "INVALID_ACCESS_KEY", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                      "Forbidden", "HTTP status 403", "HTTP status 404")
_TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect", "Connection refused",
                      "Connection reset", "connection was closed", "Broken pipe", "timed out", "Timeout",
                      "SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE",
                      "InternalError", "RequestTimeout", "Throttl", "HTTP status 500", "HTTP status 502",
                      "HTTP status 503", "HTTP status 504")


def _chain(error: BaseException):
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(error: BaseException) -> bool:
    """True for faults that may go away by themselves (worth a retry); False for everything else,
    including unknown errors, so a bug is never retried for minutes."""
    if isinstance(error, UserError):  # our own verdicts (e.g. "no .parquet files") are final
        return False
    for e in _chain(error):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        text = str(e)
        if any(m in text for m in _PERMANENT_MARKERS):
            return False
        status = getattr(e, "status_code", None) or getattr(e, "status", None)
        if isinstance(status, int) and (status in (408, 429) or status >= 500):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_TYPES:
            return True
        if any(m in text for m in _TRANSIENT_MARKERS):
            return True
    return False


def _half_to_one() -> float:
    return random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: delays initial_s, 2x, 4x ... capped at max_s, each scaled by a
    random factor in [0.5, 1] (jitter, so many workers do not hammer a recovering store in step),
    until the next delay would end past window_s after the first failure. window_s=0: no retries."""

    window_s: float = 120.0
    initial_s: float = 0.5
    max_s: float = 10.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[], float] = field(default=_half_to_one, compare=False)

    def delay(self, retry: int) -> float:
        return min(self.max_s, self.initial_s * 2 ** retry) * self.jitter()


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_call(fn: Callable[[], T], op: str, uri: str, policy: RetryPolicy) -> T:
    """fn(), retried on transient errors within policy.window_s. A permanent error is raised as it
    is (the caller words it); a lasting outage raises StorageError in one line."""
    started: float | None = None
    retry = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            now = policy.clock()
            started = now if started is None else started
            elapsed = now - started
            wait = policy.delay(retry)
            if elapsed + wait > policy.window_s:
                raise StorageError(
                    f"cannot {op} {uri}: storage unreachable for {elapsed:.1f} s ({retry + 1} attempts, "
                    f"storage.retry_window_s={policy.window_s:g}); last error: {_one_line(e)}") from e
            logger.warning("%s %s failed (%s); retry %d in %.1f s (%.0f of %g s window used)",
                           op, uri, _one_line(e, 160), retry + 1, wait, elapsed, policy.window_s)
            policy.sleep(wait)
            retry += 1


class _UploadOnClose(io.RawIOBase):
    """An output stream that buffers everything and uploads it, retried, when closed."""

    def __init__(self, upload: Callable[[bytes], None]):
        super().__init__()
        self._buf = io.BytesIO()
        self._upload = upload

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buf.write(data)

    def close(self) -> None:
        if not self.closed:
            data, self._buf = self._buf.getvalue(), io.BytesIO()
            super().close()
            self._upload(data)


class RetryingHandler(pafs.FileSystemHandler):
    """Every call of a pyarrow filesystem under `retry_call`. Reads load the whole object (retried
    whole) and writes upload on close: meant for checkpoint-sized objects, not for streaming a
    dataset (Ray Data gets the plain filesystem)."""

    def __init__(self, fs: pafs.FileSystem, policy: RetryPolicy, label: str = ""):
        self.fs = fs
        self.policy = policy
        self.label = label or fs.type_name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RetryingHandler):
            return self.fs.equals(other.fs) and self.policy == other.policy
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def _retry(self, op: str, path: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, op, f"{self.label}:{path}", self.policy)

    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry("stat", ",".join(paths[:3]), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry("create", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry("delete", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._retry("delete", "/", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._retry("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry("copy", src, lambda: self.fs.copy_file(src, dest))

    def _read_all(self, path: str) -> pa.Buffer:
        def read() -> pa.Buffer:
            with self.fs.open_input_stream(path) as f:
                return f.read_buffer()
        return self._retry("read", path, read)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.BufferReader(self._read_all(path))

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.BufferReader(self._read_all(path))

    def open_output_stream(self, path: str, metadata: dict[str, Any] | None) -> pa.NativeFile:
        def upload(data: bytes) -> None:
            def put() -> None:
                with self.fs.open_output_stream(path, metadata=metadata) as f:
                    f.write(data)
            self._retry("write", path, put)
        return pa.PythonFile(_UploadOnClose(upload), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, Any] | None) -> pa.NativeFile:
        return self._retry("append", path, lambda: self.fs.open_append_stream(path, metadata=metadata))


def retrying_filesystem(fs: pafs.FileSystem, policy: RetryPolicy, label: str = "") -> pafs.FileSystem:
    return pafs.PyFileSystem(RetryingHandler(fs, policy, label))

