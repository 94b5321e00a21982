"""URIs for every input and output: local paths, file://, s3:// (AWS, MinIO, R2 ...) and any other
fsspec URL (gs://, az://, abfs://, memory:// ...).

All I/O goes through pyarrow filesystems, the same objects Ray Data and Ray Train take, so a
location that works for our own files works for theirs: s3:// is pyarrow's S3 client by default (or
s3fs, `s3_client: s3fs`), other schemes are fsspec filesystems wrapped as pyarrow ones.

Every call here retries transient faults within `retry_window_s` (storage_retry.py); a write keeps
its bytes in memory until the upload succeeds, so a shard already generated survives an outage.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from typing import Any, Callable, Literal, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from synthfar_ray.storage_retry import RetryPolicy, StorageError, retry_call, retrying_filesystem

__all__ = ["StorageError", "StorageOptions"]  # StorageError lives with the retry loop that raises it
T = TypeVar("T")

# fsspec schemes whose implementation is an optional extra of this package.
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure"}


class StorageOptions(BaseModel):
    """How to reach object storage (the `storage:` section of every stage config). Unset S3 fields
    fall back to the usual AWS environment variables, for both S3 clients."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO, "
                                     "https://storage.googleapis.com for GCS interop; env AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="S3 region; env AWS_REGION / AWS_DEFAULT_REGION")
    access_key_id: SecretStr | None = Field(None, description="S3 key; env AWS_ACCESS_KEY_ID, else the default chain")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret; env AWS_SECRET_ACCESS_KEY")
    session_token: SecretStr | None = Field(None, description="S3 session token (temporary credentials)")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    s3_client: Literal["pyarrow", "s3fs"] = Field(
        "pyarrow", description="client for s3:// URIs: pyarrow's (faster Parquet I/O, see README) or s3fs; "
        "both take the fields above")
    fsspec_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the fsspec filesystem of other schemes "
        "(gs://: project, token; az://: account_name, account_key ...); credentials default to the library's own")
    retry_window_s: float = Field(120.0, ge=0, description="how long transient faults (connection refused/reset, "
                                  "timeouts, 5xx, SlowDown) are retried before the job fails; 0: no retries")
    retry_initial_s: float = Field(0.5, gt=0, description="first backoff delay; it doubles per retry")
    retry_max_s: float = Field(10.0, gt=0, description="longest backoff delay between two retries")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_window_s, self.retry_initial_s, self.retry_max_s)


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_s3(uri: str) -> bool:
    return scheme(uri) in ("s3", "s3a")


def is_remote(uri: str) -> bool:
    """Object storage or any other non-local URL (s3://, gs://, memory:// ...): not a local path or file://."""
    return scheme(uri) not in ("", "file")


def is_local(uri: str) -> bool:
    return not is_remote(uri)


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(uri, *parts)


def _s3_endpoint_and_region(options: StorageOptions) -> tuple[str | None, str | None]:
    """The one reading of the S3 settings (fields, else AWS environment variables) both clients use."""
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    if endpoint:
        region = region or "us-east-1"  # custom endpoints ignore it, but the clients would probe AWS otherwise
    return endpoint, region


def _s3_credentials(options: StorageOptions, anon: str, key: str, secret: str, token: str) -> dict[str, Any]:
    """The credential fields under one client's argument names (none set: the client's default chain)."""
    if options.anonymous:
        return {anon: True}
    if options.access_key_id is None:
        return {}
    out = {key: options.access_key_id.get_secret_value(),
           secret: options.secret_access_key.get_secret_value() if options.secret_access_key else ""}
    if options.session_token is not None:
        out[token] = options.session_token.get_secret_value()
    return out


def _s3_filesystem(options: StorageOptions, background_writes: bool = True) -> pafs.S3FileSystem:
    endpoint, region = _s3_endpoint_and_region(options)
    # Delayed open: a small object is one PutObject on close instead of a three-request multipart
    # upload (bench/storage.py); a failure then shows at close, inside write_bytes' retried attempt.
    kwargs: dict = {"allow_delayed_open": True}
    if not background_writes:
        kwargs["background_writes"] = False
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if region:
        kwargs["region"] = region
    kwargs |= _s3_credentials(options, "anonymous", "access_key", "secret_key", "session_token")
    return _cached_s3_filesystem(tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=16)
