"""`ray job submit` against a real local Ray head, as users drive the project on a cluster.

The head runs in a subprocess (tests/job_submit_util.py explains how it is isolated from the
pytest session's own cluster); jobs are submitted from the repository root with
`--working-dir . --runtime-env cluster/runtime_env.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import yaml

from synthfar_ray.images import decode_image

from job_submit_util import REPO_ROOT, RUNTIME_ENV_FILE, LocalHead, local_head, parse_probe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def head() -> Iterator[LocalHead]:
    with local_head(num_cpus=2) as h:
        yield h


def test_job_runs_submitted_code_with_runtime_env(head: LocalHead):
    env_vars = yaml.safe_load(RUNTIME_ENV_FILE.read_text())["env_vars"]
    # Run as a script, the way `python workflows/<stage>.py` runs: the script's folder, not the
    # working dir, is first on sys.path, so importing synthfar_ray relies on the job's PYTHONPATH.
    result = head.submit(["python", "tests/job_submit_util.py", *env_vars], timeout=150)
    assert result.returncode == 0, result.submit_output
    assert result.status == "SUCCEEDED", result.logs
    probe = parse_probe(result.logs)
    driver, worker = probe["driver"], probe["worker"]

    # The head's address file is in its own temp dir, so ray.init() in this process never finds it.
    assert (head.temp_dir / "ray_current_cluster").exists()

    # Both the driver and a Ray worker import the uploaded copy, not the checkout or an install.
    job_dir = Path(driver["cwd"])
    assert job_dir != REPO_ROOT and str(head.temp_dir) in str(job_dir)
    assert Path(driver["module"]) == job_dir / "synthfar_ray" / "__init__.py"
    assert Path(worker["cwd"]) == job_dir  # one node: the worker uses the same unpacked package
    assert Path(worker["module"]) == job_dir / "synthfar_ray" / "__init__.py"

    # env_vars reach driver and workers (the head was started without them).
    assert all(k not in head.env for k in env_vars)
    assert driver["env"] == worker["env"] == {k: str(v) for k, v in env_vars.items()}

    # The excludes kept the upload to sources.
    listing = set(driver["listing"])
    assert {"synthfar_ray", "cluster", "configs", "workflows", "pyproject.toml"} <= listing
    assert not listing & {".git", ".venv", "runs", "data", ".pytest_cache"}

    # The submit command streamed the job's output too.
    assert "SYNTHFAR_PROBE" in result.submit_output


def test_failing_job_reports_failed(head: LocalHead):
    code = "import sys; print('synthfar: about to fail', flush=True); sys.exit(3)"
    result = head.submit(["python", "-c", code], timeout=120)
    assert result.returncode == 1  # `ray job submit` exits 1 when the job fails
    assert result.status == "FAILED"
    assert "synthfar: about to fail" in result.logs


def test_generate_workflow_job_writes_parquet(head: LocalHead, tmp_path: Path):
    out = tmp_path / "synthetic"
    result = head.submit(
        ["python", "workflows/generate.py", "--config", "configs/generate/quickstart.yaml",
         f"output={out}", "num_images=8", "shard_size=4"],
        timeout=240,
    )
    assert result.returncode == 0 and result.status == "SUCCEEDED", result.logs[-6000:]
    parts = sorted(out.glob("*.parquet"))
    assert len(parts) == 2
    table = pq.read_table(parts[0]).to_pylist() + pq.read_table(parts[1]).to_pylist()
    assert sorted(r["id"] for r in table) == list(range(8))
    sampler = yaml.safe_load((REPO_ROOT / "configs/generate/quickstart.yaml").read_text())["sampler"]
    assert decode_image(table[0]["image"]).shape == (sampler["height"], sampler["width"], 3)


def test_relative_output_inside_a_job_is_refused(head: LocalHead):
    """Inside a job the driver's working directory is Ray's temporary copy of the upload: a relative
    output would land there and vanish. The job FAILS at config validation, says why in one line,
    points to s3:// or an absolute path, and writes nothing into the copy."""
    result = head.submit(
        ["python", "workflows/generate.py", "--config", "configs/generate/quickstart.yaml",
         "output=runs/x", "num_images=4", "shard_size=4"],
        timeout=180,
    )
    assert result.returncode != 0 and result.status == "FAILED", result.logs[-4000:]
    assert "relative output path 'runs/x'" in result.logs and "s3://" in result.logs, result.logs[-4000:]
    assert "Traceback" not in result.logs  # a user's mistake, not a bug
