"""bench/generate.py runs end to end (--smoke) and prints its Ray/plain ratios; timings are not judged."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray  # the bench starts its own local Ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_generate_smoke_prints_ratios():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "bench/generate.py", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("plain diffusers loop", "ray data job (wall)", "ray data job (steady)"):
        assert re.search(rf"^{re.escape(label)}\s*:\s*[\d.]+ img/s", proc.stdout, re.M), proc.stdout
    ratios = re.search(r"^ratio ray/plain\s*: steady (\S+), wall (\S+)$", proc.stdout, re.M)
    assert ratios, proc.stdout
    assert all(math.isfinite(float(x)) for x in ratios.groups())
    assert "actor-side clocks: 4 shards" in proc.stdout  # --smoke: 8 images in shards of 2
