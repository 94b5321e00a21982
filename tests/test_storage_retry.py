"""The retry policy itself: which errors are retried, the backoff, the window bound (a fake clock,
so nothing here sleeps)."""

from __future__ import annotations

import pytest

from synthfar_ray.storage import StorageError, StorageOptions
from synthfar_ray.storage_retry import RetryPolicy, is_transient, retry_call


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def policy(t: FakeTime, window: float = 10.0, initial: float = 0.5, cap: float = 2.0, jitter: float = 1.0):
    return RetryPolicy(window, initial, cap, clock=t.clock, sleep=t.sleep, jitter=lambda: jitter)


def failing(errors: list[BaseException], result: str = "ok"):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return fn, calls


class EndpointConnectionError(Exception):  # named like botocore's (s3fs raises it when the endpoint is down)
    pass


class HttpError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status_code = status


@pytest.mark.parametrize("error", [
    OSError("When reading information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
            "operation: curlCode: 7, Could not connect to server"),
    OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
    OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:1/b/k"'),
    HttpError(503),
    HttpError(429),
])
def test_transient_errors_are_retried(error):
    assert is_transient(error)


def _chained() -> OSError:
    try:
        raise ConnectionRefusedError(111, "refused")
    except ConnectionRefusedError as inner:
        try:
            raise OSError("upload failed") from inner
        except OSError as outer:
            return outer


@pytest.mark.parametrize("error", [
    FileNotFoundError("[Errno 2] Path does not exist 'b/nokey'"),
    PermissionError("Access Denied"),
    OSError("When initiating multiple part upload for key 'k' in bucket 'nob': AWS Error NO_SUCH_BUCKET during "
            "CreateMultipartUpload operation: The specified bucket does not exist"),
    OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied"),
    OSError("AWS Error INVALID_ACCESS_KEY (HTTP status 503)"),  # permanent marker wins
    HttpError(404),
    ValueError("a bug"),  # unknown errors are never retried for minutes
    StorageError("no .parquet files in dataset s3://b/x"),  # our own verdicts are final
])
def test_permanent_errors_are_not_retried(error):
    assert not is_transient(error)
    t = FakeTime()
    fn, calls = failing([error])
    with pytest.raises(type(error)):
        retry_call(fn, "read", "s3://b/k", policy(t))
    assert len(calls) == 1 and t.sleeps == []


def test_cause_chain_is_searched():
    assert is_transient(_chained())


def test_backoff_doubles_up_to_the_cap_then_succeeds():
    t = FakeTime()
    fn, calls = failing([ConnectionRefusedError("refused")] * 5)
    assert retry_call(fn, "write", "s3://b/k", policy(t, window=100.0)) == "ok"
    assert len(calls) == 6 and t.sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_jitter_scales_each_delay():
    t = FakeTime()
    fn, _ = failing([TimeoutError()] * 3)
    retry_call(fn, "read", "s3://b/k", policy(t, window=100.0, jitter=0.5))
    assert t.sleeps == [0.25, 0.5, 1.0]


def test_lasting_outage_fails_within_the_window_in_one_line():
    t = FakeTime()
    fn, calls = failing([ConnectionRefusedError(111, "Connection refused")] * 1000)
    with pytest.raises(StorageError) as e:
        retry_call(fn, "write", "s3://b/out/part-00001.parquet", policy(t, window=10.0))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot write s3://b/out/part-00001.parquet: storage unreachable for ")
    assert "retry_window_s=10" in msg and "Connection refused" in msg
    assert t.now <= 10.0 and sum(t.sleeps) <= 10.0  # never sleeps past the window
    assert len(calls) == len(t.sleeps) + 1 and len(calls) >= 6
    assert isinstance(e.value.__cause__, ConnectionRefusedError)


def test_zero_window_means_one_attempt():
    t = FakeTime()
    fn, calls = failing([ConnectionResetError("reset")])
    with pytest.raises(StorageError, match="1 attempts"):
        retry_call(fn, "read", "s3://b/k", policy(t, window=0.0))
    assert len(calls) == 1


def test_storage_options_carry_the_retry_settings():
    opts = StorageOptions.model_validate({"retry_window_s": 30, "retry_initial_s": 0.1, "retry_max_s": 4})
    p = opts.retry_policy()
    assert (p.window_s, p.initial_s, p.max_s) == (30, 0.1, 4)
    assert StorageOptions().retry_policy().window_s == 120
    with pytest.raises(ValueError, match="retry_window_s"):
        StorageOptions.model_validate({"retry_window_s": -1})
    for name in ("retry_window_s", "retry_initial_s", "retry_max_s", "s3_client", "fsspec_options"):
        assert StorageOptions.model_fields[name].description


def test_many_files_copied_in_parallel_to_the_retrying_s3_filesystem_do_not_deadlock(s3_bucket, tmp_path):
    """Ray Train/Tune sync a folder with pyarrow.fs.copy_files, whose copies run on Arrow's IO thread
    pool (8 threads) and write through the retrying wrapper (a Python filesystem) into S3. With the
    S3 filesystem's background writes, each stream's close waited for an upload task queued on that
    same pool: with all 8 threads in a close, no upload could run, and the Tune driver hung for good
    after a trial finished (the node-loss sweep test, twice in make test; py-spy: 8 threads in
    ObjectOutputStream::Close). With the pool cut to 1 thread the hang is certain (this test failed
    so before the fix). The wrapped S3 filesystem now uploads in the writing thread."""
    import threading

    import pyarrow as pa
    import pyarrow.fs as pafs

    from synthfar_ray import storage as st

    bucket, opts = s3_bucket
    src = tmp_path / "exp"
    src.mkdir()
    for i in range(24):
        (src / f"file-{i:02d}.json").write_bytes(b"x" * (1000 + i))
    fs, path = st.resolve_retrying(f"{bucket}/sync", opts)
    done = threading.Event()

    def copy() -> None:  # Ray Train's own upload helper (it turns threads off only for a bare S3FileSystem)
        from ray.train._internal.storage import _pyarrow_fs_copy_files

        _pyarrow_fs_copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        done.set()

    # One IO thread makes the race certain: the copy task holds the only thread while its close waits.
    threads = pa.io_thread_count()
    pa.set_io_thread_count(1)
    try:
        threading.Thread(target=copy, daemon=True).start()
        finished = done.wait(60)
    finally:
        pa.set_io_thread_count(threads)
    assert finished, "copy_files into the retrying S3 filesystem did not finish in 60 s (deadlock)"
    assert len(st.list_files(f"{bucket}/sync", opts)) == 24
