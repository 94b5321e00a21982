"""S3 clients compared: pyarrow's S3FileSystem against s3fs (as the project uses it: an fsspec
filesystem wrapped as a pyarrow one), on moto's S3 server, with plain boto3 calls as the baseline.

    python bench/storage.py            # Parquet table of ~32 MB, 3 repeats (median), 100 small files
    python bench/storage.py --smoke    # ~1 MB, 1 repeat, 5 small files (checks the bench runs)
    python bench/storage.py --mb 64 --files 200

Measured through the project's own functions (`storage.resolve` + pyarrow.parquet for Parquet,
`storage.write_bytes`/`read_bytes` for the 1 KB objects), so the numbers include what our code adds
(resolving the URI, the retry wrapper). moto runs in its own process so that its request handling does
not share the benchmark's GIL. moto is not S3: absolute numbers say little about a real bucket; the
ratios between clients on the same server are what the README's choice rests on.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from synthfar_ray import storage  # noqa: E402
from synthfar_ray.storage import StorageOptions  # noqa: E402

CLIENTS = ("pyarrow", "s3fs")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_table(mb: float) -> pa.Table:
    """Rows like a dataset's: ids, labels and an incompressible image-bytes column (~4 KB per row)."""
    rng = np.random.default_rng(0)
    n = max(1, int(mb * 1e6 / 4096))
    images = [rng.bytes(4096) for _ in range(n)]
    return pa.table({"id": np.arange(n), "age": rng.integers(0, 85, n), "image": images})


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_client(client: str, bucket: str, opts: StorageOptions, table: pa.Table, nbytes: int, repeats: int,
                 files: int) -> dict[str, float]:
    o = opts.model_copy(update={"s3_client": client})
    uri = f"s3://{bucket}/{client}/table.parquet"
    fs, path = storage.resolve(uri, o)
    storage.write_bytes(f"s3://{bucket}/{client}/warmup", b"1", o)  # connections, credentials, instance cache
    write_s = timed(lambda: pq.write_table(table, path, filesystem=fs), repeats)
    read_s = timed(lambda: pq.read_table(path, filesystem=fs), repeats)
    assert pq.read_table(path, filesystem=fs).num_rows == table.num_rows
    small = os.urandom(1024)
    keys = [f"s3://{bucket}/{client}/small/{i:05d}.bin" for i in range(files)]
    t0 = time.perf_counter()
    for k in keys:
        storage.write_bytes(k, small, o)
    put_s = (time.perf_counter() - t0) / files
    t0 = time.perf_counter()
    for k in keys:
        storage.read_bytes(k, o)
    get_s = (time.perf_counter() - t0) / files
    return {"write": nbytes / 1e6 / write_s, "read": nbytes / 1e6 / read_s, "put": put_s * 1e3, "get": get_s * 1e3}


def bench_boto3(endpoint: str, bucket: str, table: pa.Table, data: bytes, repeats: int,
                files: int) -> dict[str, float]:
    """The plain loop: boto3 put/get of the same bytes (Parquet encoded in memory for both directions)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="boto3/warmup", Body=b"1")  # connection and credentials

    def write() -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        s3.put_object(Bucket=bucket, Key="boto3/table.parquet", Body=sink.getvalue().to_pybytes())

    write_s = timed(write, repeats)
    read_s = timed(lambda: pq.read_table(pa.BufferReader(
        s3.get_object(Bucket=bucket, Key="boto3/table.parquet")["Body"].read())), repeats)
    small = os.urandom(1024)
    t0 = time.perf_counter()
    for i in range(files):
        s3.put_object(Bucket=bucket, Key=f"boto3/small/{i:05d}.bin", Body=small)
    put_s = (time.perf_counter() - t0) / files
    t0 = time.perf_counter()
    for i in range(files):
        s3.get_object(Bucket=bucket, Key=f"boto3/small/{i:05d}.bin")["Body"].read()
    get_s = (time.perf_counter() - t0) / files
    return {"write": len(data) / 1e6 / write_s, "read": len(data) / 1e6 / read_s, "put": put_s * 1e3,
            "get": get_s * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs")
    p.add_argument("--mb", type=float, default=32.0, help="Parquet table size in MB")
    p.add_argument("--files", type=int, default=100, help="number of 1 KB objects")
    p.add_argument("--repeats", type=int, default=3, help="Parquet repeats (median)")
    args = p.parse_args(argv)
    if args.smoke:
        args.mb, args.files, args.repeats = 1.0, 5, 1
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, endpoint = start_moto()
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        opts = StorageOptions(endpoint_url=endpoint, region="us-east-1", access_key_id="bench",
                              secret_access_key="bench")
        table = make_table(args.mb)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        print(f"moto S3 server {endpoint}; Parquet file {len(data) / 1e6:.1f} MB ({table.num_rows} rows), "
              f"median of {args.repeats}; {args.files} objects of 1 KB")
        results = {"boto3 (plain)": bench_boto3(endpoint, bucket, table, data, args.repeats, args.files)}
        for client in CLIENTS:
            results[client] = bench_client(client, bucket, opts, table, len(data), args.repeats, args.files)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = [("Parquet write MB/s", "write"), ("Parquet read MB/s", "read"), ("1 KB put ms (lower=better)", "put"),
            ("1 KB get ms (lower=better)", "get")]
    names = list(results)
    print(f"{'':28}" + "".join(f"{n:>16}" for n in names) + f"{'s3fs/pyarrow':>15}")
    for label, key in rows:
        vals = [results[n][key] for n in names]
        print(f"{label:28}" + "".join(f"{v:16.2f}" for v in vals) + f"{results['s3fs'][key] / results['pyarrow'][key]:15.2f}")
    base = results["boto3 (plain)"]
    for client in CLIENTS:
        r = results[client]
        print(f"ratio {client}/boto3 : write {r['write'] / base['write']:.2f}, read {r['read'] / base['read']:.2f}, "
              f"put {r['put'] / base['put']:.2f}, get {r['get'] / base['get']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
