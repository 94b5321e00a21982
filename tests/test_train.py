"""Ray Train (V2) training on small fixture Parquet sets: DDP learning, fault recovery, resume by
name, both executors (a Train worker group, one task), the four data plans, s3:// storage (moto),
configs.

Fixture images carry their labels in plain sight so a tiny CNN learns them in a few dozen steps:
ethnicity = one of 5 distinct colours, gender = bright (female) vs dark (male), age = strength of
a vertical brightness ramp.
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import train_worker_actors

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import CORE_FIELDS, age_to_bin
from synthfar_ray.train import FAULT_ENV, TrainConfig, load_model, needed_datasets, run_train
from synthfar_ray.train_data import build_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALETTE = np.array([(210, 50, 50), (50, 210, 50), (50, 50, 210), (210, 210, 50), (50, 210, 210)], np.float32)


def fixture_image(rng: np.random.Generator, ethnicity: int, gender: int, age: float, size: int) -> np.ndarray:
    base = PALETTE[ethnicity] * (1.0 if gender else 0.45)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)[:, None, None] * (age / 85.0) * 120
    return np.clip(base + ramp + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)


def write_fixture(folder: str, n: int, seed: int = 0, size: int = 32, synthetic: bool = False,
                  with_age: bool = True, split_p: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  files: int = 2) -> pa.Table:
    """A dataset folder in the shared row schema (+ `subset` for real sets) and a _manifest.json."""
    rng = np.random.default_rng(seed)
    eth, gender = rng.integers(0, 5, n), rng.integers(0, 2, n)
    age = rng.uniform(0, 85, n).astype(np.float32)
    split = np.array(["train"] * n) if synthetic else rng.choice(["train", "val", "test"], n, p=list(split_p))
    cols = {
        "id": np.arange(n, dtype=np.int64) + 10_000 * seed,
        "image": [encode_jpeg(fixture_image(rng, int(e), int(g), float(a), size)) for e, g, a in zip(eth, gender, age)],
        "width": np.full(n, size), "height": np.full(n, size),
        "age": [float(a) if with_age else None for a in age],
        "age_bin": age_to_bin(age), "gender": gender, "ethnicity": eth,
        "source": ["synthetic" if synthetic else f"fixture{seed}"] * n, "split": split.tolist(),
    }
    fields = list(CORE_FIELDS)
    if not synthetic:
        cols["subset"] = [int(rng.choice([25, 50, 75, 100])) if s == "train" else None for s in split]
        fields.append(pa.field("subset", pa.int8()))
    table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))
    os.makedirs(folder, exist_ok=True)
    per = -(-n // files)
    for i in range(files):
        pq.write_table(table.slice(i * per, per), os.path.join(folder, f"part-{i:06d}.parquet"))
    with open(os.path.join(folder, "_manifest.json"), "w") as f:  # must be ignored by the readers
        json.dump({"stage": "fixture", "rows": n}, f)
    return table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    # Big enough that the 60-step DDP run never starts a second pass (each pass is a new Ray Data
    # execution, seconds of fixed cost); the pretrain_finetune test cycles a small selection instead.
    real = write_fixture(str(root / "real"), 2000, seed=1)
    syn = write_fixture(str(root / "synthetic"), 600, seed=2, synthetic=True)
    return {"root": root, "real": str(root / "real"), "synthetic": str(root / "synthetic"),
            "real_table": real, "syn_table": syn}


def _cfg(data, tmp, **kw) -> TrainConfig:
    base = dict(name="run", storage_path=str(tmp / "runs"), plan="real", real=data["real"],
                model={"backbone": "tiny"}, image_size=32, batch_size=16, lr=5e-3, warmup_steps=5, amp="none",
                val_every=20, log_every=10, num_workers=1, use_gpu=False, cpus_per_worker=0.5, data_cpus=0.5,
                shuffle_buffer=64, failure_max=1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml")) +
                                        glob.glob(os.path.join(ROOT, "configs", "experiments", "*.yaml"))),
                         ids=os.path.basename)
def test_every_train_config_validates(path):
    cfg = load_config(TrainConfig, path)
    if "experiments" in path:  # the paper's protocol
        assert (cfg.model.backbone, cfg.image_size, cfg.batch_size, cfg.amp) == ("resnet50", 196, 16, "auto")
        assert (cfg.warmup_steps, cfg.grad_clip, cfg.seed, cfg.steps) == (1000, 1.0, 42, 100_000)
        assert cfg.storage_path.startswith("s3://")


def test_experiment_matrix_is_complete():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "experiments", "*.yaml"))}
    assert {"a_synthetic_only", "b_utkface_only", "c_fairface_only", "d_synth_to_fairface25",
            "e_synth_to_fairface50", "f_synth_to_utkface50", "g_synth_to_fairface75"} <= names
    d = load_config(TrainConfig, os.path.join(ROOT, "configs", "experiments", "d_synth_to_fairface25.yaml"))
    assert (d.plan, d.real_subset, d.pretrain_steps, d.finetune_steps, d.finetune_lr) == (
        "pretrain_finetune", 25, 50_000, 50_000, 1e-4)
    adapted = {n: load_config(TrainConfig, os.path.join(ROOT, "configs", "experiments", f"{n}.yaml"))
               for n in ("h_synthetic_dann_fairface", "i_synthetic_daln_fairface", "j_synthetic_aux_bn_fairface")}
    assert {n: (c.plan, c.adapt.method, c.adapt.aux_bn, c.real.endswith("/fairface")) for n, c in adapted.items()} == {
        "h_synthetic_dann_fairface": ("synthetic", "dann", False, True),
        "i_synthetic_daln_fairface": ("synthetic", "daln", False, True),
        "j_synthetic_aux_bn_fairface": ("synthetic", "none", True, True)}
    k = load_config(TrainConfig, os.path.join(ROOT, "configs", "experiments", "k_synthetic_fairface_race7_transfer.yaml"))
    assert (k.plan, k.mix_ratio, k.model.transfer, k.real.endswith("/fairface")) == (
        "mix", 0.5, ("logits", "features"), True)


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstorage_path: /tmp/x\nplan: mix\nsynthetic: /data/s\n")
    with pytest.raises(ConfigError, match="real"):
        load_config(TrainConfig, str(bad))
    with pytest.raises(ConfigError, match="divisible"):
        load_config(TrainConfig, str(bad), ["real=/data/r", "batch_size=10", "num_workers=3"])
    with pytest.raises(ConfigError, match="real_subset"):
        load_config(TrainConfig, str(bad), ["real=/data/r", "real_subset=30"])
    with pytest.raises(ConfigError, match="executor 'task' runs one worker, not num_workers=2"):
        load_config(TrainConfig, str(bad), ["real=/data/r", "num_workers=2", "executor=task"])
    cfg = load_config(TrainConfig, str(bad), ["plan=pretrain_finetune", "real=/data/r", "steps=10"])
    assert (cfg.pretrain_steps, cfg.finetune_steps, cfg.steps) == (5, 5, 10)
    cfg = load_config(TrainConfig, str(bad), ["plan=pretrain_finetune", "real=/data/r", "pretrain_steps=3",
                                              "finetune_steps=4"])
    assert cfg.steps == 7


def test_a_gpu_worker_without_cuda_fails_unless_gloo_is_asked_for(tmp_path):
    """A worker holding GPUs on a node where CUDA is not visible: a Train worker group reports the
    device as cuda, Ray Train's local mode (the task executor) as cpu; either way the run fails with
    the GPU named, or trains on CPU when dist_backend is gloo (the fake clusters)."""
    import torch

    from synthfar_ray.train import worker_device

    cfg = TrainConfig(name="g", storage_path=str(tmp_path), plan="real", real="/data/r")
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert worker_device(cfg, cpu, [], False) == cpu
    assert worker_device(cfg, cuda, ["0"], True) == cuda
    for reported in (cuda, cpu):
        with pytest.raises(RuntimeError, match=r"train g: this worker holds GPU \['0'\] but no CUDA device is visible"):
            worker_device(cfg, reported, ["0"], False)
        assert worker_device(cfg.model_copy(update={"dist_backend": "gloo"}), reported, ["0"], False) == cpu


# ------------------------------------------------------------------------------------------ datasets

def test_datasets_follow_splits_subsets_and_selection(ray_cluster, data, tmp_path):
    """Real train = split train with subset <= P; val = split val; synthetic = the chosen ids only.
    The folders hold a _manifest.json, which the Parquet readers skip."""
    syn_ids = data["syn_table"]["id"].to_numpy()
    chosen = syn_ids[::3]
    # Later stages keep their outputs in `_`-prefixed sub-folders of a dataset (sampling scores):
    # the readers must not take them for dataset rows.
    os.makedirs(os.path.join(data["synthetic"], "_scores"), exist_ok=True)
    pq.write_table(pa.table({"id": syn_ids, "score": np.zeros(len(syn_ids))}),
                   os.path.join(data["synthetic"], "_scores", "scores.parquet"))
    pq.write_table(pa.table({"id": syn_ids, "chosen": np.isin(syn_ids, chosen)}), tmp_path / "selection.parquet")
    cfg = _cfg(data, tmp_path, plan="pretrain_finetune", synthetic=data["synthetic"], real_subset=25,
               synthetic_selection=str(tmp_path / "selection.parquet"), steps=2)
    ds = build_datasets(cfg, needed_datasets(cfg))
    assert set(ds) == {"synthetic", "real", "val"}
    got = {name: sorted(ds[name].select_columns(["id"]).to_pandas()["id"].tolist()) for name in ds}
    real = data["real_table"]
    want_train = real.filter(pc.and_(pc.equal(real["split"], "train"), pc.less_equal(real["subset"], 25)))
    n_train = len(real.filter(pc.equal(real["split"], "train")))
    assert got["real"] == sorted(want_train["id"].to_pylist()) and 0 < len(got["real"]) < n_train / 2
    assert got["val"] == sorted(real.filter(pc.equal(real["split"], "val"))["id"].to_pylist())
    assert got["synthetic"] == sorted(chosen.tolist())
    batch = ds["real"].take_batch(4)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["is_synthetic"].tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def ddp_run(ray_cluster, data, tmp_path_factory):
    """Two gloo DDP workers on the mix plan (a quarter of every batch synthetic), 60 steps,
    checkpoints every 20, and one injected crash after step 30.

    Why a hook: killing a worker actor from outside lands at a random point (or after the run ends);
    the hook raises inside rank 0's training function right after step 30, exactly once (a marker
    file records that it fired), which is what a crashed worker looks like to Ray Train.
    """
    tmp = tmp_path_factory.mktemp("ddp")
    marker = tmp / "fault-fired"
    cfg = _cfg(data, tmp, name="ddp", plan="mix", synthetic=data["synthetic"], mix_ratio=0.25,
               num_workers=2, batch_size=32, steps=60, val_every=20)
    os.environ[FAULT_ENV] = f"30:{marker}"
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = run_train(cfg)
    finally:
        del os.environ[FAULT_ENV]
    # Ray Train V2's fit() leaves a SIGINT handler in the main thread whose closure holds the run's
    # controller actor; run_train puts the previous one back, so the controller does not outlive the run.
    assert signal.getsignal(signal.SIGINT) is handler
    return cfg, result, marker


def test_ddp_learns_and_recovers_from_a_worker_failure(ddp_run):
    cfg, result, marker = ddp_run
    assert marker.exists()  # the failure did happen
    assert result.steps == 60 and result.start_step == 20  # resumed from the step-20 checkpoint
    assert result.steps_run == 40
    m = result.metrics
    assert m["val_ethnicity_acc"] > 0.6 and m["val_gender_acc"] > 0.8, m  # chance: 0.2 / 0.5
    assert m["val_n"] == pq.read_table(cfg.real, columns=["split"]).column("split").to_pylist().count("val")
    summary = json.loads((Path(cfg.storage_path) / "ddp" / "result.json").read_text())
    assert summary["steps"] == 60 and summary["checkpoint"].endswith("checkpoint_000000060")
    assert summary["images_per_second"] > 0
    ckpt = result.checkpoint
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    assert (meta["backbone"], meta["image_size"], meta["step"]) == ("tiny", 32, 60)
    assert glob.glob(os.path.join(cfg.storage_path, "ddp", "tensorboard", "events.out.tfevents.*"))
    net, meta = load_model(os.path.join(cfg.storage_path, "ddp"))  # a run folder means its latest checkpoint
    assert meta["checkpoint"] == ckpt and not net.training


def test_mix_batches_hold_the_synthetic_share(ddp_run):
    cfg, result, _ = ddp_run
    summary = json.loads((Path(cfg.storage_path) / "ddp" / "result.json").read_text())
    # Counted from the rows' own is_synthetic tags over the resumed attempt: 40 steps x 2 workers x
    # 16 rows = 1280 binomial draws at p = 0.25 (sd 0.012): 0.06 is five standard deviations.
    assert abs(summary["synthetic_fraction"] - 0.25) < 0.06, summary["synthetic_fraction"]
    assert summary["synthetic_fraction"] == result.synthetic_fraction
    assert summary["mix_ratio"] == 0.25


def test_mix_ratio_is_exact_in_expectation_at_any_batch_size():
    """Rounding 0.05 x 8 gives 0 synthetic rows per batch (the stream was silently dropped); the
    seeded binomial counts average to the ratio and are a pure function of (seed, rank, step)."""
    from synthfar_ray.train_data import MixSchedule

    mix = MixSchedule(("synthetic", "real"), 8, 0.05, seed=42, rank=0)
    counts = [mix.counts(step) for step in range(4000)]
    assert all(c["synthetic"] + c["real"] == 8 for c in counts)
    share = sum(c["synthetic"] for c in counts) / (8 * 4000)
    assert abs(share - 0.05) < 0.01, share  # sd 0.0039
    assert [mix.counts(s) for s in (0, 7, 3999)] == [counts[0], counts[7], counts[3999]]  # same after a resume
    other_rank = MixSchedule(("synthetic", "real"), 8, 0.05, seed=42, rank=1)
    assert [other_rank.counts(s) for s in range(200)] != counts[:200]  # ranks draw independently


def test_batch_stream_hands_out_any_row_count_without_losing_rows(ray_cluster, data, tmp_path):
    """take(n) for varying n returns exactly n rows, in order, every row of a pass once."""
    import ray
    import torch

    from synthfar_ray.train_data import BatchStream

    cfg = _cfg(data, tmp_path, shuffle_buffer=0)
    ds = ray.data.from_items([{"id": i, "image": np.zeros((4, 4, 3), np.uint8), "age": 1.0, "age_bin": 0, "gender": 0,
                               "ethnicity": 0, "is_synthetic": 1} for i in range(40)])
    stream = BatchStream(ds, 16, cfg, 0, torch.device("cpu"), None)
    taken = [stream.take(n) for n in (0, 5, 11, 0, 16)]
    assert [int(t[0].shape[0]) for t in taken] == [0, 5, 11, 0, 16]
    assert int(torch.cat([t[2] for t in taken]).sum()) == 32  # every row tagged synthetic, none lost


def test_cached_passes_are_permutations_of_the_first(ray_cluster, data, tmp_path):
    """A shard that fits train_cache_mb is read by Ray Data once: every later pass hands out each of
    its rows exactly once, in a new seeded order; a zero budget streams every pass from Ray Data."""
    import ray
    import torch

    from synthfar_ray.train_data import BatchStream

    rows = [{"id": i, "image": np.full((4, 4, 3), i, np.uint8), "age": float(i), "age_bin": 0, "gender": 0,
             "ethnicity": 0, "is_synthetic": 1} for i in range(48)]
    ds = ray.data.from_items(rows)
    passes = {}
    for budget in (64.0, 0.0):
        cfg = _cfg(data, tmp_path, shuffle_buffer=0, train_cache_mb=budget)
        stream = BatchStream(ds, 16, cfg, 0, torch.device("cpu"), None)
        passes[budget] = [stream.take(48)[1]["age"].tolist() for _ in range(3)]
    cached = passes[64.0]
    assert all(sorted(p) == [float(i) for i in range(48)] for p in cached)  # each row once per pass
    assert cached[1] != cached[2] and cached[1] != cached[0]  # a new order each pass
    streamed = passes[0.0]
    assert all(sorted(p) == [float(i) for i in range(48)] for p in streamed)


def test_one_worker_runs_as_a_task_that_ray_retries_from_its_last_checkpoint(ddp_run, data, tmp_path):
    """executor auto, one worker: the run is one Ray task ("train:<name>") and no Ray Train worker
    group. A crash after step 25 fails the task; Ray retries it (failure_max=1) and the new attempt
    resumes from the step-20 checkpoint the first one uploaded. keep_checkpoints=2 leaves the newest two
    folders, each complete (the weights, the training state and meta.json)."""
    marker = tmp_path / "fault-fired"
    cfg = _cfg(data, tmp_path, name="solo", steps=40, val_every=10, keep_checkpoints=2)
    actors = train_worker_actors()
    os.environ[FAULT_ENV] = f"25:{marker}"
    try:
        result = run_train(cfg)
    finally:
        del os.environ[FAULT_ENV]
    assert marker.exists()  # the failure did happen
    assert (result.start_step, result.steps_run, result.steps) == (20, 20, 40)
    assert train_worker_actors() == actors >= 2  # none added (the ddp_run fixture's two workers are counted)
    run = Path(cfg.storage_path) / "solo"
    folders = sorted(p.name for p in run.glob("checkpoint_*"))
    assert folders == ["checkpoint_000000030", "checkpoint_000000040"]
    assert all(sorted(os.listdir(run / f)) == ["meta.json", "model.pt", "train_state.pt"] for f in folders)
    assert result.checkpoint == str(run / "checkpoint_000000040")
    assert result.metrics["val_gender_acc"] > 0.8, result.metrics  # chance: 0.5
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_both_executors_learn_the_same_and_resume_each_others_runs(ray_cluster, data, tmp_path):
    """The executor changes how the worker starts, not what it computes: the same seeded 20-step mix
    run (two train sets and the val split) on a one-worker Ray Train group and as one task ends with
    the same losses and val metrics: the rows come in the same order (the task gives its datasets
    Ray Train's ingest options itself; without them this fails). Extending each run by 20 steps on
    the other executor resumes at step 20, and the two again agree."""
    def scores(result) -> dict[str, float]:
        return {k: v for k, v in result.metrics.items() if k.startswith(("val_", "loss"))}

    base = _cfg(data, tmp_path, plan="mix", synthetic=data["synthetic"], mix_ratio=0.25, steps=20, val_every=10)
    task = run_train(base.model_copy(update={"name": "a", "executor": "task"}))
    group = run_train(base.model_copy(update={"name": "b", "executor": "trainer"}))
    assert scores(task) and scores(task) == pytest.approx(scores(group), rel=1e-6)
    assert task.synthetic_fraction == group.synthetic_fraction > 0
    task2 = run_train(base.model_copy(update={"name": "a", "executor": "trainer", "steps": 40}))
    group2 = run_train(base.model_copy(update={"name": "b", "executor": "task", "steps": 40}))
    assert (task2.start_step, task2.steps_run) == (group2.start_step, group2.steps_run) == (20, 20)
    assert scores(task2) == pytest.approx(scores(group2), rel=1e-6)
    assert scores(task2) != scores(task)


def test_run_refuses_another_config_under_the_same_name(ddp_run, data, tmp_path):
    """Same name, other lr or model: refused with the key named (it would continue the old optimizer
    and schedule), before any training. A finished run re-run keeps its result.json; overwrite=true
    starts over."""
    from synthfar_ray.config import ConfigError

    cfg, result, _ = ddp_run
    result_file = Path(cfg.storage_path) / "ddp" / "result.json"
    before = json.loads(result_file.read_text())
    assert before["finished"] and before["history"]
    with pytest.raises(ConfigError, match=r"\blr\b") as err:
        run_train(cfg.model_copy(update={"lr": 1e-2}))
    assert "overwrite=true" in str(err.value)
    with pytest.raises(ConfigError, match="model.backbone"):
        run_train(cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": "resnet18"})}))

    again = run_train(cfg)  # finished with this config: nothing to do, nothing overwritten
    assert json.loads(result_file.read_text()) == before
    assert again.steps == 60 and again.history == before["history"]

    small = _cfg(data, tmp_path, name="guard", steps=2, val_every=2)
    run_train(small)
    fresh = run_train(small.model_copy(update={"lr": 1e-2, "overwrite": True}))
    assert (fresh.start_step, fresh.steps_run) == (0, 2)
    assert json.loads((Path(small.storage_path) / "guard" / "result.json").read_text())["config"]["lr"] == 1e-2


def test_missing_dataset_is_named_before_ray_starts(tmp_path):
    """`synthetic=/x/does/not/exist`: one line naming the setting and the path, and Ray never started."""
    import subprocess
    import sys

    code = ("import sys, ray; from synthfar_ray.cli import main; "
            "rc = main(['train', sys.argv[1], 'synthetic=/x/does/not/exist']); print('RC', rc, ray.is_initialized())")
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(f"name: x\nstorage_path: {tmp_path}/runs\nplan: synthetic\n")
    out = subprocess.run([sys.executable, "-c", code, str(cfg_file)], capture_output=True, text=True, timeout=120)
    assert "RC 2 False" in out.stdout, out.stdout + out.stderr
    err = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "synthetic:" in err[0] and "/x/does/not/exist" in err[0], out.stderr
    assert "Traceback" not in out.stderr


def test_pretrain_finetune_on_s3_and_resume_by_name_from_the_cli(ray_cluster, data, s3_bucket, tmp_path):
    """Checkpoints, result.json and TensorBoard files land in s3:// (moto); the phase is recorded in
    every checkpoint; re-running the same name (here from the CLI, with a bigger finetune budget)
    resumes inside the finetune phase instead of starting over."""
    import torch

    from synthfar_ray.cli import main

    bucket, opts = s3_bucket
    # A selection of 20 synthetic rows holds one 16-row batch: each pretrain step starts a new pass.
    syn_ids = data["syn_table"]["id"].to_numpy()
    pq.write_table(pa.table({"id": syn_ids, "chosen": np.arange(len(syn_ids)) < 20}), tmp_path / "sel.parquet")
    cfg = _cfg(data, tmp_path, name="pf", storage_path=f"{bucket}/runs", storage=opts, plan="pretrain_finetune",
               synthetic=data["synthetic"], synthetic_selection=str(tmp_path / "sel.parquet"),
               pretrain_steps=2, finetune_steps=2, val_every=2, keep_checkpoints=None, finetune_lr=1e-3,
               decode_on="worker")
    result = run_train(cfg)
    assert result.steps == 4 and result.checkpoint == f"{bucket}/runs/pf/checkpoint_000000004"
    assert [h["phase"] for h in result.history] == ["pretrain", "finetune"]

    cfg_file = tmp_path / "pf.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {
        "storage": {"endpoint_url": opts.endpoint_url, "region": opts.region,
                    "access_key_id": "testing", "secret_access_key": "testing"}}))
    assert main(["train", str(cfg_file), "finetune_steps=4", "augment_on=data", "decode_on=data"]) == 0
    summary = json.loads(storage.read_bytes(f"{bucket}/runs/pf/result.json", opts))
    assert (summary["start_step"], summary["steps_run"], summary["steps"]) == (4, 2, 6)  # no step redone
    assert "val_gender_acc" in summary["metrics"]

    phases = {}
    for step in (2, 4, 6):
        uri = f"{bucket}/runs/pf/checkpoint_{step:09d}"
        meta = json.loads(storage.read_bytes(f"{uri}/meta.json", opts))
        state = torch.load(io.BytesIO(storage.read_bytes(f"{uri}/train_state.pt", opts)), weights_only=False)
        assert meta["step"] == state["step"] == step
        phases[step] = state["phase"]
    assert phases == {2: "pretrain", 4: "finetune", 6: "finetune"}
    # The finetune optimizer went on from its step-4 state: its scheduler counted 4 finetune steps.
    assert state["scheduler"]["last_epoch"] == 4
    assert storage.list_files(f"{bucket}/runs/pf/tensorboard", opts)
    net, meta = load_model(f"{bucket}/runs/pf", opts)
    assert meta["phase"] == "finetune" and set(net(torch.zeros(1, 3, 32, 32))) >= {"age", "gender_logit"}


def test_cli_reports_config_errors(tmp_path):
    from synthfar_ray.cli import main

    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("name: x\nstorage_path: /tmp/x\nplan: mix\nsynthetic: /data/s\n")
    assert main(["train", str(cfg_file)]) == 2  # plan mix without `real`: a clean one-line error


def test_shuffle_rows_hands_out_every_row_once_in_a_seeded_order():
    import torch

    from synthfar_ray.train_data import shuffle_rows

    def batches():
        for s in range(0, 96, 8):  # 12 batches of 8 rows, row i carries i everywhere
            r = torch.arange(s, s + 8)
            yield r[:, None, None, None].expand(8, 3, 2, 2).to(torch.uint8), {"age": r.float()}, r.to(torch.int8)

    def run(seed: int) -> list[int]:
        out = list(shuffle_rows(batches(), 20, 8, seed))  # buffer rounds up to 24 rows
        assert all(b[0].shape == (8, 3, 2, 2) for b in out)
        for images, labels, syn in out:  # rows stay whole: every tensor was gathered with one index
            assert torch.equal(images[:, 0, 0, 0].long(), labels["age"].long())
            assert torch.equal(syn.long(), labels["age"].long())
        return [int(v) for b in out for v in b[1]["age"]]

    order = run(1)
    assert sorted(order) == list(range(96)) and order != list(range(96))
    assert order == run(1) and order != run(2)
    assert sum(a > b for a, b in zip(order, order[1:])) > 20  # mixed, not sorted runs
    assert list(shuffle_rows(batches(), 0, 8, 1))[0][1]["age"].tolist() == list(range(8))  # 0: as read


def test_same_seed_same_run_whatever_order_the_reads_finish(ray_cluster, tmp_path):
    """preserve_order (the default): Ray Data hands the rows over in the seeded file order, so two runs
    with the same config and seed train on the same batches and end with the same losses and val
    metrics, exactly, although 8 read tasks finish in whatever order. (Without it, the demo's scores
    moved by up to 0.03 between reruns.)"""
    data = {"real": str(tmp_path / "real")}
    write_fixture(data["real"], 480, seed=7, files=8)
    results = [run_train(_cfg(data, tmp_path, name=f"again{i}", steps=30, val_every=10, log_every=10,
                              shuffle_buffer=32)) for i in range(2)]
    first, second = (r.history for r in results)
    assert len(first) >= 3 and first == second
    assert results[0].metrics == results[1].metrics