def _cached_s3_filesystem(kwargs: tuple[tuple[str, Any], ...]) -> pafs.S3FileSystem:
    """One client per setting: building one costs more than a small GET (bench/storage.py), and
    every storage call resolves its URI. (fsspec caches its instances the same way.)"""
    return pafs.S3FileSystem(**dict(kwargs))


def _s3fs_kwargs(options: StorageOptions) -> dict[str, Any]:
    """The same StorageOptions mapped to s3fs's arguments."""
    endpoint, region = _s3_endpoint_and_region(options)
    kwargs: dict[str, Any] = {
        # Other processes (Ray actors) write the folders we list: a cached listing would be stale.
        "use_listings_cache": False,
        # Our retry loop owns the waiting; botocore's own retries only smooth single blips.
        "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}},
        "client_kwargs": {"region_name": region} if region else {},
    }
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return kwargs | _s3_credentials(options, "anon", "key", "secret", "token")


def _fsspec_filesystem(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """Any fsspec URL as a pyarrow filesystem (Ray Data and Ray Train take those) + the path in it."""
    import fsspec
    from pyarrow.fs import FSSpecHandler

    proto = scheme(uri)
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError as e:
        extra = EXTRAS.get(proto)
        hint = f"pip install 'synthfar-ray[{extra}]'" if extra else str(e)
        raise StorageError(f"{uri}: the {proto}:// filesystem is not installed ({hint})") from e
    except ValueError as e:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file://, s3:// or an "
                           "fsspec URL (gs://, az:// ...)") from e
    kwargs = _s3fs_kwargs(options) if proto in ("s3", "s3a") else {}
    try:  # host/account parts of the URL (ftp://host, abfs://container@account ...), then the config's options
        fs = cls(**(cls._get_kwargs_from_urls(uri) | kwargs | options.fsspec_options))
    except Exception as e:  # a bad option or missing credentials: name the URI and the settings to fix
        raise StorageError(f"cannot open {uri} with {cls.__name__} (check storage.fsspec_options): {e}") from e
    return pafs.PyFileSystem(FSSpecHandler(fs)), cls._strip_protocol(uri).rstrip("/")


def resolve(uri: str, options: StorageOptions | None = None,
            background_writes: bool = True) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it); `background_writes`: pyarrow's S3 client only."""
    options = options or StorageOptions()
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"s3 URI without a bucket: {uri!r}")
        if options.s3_client == "s3fs":
            return _fsspec_filesystem(uri, options)
        return _s3_filesystem(options, background_writes), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if is_remote(uri):
        return _fsspec_filesystem(uri, options)
    return pafs.LocalFileSystem(), _local_path(uri)


