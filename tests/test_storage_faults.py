"""Transient storage faults: the S3 endpoint (moto's server behind a TCP proxy) is cut for a few
seconds while storage calls, a generation run and Ray Train checkpoint uploads are under way; they
must succeed once it is back. An outage longer than the retry window fails in one line."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import boto3
import pyarrow.fs as pafs
import pytest

from synthfar_ray import storage
from synthfar_ray.storage import StorageError


@pytest.mark.parametrize("client", ["pyarrow", "s3fs"])
def test_write_and_read_during_an_outage_succeed_once_it_ends(s3_proxy, client):
    bucket, opts, proxy = s3_proxy
    opts = opts.model_copy(update={"s3_client": client})
    uri = storage.join(bucket, "out", "part.bin")
    data = os.urandom(200_000)
    outage = proxy.outage(2.0, min_rejected=1)
    storage.write_bytes(uri, data, opts)  # starts while the endpoint is cut
    assert proxy.rejected >= 1  # the client really met the outage
    outage.join()
    assert storage.read_bytes(uri, opts) == data
    proxy.outage(1.5, min_rejected=1)
    assert storage.list_files(storage.join(bucket, "out"), opts) == ["part.bin"]


@pytest.mark.parametrize("client", ["pyarrow", "s3fs"])
def test_lasting_outage_fails_in_one_line_after_the_window(s3_proxy, client):
    bucket, opts, proxy = s3_proxy
    opts = opts.model_copy(update={"s3_client": client, "retry_window_s": 2.0})
    proxy.stop()  # connection refused from now on
    uri = storage.join(bucket, "x.bin")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        storage.write_bytes(uri, b"1", opts)
    assert time.monotonic() - t0 < 30  # bounded by the window (plus the clients' own connect attempts)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {uri}: storage unreachable for ")
    assert "retry_window_s=2" in msg and "last error: " in msg


def test_permanent_error_is_not_retried(s3_proxy):
    bucket, opts, proxy = s3_proxy
    opts = opts.model_copy(update={"retry_window_s": 600.0})  # a retry would hang the test
    with pytest.raises(StorageError, match="cannot read .*missing"):
        storage.read_bytes(storage.join(bucket, "missing"), opts)
    with pytest.raises(StorageError, match="no-such-bucket-here.*(not found|NO_SUCH_BUCKET|does not exist)"):
        storage.write_bytes("s3://no-such-bucket-here/x", b"1", opts)


def test_retrying_filesystem_uploads_a_folder_through_an_outage(s3_proxy, tmp_path):
    """What Ray Train does with a checkpoint (pyarrow copy_files to storage_filesystem) survives a cut."""
    bucket, opts, proxy = s3_proxy
    src = tmp_path / "checkpoint_000001"
    src.mkdir()
    files = {"model.pt": os.urandom(3_000_000), "meta.json": b"{}"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    fs, path = storage.resolve_retrying(storage.join(bucket, "runs", "r", src.name), opts)
    outage = proxy.outage(2.0, min_rejected=1)
    pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    outage.join()
    assert proxy.rejected >= 1
    for name, data in files.items():
        assert storage.read_bytes(storage.join(bucket, "runs", "r", src.name, name), opts) == data
    with fs.open_input_file(f"{path}/meta.json") as f:  # reads go through the same retries
        assert f.read() == b"{}"
    assert fs.get_file_info(f"{path}/model.pt").size == 3_000_000


def _when_object_appears(s3_server: str, bucket: str, key: str, action) -> Callable[[], None]:
    """Run `action` as soon as `key` exists (watched on moto directly, not through the proxy).
    Returns `finish`: stop watching and wait for the watcher. The watch has no time limit of its own
    (a fixed count of polls ran out before a slow CI box wrote the object); the run under test bounds
    it, and a test then asserts that the action ran."""
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = bucket[len("s3://"):]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if client.list_objects_v2(Bucket=name, Prefix=key).get("KeyCount"):
                action()
                return
            done.wait(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()

    def finish() -> None:
        done.set()
        t.join()
    return finish


def _generate_cfg(output: str, opts):
    from test_generate import make_cfg  # the generation tests' tiny config

    return make_cfg(output, generator="procedural", render={"size": 32}, num_images=24, shard_size=4,
                    **{"compute.num_actors": 1}).model_copy(update={"storage": opts})


def test_generation_survives_an_outage_with_every_id_once(ray_cluster, s3_server, s3_proxy):
    from synthfar_ray.generate import MANIFEST, run_generate
    from test_generate import read_manifest, read_parts

    bucket, opts, proxy = s3_proxy
    out = storage.join(bucket, "synthetic")
    cfg = _generate_cfg(out, opts)
    # The driver writes the manifest before any shard: cutting then makes the shard writes meet the outage.
    outages: list[threading.Thread] = []
    finish_watch = _when_object_appears(s3_server, bucket, f"synthetic/{MANIFEST}",
                                   lambda: outages.append(proxy.outage(3.0, min_rejected=1)))
    result = run_generate(cfg)
    finish_watch()
    assert outages and proxy.rejected >= 1  # the run's shard writes really met the outage
    assert result.generated == 24
    _, rows = read_parts(out, opts)
    assert sorted(r["id"] for r in rows) == list(range(24))  # every id exactly once
    manifest = read_manifest(out, opts)
    assert manifest["runs"][-1]["status"] == "complete" and manifest["images_present"] == 24


def test_generation_fails_in_one_line_when_the_outage_lasts(ray_cluster, s3_server, s3_proxy):
    from synthfar_ray.generate import MANIFEST, run_generate

    bucket, opts, proxy = s3_proxy
    out = storage.join(bucket, "synthetic")
    cfg = _generate_cfg(out, opts.model_copy(update={"retry_window_s": 2.0}))
    # Cut 1 s after the manifest appears: moto stores the object before its response reaches the
    # driver, and a cut in between failed the manifest write instead of a shard's (seen once in a full
    # run). The first shard write comes seconds later, after the actor has started.
    finish_watch = _when_object_appears(s3_server, bucket, f"synthetic/{MANIFEST}", lambda: (time.sleep(1.0), proxy.stop()))
    with pytest.raises(StorageError) as e:  # what the CLI prints as its one line
        run_generate(cfg)
    finish_watch()
    msg = str(e.value)
    assert "\n" not in msg and "storage unreachable for" in msg and "part-" in msg and "retry_window_s=2" in msg


def test_ray_train_checkpoints_survive_an_outage(ray_cluster, s3_server, s3_proxy, tmp_path):
    """Ray Train uploads checkpoints to `storage_filesystem` itself: given `resolve_retrying`'s
    filesystem, a cut during an upload delays the report instead of failing the worker group
    (max_failures=0 here, so any failed upload would fail the run)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    bucket, opts, proxy = s3_proxy
    fs, path = storage.resolve_retrying(storage.join(bucket, "runs"), opts)

    def loop(config):
        import tempfile

        for step in range(1, 4):
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "model.pt"), "wb") as f:
                    f.write(os.urandom(500_000))
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_{step:06d}")
            time.sleep(0.2)

    outages: list[threading.Thread] = []
    finish_watch = _when_object_appears(s3_server, bucket, "runs/ckpt/checkpoint_000001/model.pt",
                                   lambda: outages.append(proxy.outage(3.0, min_rejected=1)))
    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="ckpt", storage_path=path, storage_filesystem=fs,
                                                failure_config=FailureConfig(max_failures=0),
                                                checkpoint_config=CheckpointConfig(num_to_keep=None)))
    result = trainer.fit()
    finish_watch()
    assert outages and proxy.rejected >= 1
    assert result.metrics["step"] == 3
    keys = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket=bucket[len("s3://"):], Prefix="runs/ckpt/checkpoint_")["Contents"]
    assert {k["Key"] for k in keys} >= {f"runs/ckpt/checkpoint_{s:06d}/model.pt" for s in range(1, 4)}


