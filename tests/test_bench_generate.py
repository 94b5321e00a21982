"""bench/generate.py runs end to end (--smoke, two plain/Ray pairs) and prints its Ray/plain ratios and
their medians; timings are not judged."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from synthfar_ray.raycluster import POOL_VARS, WARM_POOL_IDLE_MS, WARM_POOL_MIN_WORKERS

pytestmark = pytest.mark.ray  # the bench starts its own local Ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_generate_smoke_prints_ratios():
    # Its own local Ray, and none of the worker-pool settings conftest gives the suite's clusters: the bench
    # must set them itself, as `synthfar generate` does for its local clusters.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *POOL_VARS)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "bench/generate.py", "--smoke", "--repeat", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pool = (f"worker pool: soft limit {max(WARM_POOL_MIN_WORKERS, os.cpu_count() or 1)}, idle workers beyond it "
            f"killed after {WARM_POOL_IDLE_MS / 1000:g} s")
    assert re.search(rf"^{re.escape(pool)}$", proc.stdout, re.M), proc.stdout[-3000:]
    for label in ("plain diffusers loop", "ray data job (wall)", "ray data job (steady)"):
        assert re.search(rf"^{re.escape(label)}\s*:\s*[\d.]+ img/s", proc.stdout, re.M), proc.stdout
    ratios = re.findall(r"^ratio ray/plain\s*: steady (\S+), wall (\S+)$", proc.stdout, re.M)
    assert len(ratios) == 2, proc.stdout
    assert all(math.isfinite(float(x)) for pair in ratios for x in pair)
    assert proc.stdout.count("actor-side clocks: 4 shards") == 2  # --smoke: 8 images in shards of 2, each pair
    medians = re.search(r"^medians over 2 pairs: steady (\S+) \((\S+), (\S+)\), wall (\S+) \((\S+), (\S+)\)$",
                        proc.stdout, re.M)
    assert medians, proc.stdout
    steady = sorted(float(p[0]) for p in ratios)
    assert [float(x) for x in medians.group(2, 3)] == pytest.approx(steady, abs=1e-3)
    assert float(medians.group(1)) == pytest.approx(sum(steady) / 2, abs=1e-3)
