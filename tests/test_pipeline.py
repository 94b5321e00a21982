"""The whole chain through `synthfar pipeline`, with every URI on s3:// (moto's real S3 server).

Kept small (tiny model, few images and steps, no Tune: tests/test_tune.py covers the sweep) so it
stays a CI test, but every stage runs for real: generate -> stand-in in UTKFace layout -> ingest ->
sample -> train (two runs at once: pretrain on the selection + finetune, and real-only) -> evaluate ->
report. `make demo`'s config itself runs in tests/test_groundtruth.py.
"""

from __future__ import annotations

import json
import os

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
              "cpus_per_worker": 0.5, "data_cpus": 0.25, "shuffle_buffer": 0},
    "runs": {"synth_to_real": {"plan": "pretrain_finetune", "pretrain_steps": 3, "finetune_steps": 3,
                               "use_selection": True},
             "real_only": {"plan": "real"}},
    "parallel_runs": 2,
    "tune": None,
    "evaluate_on": ["utkface:test"],
}


def test_pipeline_end_to_end_on_s3(ray_cluster, s3_bucket):
    bucket, opts = s3_bucket
    run_dir = storage.join(bucket, "runs", "e2e")
    cfg = PipelineConfig.model_validate({**SMALL, "run_dir": run_dir, "storage": opts.model_dump()})
    result = run_pipeline(cfg)

    # Every stage wrote where the pipeline says, on S3.
    for part in ("synthetic/_manifest.json", "real_utkface/_manifest.json", "eval/synth_to_real/metrics.json",
                 "eval/real_only/metrics.json", "report/report.md", "report/report.html"):
        assert storage.exists(storage.join(run_dir, part), opts), part
    gen_manifest = json.loads(storage.read_bytes(storage.join(run_dir, "synthetic", "_manifest.json"), opts))
    assert gen_manifest["status"] == "complete" and gen_manifest["num_images"] == 24
    real_manifest = json.loads(storage.read_bytes(storage.join(run_dir, "real_utkface", "_manifest.json"), opts))
    assert sum(real_manifest["counts"].values()) == 40  # the whole stand-in was ingested

    metrics = json.loads(storage.read_bytes(storage.join(run_dir, "eval", "synth_to_real", "metrics.json"), opts))
    test = metrics["datasets"]["utkface:test"]
    assert test["n"] == real_manifest["counts"]["test"] and 0.0 <= test["gender_acc"] <= 1.0
    report = storage.read_bytes(storage.join(run_dir, "report", "report.md"), opts).decode()
    assert "synth_to_real" in report and f"{100 * test['gender_acc']:.2f}" in report
    assert set(result.stage_seconds) >= {"generate", "ingest:utkface", "sample", "train:synth_to_real",
                                         "train:real_only", "evaluate", "report"}
    assert result.stage_seconds["train:real_only"] > 0  # each run's own time, though the two overlapped


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
    assert plan.standin is not None and plan.tune is not None and plan.preview is not None
    assert set(plan.real_sets) == {"utkface", "fairface"} and plan.generate.generator == "procedural"
    assert plan.selection_runs == {"mix_25": "cl-sam", "cl_sam_selected": "cl-sam", "random_selected": "random",
                                   "rl_selected": "rl", "quality_selected": "quality"}
    # races7 is off in the demo (its numbers stay), and standin.races7 reaches only the stand-ins' render.
    assert not plan.standin.render.races7 and not plan.generate.render.races7
    cfg7 = cfg.model_copy(update={"standin": cfg.standin.model_copy(update={"races7": True})})
    plan7 = plan_stages(cfg7, "configs/pipeline/demo.yaml")
    assert plan7.standin.render.races7 and not plan7.generate.render.races7


def test_adaptation_config_validates_and_its_table_reaches_the_report(tmp_path):
    """configs/pipeline/adaptation.yaml plans every run it lists with the adaptation asked for; the
    table the pipeline writes (adaptation.json) names how each run trained and reaches the report,
    a missing number shown as n/a; evaluate_on refuses a dataset the pipeline does not have."""
    from synthfar_ray.pipeline import adaptation_table, training_label
    from synthfar_ray.report import render_markdown
    from synthfar_ray.report_groundtruth import ADAPTATION, groundtruth_blocks

    cfg = load_config(PipelineConfig, "configs/pipeline/adaptation.yaml")
    plan = plan_stages(cfg, "configs/pipeline/adaptation.yaml")
    labels = {name: training_label(t) for name, t in plan.runs.items()}
    assert labels == {"synthetic_only": "synthetic", "dann": "synthetic + dann (weight 1)",
                      "daln": "synthetic + daln (weight 3)", "aux_bn": "synthetic + aux_bn",
                      "mix_labelled": "mix 0.5 synthetic", "real_only": "real"}
    assert plan.standin.render.photo.tint == (0.8, 0.62, 0.5) and plan.generate.render.label_noise == 0.0
    trained = {name: (t, None) for name, t in plan.runs.items()}
    evaluated = {name: {"datasets": {"synthetic:val": {"ethnicity_acc": 0.9, "gender_acc": 0.8, "age_bin_acc": 0.5},
                                     "utkface:test": {"ethnicity_acc": 0.3, "gender_acc": None}}}
                 for name in plan.runs}
    table = adaptation_table(trained, evaluated, ["synthetic:val", "utkface:test"])
    assert [r["run"] for r in table["rows"]] == list(plan.runs)
    plain = {name: (t, None) for name, t in plan.runs.items() if not t.adapt.enabled}
    assert adaptation_table(plain, evaluated, ["utkface:test"]) is None  # no run adapts: no table
    (tmp_path / ADAPTATION).write_text(json.dumps(table))
    text = render_markdown("r", groundtruth_blocks(str(tmp_path)))
    assert "Domain adaptation" in text and "synthetic + aux_bn" in text
    assert "0.900 / 0.800 / 0.500" in text and "0.300 / n/a / n/a" in text
    with pytest.raises(ConfigError, match=r"evaluate_on names \['celeba'\]"):
        plan_stages(cfg.model_copy(update={"evaluate_on": ["celeba:test"]}))


