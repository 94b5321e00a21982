"""raycluster's view of what a cluster can provide, and the one-line refusal of requests no node
can ever meet: the rules on given node shapes, then a stage on the test session's real cluster."""

from __future__ import annotations

import os
import time

import pytest

from synthfar_ray.errors import UserError
from synthfar_ray.raycluster import NodeShape, capacity, check_request, node_shapes

SHAPES = [NodeShape("node 10.0.0.1", {"CPU": 0.0}, 1, True),
          NodeShape("gpu-gen", {"CPU": 8.0, "GPU": 1.0}, 16, False),
          NodeShape("gpu-train", {"CPU": 96.0, "GPU": 8.0}, 2, False)]


def test_check_request_names_resource_amount_and_largest_node():
    with pytest.raises(UserError) as e:
        check_request("train x: each Train worker", {"CPU": 1, "GPU": 16}, shapes=SHAPES)
    assert str(e.value) == ("train x: each Train worker asks for GPU: 16, but the largest node (gpu-train) has "
                            "GPU: 8; no node this cluster has or can add fits it")


def test_check_request_needs_one_node_with_everything():
    with pytest.raises(UserError, match="on one node"):
        check_request("generate: each diffusion actor", {"CPU": 50, "GPU": 1},
                      shapes=[NodeShape("a", {"CPU": 64.0}, 1, True), NodeShape("b", {"CPU": 8.0, "GPU": 1.0}, 1, True)])


def test_check_request_counts_a_placement_group_across_nodes():
    check_request("train x: each Train worker", {"CPU": 1, "GPU": 1}, 32, together=True, shapes=SHAPES)
    with pytest.raises(UserError, match="needs 33 x"):
        check_request("train x: each Train worker", {"CPU": 1, "GPU": 1}, 33, together=True, shapes=SHAPES)


def test_check_request_logs_a_wait_for_the_autoscaler(caplog):
    with caplog.at_level("WARNING", logger="synthfar_ray.raycluster"):
        check_request("sample: each scoring actor", {"CPU": 4, "GPU": 1}, shapes=SHAPES)
        check_request("ingest: each decode task", {"CPU": 0}, shapes=SHAPES)  # asks for nothing: no check
    assert [r.getMessage() for r in caplog.records] == [
        "sample: each scoring actor: no live node has {CPU: 4, GPU: 1}; waiting for the autoscaler to add a "
        "gpu-gen or gpu-train node"]


def test_capacity_counts_what_the_autoscaler_may_add():
    assert capacity("GPU", SHAPES) == 16 * 1 + 2 * 8
    assert capacity("CPU", SHAPES) == 16 * 8 + 2 * 96


def test_stages_refuse_an_impossible_request_before_launching(ray_cluster, tmp_path):
    """On the session's CPU-only cluster, a diffusion actor asking for a GPU would pend forever:
    generate refuses it at once, naming the resource and the largest node; so does training with
    more CPUs per worker than any node has. Nothing is written."""
    from synthfar_ray.generate import GenerateConfig, run_generate
    from synthfar_ray.train import TrainConfig, run_train

    live = node_shapes()
    assert live and all(s.live for s in live)  # a local cluster: no autoscaler config
    started = time.monotonic()
    cfg = GenerateConfig.model_validate({"output": str(tmp_path / "gen"), "num_images": 4, "shard_size": 4,
                                         "generator": "procedural", "compute": {"gpus_per_actor": 1}})
    with pytest.raises(UserError, match=r"generate: each diffusion actor asks for GPU: 1, but the largest node "
                                        r"\(node [0-9.]+\) has GPU: 0"):
        run_generate(cfg)
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").glob("*.parquet"))

    data = tmp_path / "data"
    run_generate(GenerateConfig.model_validate({"output": str(data), "num_images": 8, "shard_size": 8,
                                                "generator": "procedural", "render": {"size": 32}}))
    train = TrainConfig.model_validate({"name": "too-big", "plan": "synthetic", "synthetic": str(data),
                                        "storage_path": str(tmp_path / "runs"), "steps": 2, "use_gpu": False,
                                        "cpus_per_worker": 64, "model": {"backbone": "tiny"}, "image_size": 32})
    with pytest.raises(UserError, match=r"train too-big: each Train worker asks for CPU: 64, but the largest node"):
        run_train(train)
    assert time.monotonic() - started < 120


def test_task_error_cause_unwraps_rays_wrapper():
    """Both places that turn a failed Ray task into our error (generate's shards, the pipeline's runs)
    use this: a UserError comes back as its own type with its first line only (Ray Data appends
    advice to the message), any other cause as raised, and an error without a cause as itself."""
    from synthfar_ray.errors import UserError
    from synthfar_ray.raycluster import task_error_cause
    from synthfar_ray.storage import StorageError

    class Wrapper(Exception):  # stands in for ray.exceptions.RayTaskError: only `.cause` is read
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    original = StorageError("cannot write s3://b/part-000001.parquet: storage unreachable\nRay Data: retry advice")
    out = task_error_cause(Wrapper(original))
    assert type(out) is StorageError and str(out) == "cannot write s3://b/part-000001.parquet: storage unreachable"
    assert str(original).count("\n") == 1  # the task's own exception is left as it was
    one_line = UserError("one line")
    assert task_error_cause(Wrapper(one_line)) is one_line
    bug = KeyError("x")
    assert task_error_cause(Wrapper(bug)) is bug
    plain = RuntimeError("no cause")
    assert task_error_cause(plain) is plain


def test_warm_worker_pool_env_fills_in_defaults_but_keeps_the_users_values(monkeypatch):
    from synthfar_ray.raycluster import WARM_POOL_IDLE_MS, WARM_POOL_MIN_WORKERS, warm_worker_pool_env

    for key in ("RAY_num_workers_soft_limit", "RAY_idle_worker_killing_time_threshold_ms",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_idle_worker_killing_time_threshold_ms", "5000")  # the user's choice wins
    warm_worker_pool_env()
    assert int(os.environ["RAY_num_workers_soft_limit"]) >= WARM_POOL_MIN_WORKERS
    assert os.environ["RAY_idle_worker_killing_time_threshold_ms"] == "5000" != str(WARM_POOL_IDLE_MS)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"