def resolve_retrying(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """`resolve`, with a remote filesystem wrapped so that every call and every upload retries transient
    faults: for writers we do not call ourselves (Ray Train/Tune's `storage_filesystem`, whose
    checkpoint uploads would otherwise fail the worker group at the first refused connection)."""
    options = options or StorageOptions()
    # Uploads in the writing thread (pyarrow's S3 client). Ray Train/Tune copy folders with pyarrow's
    # copy_files on Arrow's IO thread pool; through this wrapper (a Python filesystem, so Ray's own
    # guard for S3 - use_threads=False, apache/arrow#32372 - does not apply) each copy's close waited
    # for a background upload queued on that same pool, and with every IO thread in a close nothing
    # ran: the Tune driver hung after a trial finished (tests/test_storage_retry.py).
    fs, path = resolve(uri, options, background_writes=False)
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path
    return retrying_filesystem(fs, options.retry_policy(), label=scheme(uri)), path


def _retried(op: str, uri: str, options: StorageOptions | None, fn: Callable[[pafs.FileSystem, str], T]) -> T:
    """fn(fs, path) under the retry policy of `options`; a permanent OSError becomes a StorageError."""
    options = options or StorageOptions()
    fs, path = resolve(uri, options)
    try:
        return retry_call(lambda: fn(fs, path), op, uri, options.retry_policy())
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot {op} {uri}: {e}") from e


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    return _retried("stat", uri, options, lambda fs, path: fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    def read(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()
    return _retried("read", uri, options, read)


TEMP_MARK = ".tmp-"


def temp_name(name: str) -> str:
    """`.<name>.tmp-<uuid>`: hidden, and never ending like the target, so a glob such as duckdb's
    `dir/*.parquet` never picks up a file being written (or left behind by a killed writer)."""
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """A temp file of `write_bytes`: this naming, or the older `.tmp-<uuid>-<name>`."""
    return name.startswith(".") and TEMP_MARK in name


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object so that readers never see a partial file; `data` stays in memory until
    the write succeeds (retried within the window), so a generated shard outlives a short outage.

    Object stores' PUTs are atomic already; on a local disk write a hidden temp file (`temp_name`) and rename it.
    """
    def write(fs: pafs.FileSystem, path: str) -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = posixpath.dirname(path)
            fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, temp_name(posixpath.basename(path)))
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:  # object stores have no folders to create (pyarrow's S3 would PUT a marker object per call)
            with fs.open_output_stream(path) as f:
                f.write(data)
    _retried("write", uri, options, write)


def list_files(uri: str, options: StorageOptions | None = None, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under a folder URI; [] if it does not exist."""
    def names(fs: pafs.FileSystem, path: str) -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        return sorted(posixpath.basename(i.path) for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return _retried("list", uri, options, names)


def delete(uri: str, options: StorageOptions | None = None) -> None:
    def remove(fs: pafs.FileSystem, path: str) -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    _retried("delete", uri, options, remove)


def ensure_dir(uri: str, options: StorageOptions | None = None) -> None:
    _retried("create", uri, options, lambda fs, path: fs.create_dir(path, recursive=True))


def parquet_files(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, list[str], str]:
    """(fs, Parquet file paths, base dir) of a dataset folder (recursively) or a single file.

    Paths with a component starting with `_` or `.` are skipped, as Ray Data's read_parquet does:
    manifests, `_scores/`, `_selections/` and temp files are not rows of the dataset.
    """
    def find(fs: pafs.FileSystem, path: str) -> tuple[pafs.FileSystem, list[str], str]:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path], posixpath.dirname(path)
        if info.type != pafs.FileType.Directory:
            raise StorageError(f"dataset not found: {uri}")
        files = []
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            rel = i.path[len(path):].lstrip("/")
            if i.type == pafs.FileType.File and i.path.endswith(".parquet") \
                    and not any(p.startswith((".", "_")) for p in rel.split("/")):
                files.append(i.path)
        if not files:
            raise StorageError(f"no .parquet files in dataset {uri}")
        return fs, sorted(files), path
    return _retried("list dataset", uri, options, find)


def open_parquet_dataset(uri: str, options: StorageOptions | None = None, partitioning: str | None = None):
    """A dataset folder as one pyarrow dataset (see parquet_files for what counts as a row file)."""
    import pyarrow.dataset as pads

    fs, files, base = parquet_files(uri, options)
    return pads.dataset(files, filesystem=fs, format="parquet", partitioning=partitioning,
                        partition_base_dir=base if partitioning else None)


def ray_read_parquet(paths: str | list[str], filesystem: pafs.FileSystem, **kwargs: Any):
    """`ray.data.read_parquet` through Ray Data's V1 Parquet datasource, the one way this project
    makes a Ray Dataset from Parquet (set RAY_DATA_USE_DATASOURCE_V2=1 to get Ray's default back).

    Why not the V2 default: per read it starts 32 footer-reader actors, each needing a free CPU to be
    placed and spread over the nodes, whatever the number of files. On an autoscaling cluster every
    read then asks for 32 CPUs (the fake-cluster tests saw every node type scaled to max_workers by
    a training run), and on a 4-CPU local Ray a read of 8 small files took 4.5-6 s against 0.4 s
    with V1 (and 1.9 s with one footer actor)."""
    import ray

    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
