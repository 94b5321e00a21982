"""bench/train.py --smoke runs the configs' own training path (Ray Data -> Train worker) beside the
in-memory loop (timed before and after it) and prints the rates and their ratio, per run and their median over --repeat runs
(no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from synthfar_ray.raycluster import POOL_VARS, WARM_POOL_IDLE_MS, WARM_POOL_MIN_WORKERS

pytestmark = pytest.mark.ray  # the bench starts its own local Ray
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # Without the worker-pool settings conftest gives the suite's clusters: the bench must set them itself,
    # as `synthfar train` does for its local clusters (with Ray's 1 s idle kill, the data path's tasks kept
    # starting new processes beside the step).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *POOL_VARS)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--smoke", "--repeat", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = (f"[bench] worker pool: soft limit {max(WARM_POOL_MIN_WORKERS, os.cpu_count() or 1)}, idle workers beyond "
            f"it killed after {WARM_POOL_IDLE_MS / 1000:g} s")
    assert re.search(rf"^{re.escape(pool)}$", proc.stdout, re.M), proc.stdout[-3000:]
    # A one-worker config trains as one task (executor auto), and that is the path measured.
    assert re.search(r"^\[bench\] executor task$", proc.stdout, re.M), proc.stdout[-3000:]
    assert len(re.findall(r"^ratio data/memory: \d+\.\d\d  \(memory: the mean of memory and memory2\)$", proc.stdout, re.M)) == 2, proc.stdout[-2000:]
    median = re.search(r"^median ratio over 2 runs: (\S+) \((\S+), (\S+)\)$", proc.stdout, re.M)
    assert median, proc.stdout[-2000:]
    res = json.loads(out.read_text())
    assert res["memory"]["ips"] > 0 and res["data"]["ips"] > 0 and res["memory2"]["ips"] > 0
    # The demo's train settings were measured: its batch/shuffle settings reached the worker.
    assert res["train"]["shuffle_buffer"] == 256 and res["memory"]["precision"] == "none"
    assert res["executor"] == "task"
    # The ratio is against the mean of the memory path timed before and after the data path.
    mean_memory = (res["memory"]["ips"] + res["memory2"]["ips"]) / 2
    assert 0 < res["ratio"] == pytest.approx(res["data"]["ips"] / mean_memory, rel=1e-12) == res["ratios"][-1]
    assert len(res["ratios"]) == 2
    assert float(median.group(1)) == pytest.approx(sum(res["ratios"]) / 2, abs=0.006)  # printed to 2 decimals
