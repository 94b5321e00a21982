"""Tune stage: a real 2-trial sweep (tiny net, CPU; one-worker trials train in their own process),
its trial table, resume without redoing finished trials, the TensorBoard logs under the sweep, and
a sweep of two-worker DDP trials through TorchTrainer."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import train_worker_actors

from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import CORE_FIELDS, age_to_bin
from synthfar_ray.tune import (RESULTS_CSV, RESULTS_MD, TRIAL_FILE, TuneConfig, _param_space, _scheduler, _searcher,
                               run_tune)


def coded_rows(n: int, seed: int, start_id: int, split: str, size: int = 32) -> dict:
    """Rows whose colour encodes gender (red) and ethnicity (green): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    eth, gen = rng.integers(0, 5, n), rng.integers(0, 2, n)
    age = rng.uniform(0, 85, n).astype(np.float32)
    images = [encode_jpeg(np.clip(np.array([50 + 150 * g, 30 + 45 * e, 120]) + rng.integers(-15, 16, (size, size, 3)),
                                  0, 255).astype(np.uint8)) for e, g in zip(eth, gen)]
    return {"id": np.arange(start_id, start_id + n, dtype=np.int64), "image": images,
            "width": np.full(n, size, np.int32), "height": np.full(n, size, np.int32), "age": age,
            "age_bin": age_to_bin(age).astype(np.int8), "gender": gen.astype(np.int8),
            "ethnicity": eth.astype(np.int8), "source": ["fixture"] * n, "split": [split] * n}


def write_dataset(path: str, parts: list[dict]) -> str:
    cols = {f.name: [v for p in parts for v in p[f.name]] for f in CORE_FIELDS}
    os.makedirs(path, exist_ok=True)
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in CORE_FIELDS], schema=pa.schema(CORE_FIELDS))
    pq.write_table(table, os.path.join(path, "part-000000.parquet"))
    return path


def sweep_config(root: str, **over) -> TuneConfig:
    data = {
        "name": "sweep", "storage_path": os.path.join(root, "tune"), "plan": "mix",
        "train": {"synthetic": os.path.join(root, "syn"), "real": os.path.join(root, "real"), "steps": 20,
                  "batch_size": 16, "warmup_steps": 0, "val_every": 10, "log_every": 5, "image_size": 32,
                  "model": {"backbone": "tiny"}, "augment": False, "shuffle_buffer": 0},
        # lr 1e-6 cannot learn in 20 steps; 0.03 learns gender and most of ethnicity: a clear best.
        "space": {"sampler": "random", "k_multiple": 1.0, "mix_ratio": 0.5, "lr": {"grid": [1e-6, 0.03]}},
        "sampling": {"class_key": ["gender"], "redistribute": True},
        "num_samples": 1,
    }
    data.update(over)
    return TuneConfig.model_validate(data)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tune"))
    write_dataset(os.path.join(root, "real"), [coded_rows(64, 1, 0, "train"), coded_rows(32, 2, 1000, "val")])
    write_dataset(os.path.join(root, "syn"), [coded_rows(64, 3, 0, "train")])
    cfg = sweep_config(root)
    actors = train_worker_actors()
    first = run_tune(cfg)
    return cfg, first, train_worker_actors() - actors


def test_two_trials_best_is_the_working_lr(sweep):
    """One-worker trials train in their own process: no Ray Train worker actor starts."""
    cfg, result, train_workers = sweep
    assert train_workers == 0
    trials = {t["lr"]: t for t in result.trials}
    assert set(trials) == {1e-6, 0.03}
    good, bad = trials[0.03], trials[1e-6]
    assert good["status"] == bad["status"] == "TERMINATED"
    assert good["val_score"] > bad["val_score"] + 0.15, (good["val_score"], bad["val_score"])
    assert result.best_trial_id == good["trial_id"] and result.best_params["lr"] == 0.03
    assert result.best_metric == pytest.approx(good["val_score"])
    # every trial trained on the random 1x selection written before the sweep
    for t in result.trials:
        record = json.load(open(os.path.join(result.sweep_uri, "runs", t["trial_id"], TRIAL_FILE)))
        assert record["selection"].endswith(os.path.join("selections", "random-1x")) and record["steps"] == 20
        assert len(record["attempts"]) == 1
    sel = pq.read_table(os.path.join(result.sweep_uri, "selections", "random-1x", "selection.parquet")).to_pandas()
    assert sel["chosen"].sum() == 64  # 1x the 64 real training rows


