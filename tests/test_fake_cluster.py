"""The shipped cluster YAMLs' node types under Ray's real autoscaler (fake multi-node provider).

Each test starts a head whose autoscaler launches "nodes" of the YAML's worker types as local
processes (tests/fake_cluster_util.py: how the YAML is scaled down to 2 cores, and why jobs run
without --working-dir). Jobs are submitted with `ray job submit`, with the resource requests the
shipped configs make (cpus_per_actor, one GPU per actor / Train worker, cpus_per_worker, data_cpus);
only the model, sizes and budgets are overridden small. The GPUs are declared, not real: generation
runs the diffusion pipeline on CPU (no CUDA visible), training runs with `dist_backend=gloo`, the
opt-in that lets a GPU worker with no visible CUDA train on CPU.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from fake_cluster_util import REPO_ROOT, FakeCluster, Node, fake_cluster, fake_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

YAMLS = [REPO_ROOT / "cluster" / "aws-gpu.yaml", REPO_ROOT / "cluster" / "gcp-gpu.yaml"]

# Small sizes; every resource request is left as the shipped config makes it.
GENERATE = ["python", "workflows/generate.py", "--config", "configs/generate/sd15_humans.yaml",
            "model.preset=tiny-random", "model.dtype=float32", "sampler.width=64", "sampler.height=64",
            "sampler.steps=4", "compute.batch_size=4"]
TRAIN = ["python", "workflows/train.py", "--config", "configs/experiments/a_synthetic_only.yaml",
         "real=null", "val_source=synthetic", "model.backbone=tiny", "model.pretrained=null", "amp=none",
         "warmup_steps=2", "image_size=32", "dist_backend=gloo"]


def _gpu_type_of(cluster: FakeCluster, node: Node) -> str:
    """The worker type a live node was launched as (the resource shapes of the scaled types differ)."""
    for name, spec in cluster.config["available_node_types"].items():
        res = {k: v for k, v in spec["resources"].items() if k != "object_store_memory"}
        if all(node.resources.get(k) == v for k, v in res.items()) and float(node.resources.get("GPU", 0)) == \
                float(res.get("GPU", 0)):
            return name
    return "?"


def _watch(cluster: FakeCluster, future, seen: set[str]) -> None:
    """Record the worker types that come up while a job runs."""
    while not future.done():
        try:
            seen.update(_gpu_type_of(cluster, n) for n in cluster.alive_workers())
        except OSError:
            pass
        time.sleep(0.5)


def _run_watching(cluster: FakeCluster, entrypoint: list[str], timeout: float) -> tuple[object, set[str]]:
    seen: set[str] = set()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(cluster.submit, entrypoint, timeout)
        _watch(cluster, future, seen)
        return future.result(), seen


def test_fake_config_keeps_the_yamls_worker_types():
    """What the fake cluster is made of: the YAML's worker type names, min/max workers (capped at
    2) and resource kinds, GPUs still declared, the head without CPUs (it only runs drivers)."""
    import yaml

    for path in YAMLS:
        src = yaml.safe_load(path.read_text())
        fake = fake_config(path, gcs_port=6379)
        workers = {n for n in src["available_node_types"] if n != src["head_node_type"]}
        assert workers == set(fake["available_node_types"]) - {"ray.head.default"}
        for name in workers:
            want, got = src["available_node_types"][name], fake["available_node_types"][name]
            assert got["min_workers"] == want.get("min_workers", 0) == 0  # scale from zero
            assert got["max_workers"] == min(2, want["max_workers"])
            assert set(want["resources"]) <= set(got["resources"])
            assert bool(got["resources"].get("GPU")) == bool(want["resources"].get("GPU"))
        assert fake["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
        assert fake["provider"]["type"] == "fake_multinode"


@pytest.fixture(scope="module")
def aws_cluster() -> Iterator[FakeCluster]:
    """One AWS fake cluster for both tests that use that YAML (the refused request alone, with a head
    of its own, took 135 s in one full-suite run, most of it starting the head). The refused request
    runs first and launches no worker, so the autoscaler test still starts from zero workers."""
    with fake_cluster(YAMLS[0]) as cluster:
        yield cluster


def test_request_no_node_type_can_meet_fails_at_once(aws_cluster):
    """4 GPUs per diffusion actor: no node type of the AWS YAML has that many (the largest, gpu-train,
    has 2 after scaling), so the job fails within seconds with one line naming the resource, the
    amount and the largest node, instead of pending forever. No worker is launched for it."""
    assert aws_cluster.alive_workers() == []
    started = time.monotonic()
    result = aws_cluster.submit([*GENERATE, f"output=/tmp/never-{uuid.uuid4().hex}", "num_images=4",
                                 "compute.gpus_per_actor=4"], timeout=180)
    assert result.status == "FAILED", result.logs[-3000:]
    line = "generate: each diffusion actor asks for GPU: 4, but the largest node (gpu-train) has GPU: 2"
    assert line in result.logs, result.logs[-3000:]
    assert "Traceback" not in result.logs
    assert time.monotonic() - started < 90
    assert aws_cluster.alive_workers() == []


@contextmanager
def _cluster(yaml_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeCluster]:
    if yaml_path == YAMLS[0]:
        yield request.getfixturevalue("aws_cluster")
    else:
        with fake_cluster(yaml_path) as cluster:
            yield cluster


@pytest.mark.parametrize("yaml_path", YAMLS, ids=lambda p: p.stem)
def test_autoscaler_adds_gpu_workers_for_generation_and_training_then_removes_them(yaml_path: Path, tmp_path,
                                                                                  request):
    """From zero workers: the generation job's actors (2 CPUs + 1 GPU each, as sd15_humans.yaml
    asks) make the autoscaler add gpu-gen nodes; the training job (1 GPU worker, as the experiment
    configs ask) adds a GPU node again; both jobs finish; idle workers are removed afterwards."""
    out, runs = tmp_path / "synthetic", tmp_path / "runs"
    with _cluster(yaml_path, request) as cluster:
        assert cluster.alive_workers() == []
        gen, gen_types = _run_watching(cluster, [*GENERATE, f"output={out}", "num_images=8", "shard_size=4"], 400)
        assert gen.status == "SUCCEEDED", gen.logs[-5000:]
        assert "waiting for the autoscaler to add a gpu-gen" in gen.logs  # the stage said why it waited
        assert "gpu-gen" in gen_types, gen_types
        rows = pq.read_table(out, columns=["id"]).column("id").to_pylist()
        assert sorted(rows) == list(range(8))

        train, train_types = _run_watching(cluster, [*TRAIN, f"synthetic={out}", f"storage_path={runs}",
                                                     "steps=6", "val_every=6", "log_every=3", "batch_size=4"], 400)
        assert train.status == "SUCCEEDED", train.logs[-5000:]
        assert {"gpu-gen", "gpu-train"} & train_types, train_types
        assert "step 6" in train.logs

        idle_s = cluster.config["idle_timeout_minutes"] * 60
        cluster.wait_for(lambda nodes: not nodes, timeout=idle_s + 60, what="idle workers removed")
