"""bench/train.py --smoke runs the configs' own training path (Ray Data -> Train worker) beside the
in-memory loop and prints both rates and their ratio, per run and their median over --repeat runs
(no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray  # the bench starts its own local Ray
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--smoke", "--repeat", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(re.findall(r"^ratio data/memory: \d+\.\d\d$", proc.stdout, re.M)) == 2, proc.stdout[-2000:]
    median = re.search(r"^median ratio over 2 runs: (\S+) \((\S+), (\S+)\)$", proc.stdout, re.M)
    assert median, proc.stdout[-2000:]
    res = json.loads(out.read_text())
    assert res["memory"]["ips"] > 0 and res["data"]["ips"] > 0
    # The demo's train settings were measured: its batch/shuffle settings reached the worker.
    assert res["train"]["shuffle_buffer"] == 256 and res["memory"]["precision"] == "none"
    assert 0 < res["ratio"] == res["data"]["ips"] / res["memory"]["ips"] == res["ratios"][-1]
    assert len(res["ratios"]) == 2
    assert float(median.group(1)) == pytest.approx(sum(res["ratios"]) / 2, abs=0.006)  # printed to 2 decimals
