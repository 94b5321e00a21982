"""Shared fixtures: one real local Ray cluster per test session, and a real S3 endpoint (moto's
server on 127.0.0.1) for s3:// paths."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from synthfar_ray.raycluster import warm_worker_pool_env

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Every cluster the tests start (the shared one, `ray start` heads, CLI subprocesses) keeps a warm pool of
# idle workers, as the product's local clusters do (synthfar_ray.raycluster.warm_worker_pool_env).
warm_worker_pool_env()
# Ray Train's Prometheus metrics (two callbacks per run): nothing scrapes them in tests, and they cost
# ~2 machine CPU-s of a short run's ~26 (probe of 2026-12-07: four 30-step runs per setting, twice).
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# Ray's own metrics collection (every worker, raylet and dashboard agent reports every few seconds):
# nothing reads it in tests, and on a 4-CPU test cluster with 8 idle workers it cost 8.7 % of a core
# in the idle workers, 3.7 % in the dashboard agent and 3.6 % in the raylet, against 3.2 / 2.2 / 1.5 %
# without (30 s each, 2026-12-07). The suite runs several clusters with 8-24 idle workers at a time.
os.environ.setdefault("RAY_enable_metrics_collection", "0")


# `make test` runs two xdist workers with --dist loadfile: each module goes whole to one worker (its
# module fixtures are built once), in collection order. The longest modules go first, so the short
# ones fill the other worker around them. xdist hands each worker two modules to start with: the
# demo's worker (test_groundtruth, 12-13 min beside the other worker) gets a short one second.
LONGEST_FIRST = ("test_groundtruth", "test_cli", "test_quality", "test_adapt", "test_fake_cluster", "test_node_loss",
                 "test_tune", "test_synthetic_heads", "test_pipeline", "test_groups", "test_rl_sampler",
                 "test_storage_faults", "test_label_transfer", "test_keypoint_transfer", "test_job_submit")


# Tests that run Ray (through the shared cluster or a subprocess that starts its own) are marked
# `ray` here, so `make test-fast` (-m "not slow and not ray") keeps the pure-Python and single-process
# tests for the edit-test loop. A module that starts Ray another way sets `pytestmark = pytest.mark.ray`.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank)))  # stable


def run_shared_dir(tmp_path_factory) -> Path:
    """A folder this test run's xdist workers share (the parent of their base temps), or the base
    temp of a run without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def train_worker_actors() -> int:
    """Ray Train worker actors this cluster has had, alive or dead (from the GCS: the test cluster
    has no dashboard for the state API): a run on the task executor, or in a Tune trial, adds none."""
    from ray._private import state

    return sum(a["ActorClassName"] == "RayTrainWorker" for a in state.actors().values())


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the whole session (ray.init costs seconds).

    num_cpus is set above the 2 physical cores so fractional-CPU actors and Ray Data's read tasks
    can be scheduled side by side, as they would be on a real node.
    """
    import ray

    if not ray.is_initialized():
        # The S3 test credentials go to every worker, whichever fixture starts first: workers started
        # before s3_server set them had none, and pyarrow's S3 client then sent unsigned aws-chunked
        # uploads that moto stored with their chunk framing (parts without Parquet's footer).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **S3_TEST_ENV}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint), with credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = S3_TEST_ENV
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; returns (s3://bucket URI, StorageOptions pointing at the moto endpoint)."""
    import boto3

    from synthfar_ray.storage import StorageOptions

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    opts = StorageOptions(endpoint_url=s3_server, region="us-east-1",
                          access_key_id="testing", secret_access_key="testing")
    return f"s3://{name}", opts


@pytest.fixture()
def s3_proxy(s3_bucket):
    """(bucket URI, StorageOptions whose endpoint is a cuttable TCP proxy in front of moto, the proxy).

    Retries start at 0.2 s and stay under 1 s, so a few seconds' outage costs a test a few seconds."""
    from urllib.parse import urlparse

    from tcp_proxy_util import TcpProxy

    bucket, opts = s3_bucket
    target = urlparse(opts.endpoint_url)
    proxy = TcpProxy(target.hostname, target.port)
    proxy.start()
    yield bucket, opts.model_copy(update={"endpoint_url": proxy.endpoint, "retry_window_s": 30.0,
                                          "retry_initial_s": 0.2, "retry_max_s": 1.0}), proxy
    proxy.stop()


# ---------------------------------------------------------------------------------------------
# The ground-truth sets of the quality and sampling tests (session-scoped: several modules use them)

def procedural_set(output: str, n: int, style: str, label_noise: float, seed: int) -> str:
    from synthfar_ray.generate import GenerateConfig, run_generate

    cfg = GenerateConfig.model_validate({
        "output": output, "num_images": n, "seed": seed, "shard_size": n // 2, "val_fraction": 0.1,
        "generator": "procedural", "render": {"size": 64, "style": style, "label_noise": label_noise},
        "compute": {"num_actors": 1, "cpus_per_actor": 1}})
    run_generate(cfg)
    return output


@pytest.fixture(scope="session")
def quality_sets(ray_cluster, tmp_path_factory):
    """The ground-truth domain for quality and sampling tests: 600 synthetic-style faces with 30 %
    label noise (render_* truth columns) and 1,200 photo-style faces with exact labels ("real"),
    64 px, written by the procedural generator; 10 % of each is the val split.

    Built once per test run: under xdist the first worker to get here makes them under a file lock,
    and the other finds them complete (generation resumes, so a finished set is kept as it is)."""
    from filelock import FileLock

    root = run_shared_dir(tmp_path_factory) / "quality"
    with FileLock(f"{root}.lock"):
        root.mkdir(exist_ok=True)
        synthetic = procedural_set(str(root / "synthetic"), 600, "synthetic", 0.3, seed=0)
        real = procedural_set(str(root / "real"), 1200, "photo", 0.0, seed=1)
    return synthetic, real


QUALITY_SETTINGS = dict(embed_rows=300, seed=0,
                        scorer_train={"backbone": "tiny", "image_size": 64, "steps": 300, "batch_size": 32,
                                      "lr": 0.003, "cpus_per_worker": 1, "data_cpus": 0.5, "cross_fit_folds": 2})


@pytest.fixture(scope="session")
def quality_assessed(quality_sets, tmp_path_factory):
    """`synthfar quality` of the noisy synthetic set against the photo-style set (classifier and
    realism discriminators trained here; once per test run, as quality_sets: a second worker gets
    the finished folder back from run_quality)."""
    synthetic, real = quality_sets
    from filelock import FileLock

    from synthfar_ray.quality import run_quality
    from synthfar_ray.quality_config import QualityConfig

    cfg = QualityConfig(dataset=synthetic, real=real, **QUALITY_SETTINGS)
    with FileLock(f"{run_shared_dir(tmp_path_factory) / 'quality'}-assessed.lock"):
        return cfg, run_quality(cfg)
