"""The storage functions on every backend: s3:// through pyarrow's client and through s3fs (both on
moto's real S3 server), and a non-S3 fsspec URL (memory://) wrapped as a pyarrow filesystem."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from synthfar_ray import storage
from synthfar_ray.storage import StorageError, StorageOptions


@pytest.fixture(params=["s3-pyarrow", "s3-s3fs", "memory"])
def location(request):
    """(root URI, StorageOptions) of a fresh, empty place on each backend."""
    if request.param == "memory":
        return f"memory://synthfar-{uuid.uuid4().hex[:8]}", StorageOptions()
    bucket, opts = request.getfixturevalue("s3_bucket")
    return bucket, opts.model_copy(update={"s3_client": request.param.split("-")[1]})


def test_functions_roundtrip_on_each_backend(location):
    root, opts = location
    uri = storage.join(root, "dir", "x.json")
    assert uri == f"{root}/dir/x.json"
    assert not storage.exists(uri, opts)
    storage.write_bytes(uri, b"{}", opts)
    storage.write_bytes(storage.join(root, "dir", "y.bin"), b"\x00" * 3000, opts)
    assert storage.exists(uri, opts) and storage.read_bytes(uri, opts) == b"{}"
    assert storage.list_files(storage.join(root, "dir"), opts) == ["x.json", "y.bin"]
    assert storage.list_files(storage.join(root, "dir"), opts, suffix=".json") == ["x.json"]
    assert storage.list_files(storage.join(root, "missing"), opts) == []
    storage.delete(uri, opts)
    assert not storage.exists(uri, opts)
    with pytest.raises(StorageError, match="cannot read .*x.json"):
        storage.read_bytes(uri, opts)
    storage.delete(storage.join(root, "dir"), opts)
    assert storage.list_files(storage.join(root, "dir"), opts) == []


def test_parquet_files_on_each_backend(location):
    root, opts = location
    table = pa.table({"id": [1, 2, 3]})
    for name in ("a.parquet", "sub/b.parquet", "_scores/s.parquet", ".a.parquet.tmp-x"):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(root, "set", name), sink.getvalue().to_pybytes(), opts)
    fs, files, base = storage.parquet_files(storage.join(root, "set"), opts)
    assert [f[len(base):].lstrip("/") for f in files] == ["a.parquet", "sub/b.parquet"]
    assert storage.open_parquet_dataset(storage.join(root, "set"), opts).to_table().num_rows == 6
    with pytest.raises(StorageError, match="dataset not found"):
        storage.parquet_files(storage.join(root, "nothing"), opts)


def test_s3fs_takes_the_same_credentials(s3_bucket):
    """One credentials story: a wrong secret in StorageOptions fails on both clients (it is really used)."""
    bucket, opts = s3_bucket
    storage.write_bytes(storage.join(bucket, "k"), b"1", opts)
    for client in ("pyarrow", "s3fs"):
        good = opts.model_copy(update={"s3_client": client})
        assert storage.read_bytes(storage.join(bucket, "k"), good) == b"1"
        fs, path = storage.resolve(storage.join(bucket, "k"), good)
        assert path == f"{bucket[5:]}/k"
        assert isinstance(fs, pafs.PyFileSystem) == (client == "s3fs")


def test_scheme_helpers():
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k") and storage.is_remote("memory://x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x") and not storage.is_remote("rel")
    assert storage.is_local("file:///tmp/x") and not storage.is_local("az://c/x")
    assert storage.join("gs://b/", "x", "/y") == "gs://b/x/y"


def test_missing_fsspec_extra_is_named():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(StorageError, match=r"gs://.*not installed.*synthfar-ray\[gcs\]"):
        storage.write_bytes("gs://bucket/x", b"1")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("nosuchscheme://b/x")


def test_fsspec_options_reach_the_filesystem(tmp_path):
    """fsspec_options are the filesystem's arguments: zip:// needs `fo`, the archive."""
    with pytest.raises(StorageError, match=r"cannot open zip://a.txt with ZipFileSystem .*fsspec_options"):
        storage.resolve("zip://a.txt", StorageOptions(fsspec_options={"fo": str(tmp_path)}))
    import zipfile
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
        z.writestr("a.txt", "hello")
    assert storage.read_bytes("zip://a.txt", StorageOptions(fsspec_options={"fo": str(tmp_path / "z.zip")})) == b"hello"


def test_ray_data_parquet_through_wrapped_fsspec(ray_cluster, s3_bucket):
    """Ray Data reads and writes through the fsspec filesystem wrapped as a pyarrow one (s3fs here:
    a memory:// store would not be shared with Ray's worker processes)."""
    import ray

    bucket, opts = s3_bucket
    opts = opts.model_copy(update={"s3_client": "s3fs"})
    fs, path = storage.resolve(storage.join(bucket, "table"), opts)
    assert isinstance(fs, pafs.PyFileSystem)
    ray.data.from_arrow(pa.table({"id": list(range(20))})).write_parquet(path, filesystem=fs)
    storage.write_bytes(storage.join(bucket, "table", "_manifest.json"), b"{}", opts)
    back = storage.ray_read_parquet(path, fs)
    assert sorted(r["id"] for r in back.take_all()) == list(range(20))
    _, files, _ = storage.parquet_files(storage.join(bucket, "table"), opts.model_copy(update={"s3_client": "pyarrow"}))
    assert files  # written through s3fs, seen by pyarrow's client: the same objects


def test_ray_datasets_read_parquet_without_footer_reader_actors(ray_cluster, tmp_path):
    """Ray's default (V2) Parquet reader plans ListFiles -> ReadFiles and starts 32 one-CPU footer
    actors per read, which on an autoscaling cluster ask for 32 CPUs; the project's one way to make a
    Ray Dataset from Parquet plans V1's single Read operator and returns the same rows."""
    for i in range(3):
        pq.write_table(pa.table({"id": list(range(10 * i, 10 * i + 10))}), tmp_path / f"part-{i}.parquet")
    fs, path = storage.resolve(str(tmp_path))
    ds = storage.ray_read_parquet(path, fs)
    assert {type(op).__name__ for op in ds._logical_plan.dag.post_order_iter()} == {"Read"}
    assert sorted(r["id"] for r in ds.take_all()) == list(range(30))