def test_trial_table_in_report_format(sweep):
    from synthfar_ray.report import load_tune

    cfg, result, _ = sweep
    assert result.table_path == os.path.join(result.sweep_uri, RESULTS_CSV)
    df, metric, mode = load_tune(result.table_path, None, None, None)
    assert metric == "val_score" and mode == "max" and len(df) == 2
    assert {"trial_id", "mix_ratio", "sampler", "top_k", "lr", "val_score", "status"} <= set(df.columns)
    assert df.iloc[0]["trial_id"] == result.best_trial_id and df.iloc[0]["lr"] == 0.03
    assert set(df["sampler"]) == {"random"} and set(df["top_k"]) == {1.0} and set(df["mix_ratio"]) == {0.5}
    md = open(os.path.join(result.sweep_uri, RESULTS_MD)).read()
    assert "| trial_id | mix_ratio | effective_mix_ratio | sampler | top_k | lr | val_score | status | error |" in md
    # the share of synthetic rows the trials' batches really held (seeded binomial counts around 0.5)
    assert all(abs(t["effective_mix_ratio"] - 0.5) < 0.2 for t in result.trials), result.trials
    assert md.index(result.best_trial_id) < md.index([t for t in result.trials if t["lr"] == 1e-6][0]["trial_id"])


def test_rerun_resumes_without_redoing_trials(sweep):
    cfg, first, _ = sweep
    records = {t["trial_id"]: open(os.path.join(first.sweep_uri, "runs", t["trial_id"], TRIAL_FILE)).read()
               for t in first.trials}
    again = run_tune(cfg)
    assert again.restored and not first.restored
    assert {t["trial_id"]: t["val_score"] for t in again.trials} == {t["trial_id"]: t["val_score"] for t in first.trials}
    assert again.best_trial_id == first.best_trial_id
    # trial.json lists every start of a trial's training (time, pid): unchanged = not trained again
    for trial_id, text in records.items():
        assert open(os.path.join(first.sweep_uri, "runs", trial_id, TRIAL_FILE)).read() == text
    assert again.seconds < 30