def test_a_failed_parallel_run_stops_the_stage_with_its_own_error(ray_cluster, tmp_path):
    """With parallel_runs, a run that fails (here: its real set was deleted after planning) stops the
    train stage with that run's own one-line error (not Ray's task wrapper), naming the run."""
    from synthfar_ray.errors import StageFailed

    run_dir = tmp_path / "run"
    data = {**SMALL, "run_dir": str(run_dir), "stages": ["train"], "sample": None,
            "real": {"dataset": "utkface", "uri": str(tmp_path / "no_such_real_set")},
            "runs": {"real_only": {"plan": "real"}, "real_again": {"plan": "real", "steps": 4}}}
    with pytest.raises(StageFailed, match=r"stage train:real_\w+ failed: real: .*no_such_real_set") as err:
        run_pipeline(PipelineConfig.model_validate(data))
    assert "RayTaskError" not in str(err.value) and "\n" not in str(err.value)


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
    assert len(err) == 1 and "stage ingest:utkface failed" in err[0] and "bad item" in err[0], err
    assert "holiday.jpg" in caplog.text  # the log holds the whole list of bad files
    assert not (tmp_path / "run" / "train").exists() and not (tmp_path / "run" / "report").exists()


def test_spearman_and_standin_label_strings():
    from synthfar_ray.pipeline import spearman
    from synthfar_ray.standin import fairface_labels, layout_of

    assert spearman([0.1, 0.2, 0.3], [1.0, 2.0, 5.0]) == pytest.approx(1.0)
    assert spearman([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([0.1, 0.2], [1.0, 2.0]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert [layout_of(i, ["utkface", "fairface"]) for i in range(4)] == ["utkface", "fairface"] * 2
    assert {layout_of(i, ["fairface"]) for i in range(5)} == {"fairface"}
    # FairFace's strings: "more than 70" for the last bin; white folds White + Middle Eastern.
    assert fairface_labels({"age": 75.0, "gender": 1, "ethnicity": 0}, salt=1) == ("more than 70", "Female",
                                                                                   "Middle Eastern")
    assert fairface_labels({"age": 4.0, "gender": 0, "ethnicity": 1}, salt=7) == ("3-9", "Male", "Black")
    # Rendered with races7: the race the face shows, whatever the salt; one that does not fold is refused.
    asian = {"age": 30.0, "gender": 0, "ethnicity": 2, "render_race7": 4, "id": 9}
    assert fairface_labels(asian, salt=0)[2] == fairface_labels(asian, salt=1)[2] == "Southeast Asian"
    with pytest.raises(ValueError, match="row id 9: render_race7 'Southeast Asian' does not fold into its ethnicity 'white'"):
        fairface_labels({**asian, "ethnicity": 0})


def test_parallel_runs_auto_counts_what_each_run_holds(tmp_path):
    """parallel_runs: auto fits the largest run's request into the cluster's CPUs and GPUs (node types
    included); fractional gpus_per_worker packs several runs on one GPU. No Ray: shapes are given."""
    from synthfar_ray.pipeline import runs_in_flight
    from synthfar_ray.raycluster import NodeShape

    def plan(**train):
        cfg = PipelineConfig.model_validate({**SMALL, "run_dir": str(tmp_path / "run"), "parallel_runs": "auto",
                                             "train": {**SMALL["train"], **train}})
        return plan_stages(cfg).runs

    cpu_box = [NodeShape("node 127.0.0.1", {"CPU": 2.0}, 1, True)]
    # real_only reads real + val: 0.5 + 2 x 0.25 = 1.0 CPU; synth_to_real's phases read one set each + val: 1.0.
    assert runs_in_flight("auto", plan(), cpu_box) == 2
    assert runs_in_flight("auto", plan(cpus_per_worker=1.5), cpu_box) == 1  # 2.0 CPUs each: one at a time
    assert runs_in_flight(3, plan(), cpu_box) == 3  # a number is taken as given
    gpus = [NodeShape("head", {"CPU": 0.0}, 1, True), NodeShape("gpu-train", {"CPU": 96.0, "GPU": 8.0}, 2, False)]
    many = {f"r{i}": t for i, t in enumerate(list(plan(use_gpu=True, gpus_per_worker=0.25).values()) * 20)}
    assert runs_in_flight("auto", many, gpus) == 40  # 4 per GPU on 16 GPUs would be 64, but there are 40 runs
    assert runs_in_flight("auto", {**many, **{f"s{i}": t for i, t in enumerate(many.values())}}, gpus) == 64
    whole = plan(use_gpu=True, gpus_per_worker=1.0)
    assert runs_in_flight("auto", {f"r{i}": t for i, t in enumerate(list(whole.values()) * 20)}, gpus) == 16
    with pytest.raises(ConfigError, match="parallel_runs must be >= 1 or auto"):
        load_config(PipelineConfig, None, [f"run_dir={tmp_path / 'run'}", "parallel_runs=0"])
