"""URIs for every input and output: local paths, file:// and s3:// (AWS, MinIO, R2 ...).

All I/O goes through pyarrow filesystems, the same objects Ray Data and Ray Train take, so a
location that works for our own files works for theirs.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, SecretStr

from synthfar_ray.errors import UserError


class StorageError(UserError, RuntimeError):
    """A location that cannot be read or written; the message names the URI."""


class StorageOptions(BaseModel):
    """How to reach object storage. Unset fields fall back to the usual AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; env AWS_ENDPOINT_URL
    region: str | None = None  # env AWS_REGION / AWS_DEFAULT_REGION
    access_key_id: SecretStr | None = None  # env AWS_ACCESS_KEY_ID, else the default chain
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anonymous: bool = False  # public buckets


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def is_local(uri: str) -> bool:
    return not is_s3(uri)


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return urlparse(uri).path
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(uri, *parts)


def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        region = region or "us-east-1"  # custom endpoints ignore it, but pyarrow would probe AWS otherwise
    if region:
        kwargs["region"] = region
    if options.anonymous:
        kwargs["anonymous"] = True
    elif options.access_key_id is not None:
        kwargs["access_key"] = options.access_key_id.get_secret_value()
        kwargs["secret_key"] = options.secret_access_key.get_secret_value() if options.secret_access_key else ""
        if options.session_token is not None:
            kwargs["session_token"] = options.session_token.get_secret_value()
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it)."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"s3 URI without a bucket: {uri!r}")
        return _s3_filesystem(options or StorageOptions()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


TEMP_MARK = ".tmp-"


def temp_name(name: str) -> str:
    """`.<name>.tmp-<uuid>`: hidden, and never ending like the target, so a glob such as duckdb's
    `dir/*.parquet` never picks up a file being written (or left behind by a killed writer)."""
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """A temp file of `write_bytes`: this naming, or the older `.tmp-<uuid>-<name>`."""
    return name.startswith(".") and TEMP_MARK in name


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object so that readers never see a partial file.

    S3 PUTs are atomic already; on a local disk write a hidden temp file (`temp_name`) and rename it.
    """
    fs, path = resolve(uri, options)
    try:
        parent = posixpath.dirname(path)
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = posixpath.join(parent, temp_name(posixpath.basename(path)))
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {e}") from e


def list_files(uri: str, options: StorageOptions | None = None, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under a folder URI; [] if it does not exist."""
    fs, path = resolve(uri, options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {e}") from e
    return sorted(
        posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )


def delete(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def ensure_dir(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise StorageError(f"cannot create {uri}: {e}") from e


def parquet_files(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, list[str], str]:
    """(fs, Parquet file paths, base dir) of a dataset folder (recursively) or a single file.

    Paths with a component starting with `_` or `.` are skipped, as Ray Data's read_parquet does:
    manifests, `_scores/`, `_selections/` and temp files are not rows of the dataset.
    """
    fs, path = resolve(uri, options)
    try:
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
    except OSError as e:
        raise StorageError(f"cannot list dataset {uri}: {e}") from e
    if not files:
        raise StorageError(f"no .parquet files in dataset {uri}")
    return fs, sorted(files), path


def open_parquet_dataset(uri: str, options: StorageOptions | None = None, partitioning: str | None = None):
    """A dataset folder as one pyarrow dataset (see parquet_files for what counts as a row file)."""
    import pyarrow.dataset as pads

    fs, files, base = parquet_files(uri, options)
    return pads.dataset(files, filesystem=fs, format="parquet", partitioning=partitioning,
                        partition_base_dir=base if partitioning else None)