def test_tensorboard_events_hold_training_scalars(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result, _ = sweep
    files = glob.glob(os.path.join(result.sweep_uri, "**", "events.out.tfevents.*"), recursive=True)
    tags: dict[str, set[str]] = {}
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags[f] = set(acc.Tags()["scalars"])
    train_logs = [f for f, t in tags.items() if "train/loss" in t]
    assert len(train_logs) == 2, tags  # one training loop per trial
    acc = EventAccumulator(train_logs[0])
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(steps) and steps[-1] == 20
    assert any("val/gender_acc" in t for t in tags.values())
    # Tune's own per-trial logs carry the sweep metric
    assert sum("ray/tune/val_score" in t for t in tags.values()) == 2, tags


def test_ddp_trials_report_through_their_trainer(ray_cluster, tmp_path):
    """A trial of two DDP workers runs a TorchTrainer (a worker group beside the trial's function),
    whose validation reports reach Tune through the Train callback: the trial finishes with its
    metric, after the steps it was given."""
    root = str(tmp_path)
    write_dataset(os.path.join(root, "real"), [coded_rows(64, 1, 0, "train"), coded_rows(32, 2, 1000, "val")])
    write_dataset(os.path.join(root, "syn"), [coded_rows(64, 3, 0, "train")])
    cfg = sweep_config(root, space={"sampler": "random", "k_multiple": 1.0, "mix_ratio": 0.5, "lr": 0.03})
    cfg = cfg.model_copy(update={"train": {**cfg.train, "num_workers": 2, "steps": 10, "val_every": 5}})
    actors = train_worker_actors()
    result = run_tune(cfg)
    assert train_worker_actors() - actors == 2
    (trial,) = result.trials
    assert trial["status"] == "TERMINATED" and np.isfinite(trial["val_score"])
    record = json.load(open(os.path.join(result.sweep_uri, "runs", trial["trial_id"], TRIAL_FILE)))
    assert record["steps"] == 10 and 0 <= record["metrics"]["val_gender_acc"] <= 1


def test_failed_trial_fails_the_sweep_and_a_rerun_retries_only_it(ray_cluster, tmp_path):
    """A trial that errors makes run_tune raise (one line naming the trial and its error, after the
    table is written, the failure listed there, never ranked). Fixing the cause and re-running the
    same sweep retries the failed trial and keeps the finished one."""
    from synthfar_ray.errors import StageFailed
    from synthfar_ray.report import build_report

    root = str(tmp_path)
    # The real train rows hold bytes that are not an image: the 50 % mix trial reads them and
    # fails; the 100 % synthetic trial never reads real rows (it validates on synthetic val rows).
    broken = coded_rows(64, 1, 0, "train")
    broken["image"] = [b"not a jpeg"] * 64
    write_dataset(os.path.join(root, "real"), [broken])
    write_dataset(os.path.join(root, "syn"), [coded_rows(64, 3, 0, "train"), coded_rows(32, 4, 1000, "val")])
    cfg = sweep_config(root, space={"sampler": "none", "k_multiple": 1.0, "mix_ratio": {"grid": [0.5, 1.0]},
                                    "lr": 0.03},
                       trial_max_failures=0)
    cfg = cfg.model_copy(update={"train": {**cfg.train, "val_source": "synthetic", "failure_max": 0}})
    with pytest.raises(StageFailed, match=r"1 of 2 trials failed") as err:
        run_tune(cfg)
    assert "\n" not in str(err.value) and "re-run" in str(err.value)
    table = pd.read_csv(os.path.join(cfg.sweep_uri, RESULTS_CSV))
    failed = table[table["status"] == "ERROR"]
    assert list(failed["mix_ratio"]) == [0.5] and failed["val_score"].isna().all()
    assert failed["error"].iloc[0] in str(err.value)
    assert table.iloc[0]["status"] == "TERMINATED" and table.iloc[0]["mix_ratio"] == 1.0  # ranked first: it has a number

    # The report ranks only the trial with a number, and lists the failed one as failed.
    rep = build_report(root, out_dir=os.path.join(root, "report"))
    md = open(rep.markdown_path).read()
    assert "1 of 2 trials FAILED" in md and failed["trial_id"].iloc[0] in md
    ok_id = table.iloc[0]["trial_id"]
    ok_record = open(os.path.join(cfg.sweep_uri, "runs", ok_id, TRIAL_FILE)).read()

    write_dataset(os.path.join(root, "real"), [coded_rows(64, 1, 0, "train")])  # the user fixes the data
    again = run_tune(cfg)
    assert again.restored and {t["status"] for t in again.trials} == {"TERMINATED"}
    assert all(np.isfinite(t["val_score"]) for t in again.trials)
    assert open(os.path.join(cfg.sweep_uri, "runs", ok_id, TRIAL_FILE)).read() == ok_record  # not run again


def test_trials_are_sized_to_leave_room_for_their_data_tasks(ray_cluster, tmp_path):
    """Concurrency counts every CPU a trial launches: its Train worker(s) and one task per Ray Data
    pipeline, plus the function of a multi-worker trial (a one-worker trial IS its worker: it
    reserves the worker's CPUs itself); a trial that cannot fit at all is refused with the numbers."""
    from synthfar_ray.errors import UserError
    from synthfar_ray.tune import _resources, data_pipelines

    cfg = sweep_config(str(tmp_path), trial_cpus=0.25, cpu_worker_cpus=0.5, cpu_data_cpus=0.25)
    assert data_pipelines(cfg) == 3  # synthetic + real + val
    overrides, concurrent, trial = _resources(cfg)  # the test cluster has 4 CPUs; a trial takes 0.5 + 3 x 0.25
    assert concurrent == 3 and trial == {"cpu": 0.5, "gpu": 0} and overrides["data_cpus"] == 0.25
    assert overrides["use_gpu"] is False
    ddp = cfg.model_copy(update={"train": {**cfg.train, "num_workers": 2}})
    overrides, concurrent, trial = _resources(ddp)  # 0.25 (function) + 2 x 0.5 + 3 x 0.25
    assert concurrent == 2 and trial == {"cpu": 0.25}
    big = cfg.model_copy(update={"train": {**cfg.train, "data_cpus": 2.0}})
    with pytest.raises(UserError, match=r"needs 6.5 CPUs .* cluster has 4"):
        _resources(big)


def test_config_validation(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ValueError, match="continuous"):
        sweep_config(root, space={"k_multiple": {"uniform": [1, 5]}})
    with pytest.raises(ValueError, match="set by the sweep"):
        sweep_config(root, train={"name": "x", "synthetic": "s", "real": "r"})
    with pytest.raises(ValueError, match="exactly one"):
        sweep_config(root, space={"lr": {"choice": [1e-3], "loguniform": [1e-4, 1e-3]}})
    with pytest.raises(ValueError, match="not a valid TrainConfig"):
        sweep_config(root, train={"synthetic": "s", "real": "r", "stepz": 3})
    with pytest.raises(ValueError, match="pretrain_steps"):
        sweep_config(root, plan="pretrain_finetune")
    for name in ("demo", "paper_sweep"):
        cfg = load_config(TuneConfig, os.path.join(os.path.dirname(__file__), "..", "configs", "tune", f"{name}.yaml"))
        assert cfg.metric == "val_score"
    with pytest.raises(ConfigError, match="sampler"):
        load_config(TuneConfig, os.path.join(os.path.dirname(__file__), "..", "configs", "tune", "demo.yaml"),
                    ["space.sampler=best"])


def test_param_space_and_searcher(tmp_path, caplog):
    cfg = sweep_config(str(tmp_path), space={"sampler": {"choice": ["none", "cl-sam"]}, "k_multiple": {"grid": [1, 2]},
                                             "mix_ratio": {"uniform": [0.1, 0.9]}, "lr": {"loguniform": [1e-4, 1e-2]}})
    space = _param_space(cfg)
    assert set(space) == {"sampler", "k_multiple", "lr", "mix_ratio"}
    assert space["k_multiple"] == {"grid_search": [1, 2]}
    assert space["lr"].lower == 1e-4 and space["lr"].upper == 1e-2
    with caplog.at_level(logging.INFO, logger="synthfar_ray.tune"):
        alg, limit = _searcher(cfg, 2)
    assert type(alg).__name__ == "BasicVariantGenerator" and limit is None  # grid -> random/grid search
    assert "random/grid" in caplog.text
    pf = sweep_config(str(tmp_path), plan="pretrain_finetune", space={"pretrain_steps": {"choice": [5, 10]},
                                                                      "sampler": "none", "lr": 1e-3})
    assert set(_param_space(pf)) == {"sampler", "k_multiple", "lr", "pretrain_steps"}


def test_space_can_search_the_adaptation_method_and_weight(tmp_path):
    """adapt_method / adapt_weight reach each trial's train.adapt (other adapt settings kept)."""
    from synthfar_ray.tune import trial_train_config

    cfg = sweep_config(str(tmp_path), space={"adapt_method": {"grid": ["none", "daln"]}, "adapt_weight": 0.3,
                                             "sampler": "none", "lr": 1e-3, "mix_ratio": 0.5},
                       train={"synthetic": "s", "real": "r", "adapt": {"warmup_steps": 7}})
    space = _param_space(cfg)
    assert space["adapt_method"] == {"grid_search": ["none", "daln"]} and space["adapt_weight"] == 0.3
    params = {"sampler": "none", "k_multiple": 1.0, "lr": 1e-3, "mix_ratio": 0.5, "adapt_method": "daln",
              "adapt_weight": 0.3}
    adapt = trial_train_config(cfg, params, "t", str(tmp_path / "runs"), None).adapt
    assert (adapt.method, adapt.weight, adapt.warmup_steps) == ("daln", 0.3, 7)
    with pytest.raises(ValueError, match="adapt_method"):
        sweep_config(str(tmp_path), space={"adapt_method": {"choice": ["coral"]}})


def test_scheduler_asha_only_when_it_can_stop(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = sweep_config(str(tmp_path))  # val_every 10 -> grace 2 validations = 20 steps
    assert isinstance(_scheduler(cfg, 20), FIFOScheduler)
    asha = _scheduler(cfg, 90)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step" and asha._max_t == 90
    assert isinstance(_scheduler(cfg.model_copy(update={"asha": False}), 90), FIFOScheduler)


def test_sweep_without_val_rows_is_refused_before_any_trial(ray_cluster, tmp_path):
    """val_score comes from validation: a val source without split == 'val' rows would end every trial
    without the metric, and Tune would fail the sweep at its first result with a traceback. It is
    refused first, naming the dataset; no trial runs."""
    root = str(tmp_path)
    write_dataset(os.path.join(root, "real"), [coded_rows(64, 1, 0, "train")])
    write_dataset(os.path.join(root, "syn"), [coded_rows(64, 3, 0, "train")])
    cfg = sweep_config(root)
    with pytest.raises(ConfigError, match=r"metric val_score comes from validation, but the val source .*real "
                                          r"\(train.real\) has no rows with split == 'val'"):
        run_tune(cfg)
    assert not glob.glob(os.path.join(root, "tune", "sweep", "runs", "*"))
