"""bench/storage.py runs end to end (--smoke) and prints its table and ratios; timings are not judged."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_storage_smoke_prints_ratios():
    proc = subprocess.run([sys.executable, "bench/storage.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("Parquet write MB/s", "Parquet read MB/s", "1 KB put ms", "1 KB get ms"):
        row = re.search(rf"^{re.escape(label)}.*?((?:\s+[\d.]+){{4}})$", proc.stdout, re.M)
        assert row, proc.stdout
        assert all(math.isfinite(float(x)) and float(x) > 0 for x in row.group(1).split())
    for client in ("pyarrow", "s3fs"):
        assert re.search(rf"^ratio {client}/boto3 : write [\d.]+, read [\d.]+, put [\d.]+, get [\d.]+$",
                         proc.stdout, re.M), proc.stdout