@pytest.mark.slow
def test_training_checkpoints_survive_an_outage(ray_cluster, s3_server, s3_proxy, tmp_path):
    """run_train with storage_path on s3:// through the proxy, cut after the first checkpoint:
    failure_max=0, so a single failed upload (checkpoint or TensorBoard) would fail the run."""
    from synthfar_ray.train import TrainConfig, run_train
    from test_train import write_fixture

    bucket, opts, proxy = s3_proxy
    write_fixture(str(tmp_path / "real"), 120, seed=1)
    cfg = TrainConfig(name="cut", storage_path=f"{bucket}/runs", storage=opts, plan="real", real=str(tmp_path / "real"),
                      model={"backbone": "tiny"}, image_size=32, batch_size=16, lr=5e-3, warmup_steps=2, amp="none",
                      steps=4, val_every=2, log_every=2, num_workers=1, use_gpu=False, cpus_per_worker=0.5,
                      data_cpus=0.5, shuffle_buffer=64, failure_max=0, keep_checkpoints=None)
    outages: list[threading.Thread] = []
    finish_watch = _when_object_appears(s3_server, bucket, "runs/cut/checkpoint_000000002/",
                                   lambda: outages.append(proxy.outage(3.0, min_rejected=1)))
    result = run_train(cfg)
    finish_watch()
    assert outages and proxy.rejected >= 1  # the run's uploads really met the outage
    assert result.steps == 4 and result.checkpoint == f"{bucket}/runs/cut/checkpoint_000000004"
