"""The whole chain through `synthfar pipeline`, with every URI on s3:// (moto's real S3 server).

Kept small (tiny model, few images and steps, no Tune: tests/test_tune.py covers the sweep) so it
stays a CI test, but every stage runs for real: generate -> stand-in in UTKFace layout -> ingest ->
sample -> train (pretrain on the selection, finetune on real) -> evaluate -> report.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.pipeline import PipelineConfig, plan_stages, run_pipeline

SMALL = {
    "generate": {"num_images": 24, "shard_size": 12, "val_fraction": 0.2, "model": {"preset": "tiny-random"},
                 "sampler": {"width": 32, "height": 32, "steps": 3},
                 "compute": {"num_actors": 1, "cpus_per_actor": 0.5, "batch_size": 12}},
    "standin": {"num_images": 40, "seed": 1},
    "real": {"dataset": "utkface"},
    "sample": {"method": "random", "k": 12, "class_key": ["gender"]},
    "train": {"steps": 6, "batch_size": 8, "lr": 0.003, "warmup_steps": 0, "amp": "none", "model": {"backbone": "tiny"},
              "image_size": 32, "val_every": 3, "log_every": 3, "num_workers": 1, "use_gpu": False,
              "cpus_per_worker": 0.5, "data_cpus": 0.5, "shuffle_buffer": 0},
    "runs": {"synth_to_real": {"plan": "pretrain_finetune", "pretrain_steps": 3, "finetune_steps": 3,
                               "use_selection": True}},
    "tune": None,
    "evaluate_on": ["utkface:test"],
}


def test_pipeline_end_to_end_on_s3(ray_cluster, s3_bucket):
    bucket, opts = s3_bucket
    run_dir = storage.join(bucket, "runs", "e2e")
    cfg = PipelineConfig.model_validate({**SMALL, "run_dir": run_dir, "storage": opts.model_dump()})
    result = run_pipeline(cfg)

    # Every stage wrote where the pipeline says, on S3.
    for part in ("synthetic/_manifest.json", "real/_manifest.json", "eval/synth_to_real/metrics.json",
                 "report/report.md", "report/report.html"):
        assert storage.exists(storage.join(run_dir, part), opts), part
    gen_manifest = json.loads(storage.read_bytes(storage.join(run_dir, "synthetic", "_manifest.json"), opts))
    assert gen_manifest["status"] == "complete" and gen_manifest["num_images"] == 24
    real_manifest = json.loads(storage.read_bytes(storage.join(run_dir, "real", "_manifest.json"), opts))
    assert sum(real_manifest["counts"].values()) == 40  # the whole stand-in was ingested

    metrics = json.loads(storage.read_bytes(storage.join(run_dir, "eval", "synth_to_real", "metrics.json"), opts))
    test = metrics["datasets"]["utkface:test"]
    assert test["n"] == real_manifest["counts"]["test"] and 0.0 <= test["gender_acc"] <= 1.0
    report = storage.read_bytes(storage.join(run_dir, "report", "report.md"), opts).decode()
    assert "synth_to_real" in report and f"{100 * test['gender_acc']:.2f}" in report
    assert set(result.stage_seconds) >= {"generate", "ingest", "sample", "train:synth_to_real",
                                         "evaluate:synth_to_real", "report"}


def test_pipeline_sections_are_validated_before_work(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("run_dir: %s\ngenerate: {num_images: 0}\nreal: {dataset: utkface, src: x}\n" % tmp_path)
    cfg = load_config(PipelineConfig, str(bad))
    with pytest.raises(ConfigError, match=r"section generate[\s\S]*num_images"):
        plan_stages(cfg, str(bad))
    assert not (tmp_path / "synthetic").exists()  # nothing started
    missing = PipelineConfig.model_validate({"run_dir": str(tmp_path), "generate": {"num_images": 4}})
    with pytest.raises(ConfigError, match="real"):
        plan_stages(missing)


def test_demo_config_validates():
    cfg = load_config(PipelineConfig, "configs/pipeline/demo.yaml")
    plan = plan_stages(cfg, "configs/pipeline/demo.yaml")
    assert plan.standin is not None and plan.tune is not None and set(plan.runs) == {
        "synthetic_only", "real_only", "synthetic_to_real"}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLER = {  # sizes only: the shipped configs' relative paths stay as they are
    "pipeline": ["generate.num_images=32", "generate.shard_size=16", "generate.sampler.steps=3", "standin.num_images=64",
                 "train.steps=4", "train.val_every=2", "train.log_every=2", "sample.scorer_train.steps=5",
                 "runs.synthetic_to_real.pretrain_steps=2", "runs.synthetic_to_real.finetune_steps=2",
                 "tune.train.steps=4", "tune.train.val_every=2"],
    # 4 steps < the config's ASHA grace (20): no trial is stopped early, each must finish its budget.
    "tune": ["num_samples=2", "train.steps=4", "train.val_every=2", "train.log_every=2",
             "sampling.scorer_train.steps=5", "sampling.scorer_train.cross_fit_folds=2"],
}


def _trials(csv: str) -> pd.DataFrame:
    table = pd.read_csv(csv)
    assert len(table) and set(table["status"]) == {"TERMINATED"}, table[["trial_id", "status", "error"]]
    assert table["val_score"].notna().all() and table["val_score"].between(0, 1).all()
    return table


def test_shipped_demo_configs_run_from_another_directory(ray_cluster, tmp_path, monkeypatch):
    """`make demo`'s pipeline config and the README's demo sweep, run from a directory that is not the
    repo root with their relative paths as shipped: every stage completes, every Tune trial is
    TERMINATED with a finite score, and every output lands under that directory (not in a trial's
    working directory)."""
    from synthfar_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", os.path.join(ROOT, "configs", "pipeline", "demo.yaml"), *SMALLER["pipeline"]]) == 0
    run_dir = tmp_path / "runs" / "demo"
    pipeline_trials = _trials(str(run_dir / "tune" / "tune_results.csv"))
    assert set(pipeline_trials["sampler"]) == {"random", "cl-sam"}
    for name in ("synthetic_only", "real_only", "synthetic_to_real"):
        assert (run_dir / "eval" / name / "metrics.json").exists(), name
    report = (run_dir / "report" / "report.md").read_text()
    assert "FAILED" not in report and pipeline_trials["trial_id"].iloc[0] in report

    assert main(["tune", os.path.join(ROOT, "configs", "tune", "demo.yaml"), *SMALLER["tune"]]) == 0
    sweep = _trials(str(run_dir / "tune" / "demo-sweep" / "tune_results.csv"))
    assert len(sweep) == 2
    for trial_id in sweep["trial_id"]:  # the trials' training runs live under the sweep folder
        assert (run_dir / "tune" / "demo-sweep" / "runs" / trial_id / "result.json").exists(), trial_id


def test_failed_stage_stops_the_pipeline_with_one_line(ray_cluster, tmp_path, capsys, caplog):
    """A stage that fails (here: ingest of a folder that is not a UTKFace download) stops the pipeline:
    no later stage runs and the command exits non-zero with one line naming the stage."""
    from synthfar_ray.cli import main

    src = tmp_path / "not_utkface"
    src.mkdir()
    (src / "holiday.jpg").write_bytes(b"not a face")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nstages: [ingest, train, report]\n"
                   "generate: {num_images: 4, model: {preset: tiny-random}}\n"
                   f"real: {{dataset: utkface, src: {src}}}\nsample: null\n"
                   "runs: {real_only: {plan: real, model: {backbone: tiny}, steps: 2}}\n")
    assert main(["pipeline", str(cfg)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "stage ingest failed" in err[0] and "bad item" in err[0], err
    assert "holiday.jpg" in caplog.text  # the log holds the whole list of bad files
    assert not (tmp_path / "run" / "train").exists() and not (tmp_path / "run" / "report").exists()
