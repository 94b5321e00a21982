"""The whole chain: generate -> ingest -> sample -> train runs -> tune -> evaluate -> report.

`synthfar pipeline CONFIG [key=value ...]` (and `workflows/pipeline.py`) runs it for any config;
`make demo` runs `configs/pipeline/demo.yaml`. Each section of the config is the config of one
stage minus the paths, which the pipeline derives from `run_dir`:

    run_dir/synthetic            generated set             run_dir/real                ingested real set
    run_dir/standin_utkface      demo stand-in (files)     run_dir/synthetic/_selections/...  selection
    run_dir/train/<run>          checkpoints, TensorBoard  run_dir/eval/<run>/metrics.json
    run_dir/tune                 sweep (tune_results.csv)                     run_dir/report/report.{md,html}

Every section is validated before any work starts. Stages that finished on an earlier run are
resumed or skipped (generation and training resume by design; ingest/sample reuse their outputs).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from pydantic import Field

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, StageConfig, StrictModel, load_config, validate
from synthfar_ray.errors import StageFailed, UserError, first_line
from synthfar_ray.paths import InputPath, OutputPath

logger = logging.getLogger(__name__)

STAGES = ("generate", "ingest", "sample", "train", "tune", "evaluate", "report")


class StandInConfig(StrictModel):
    """Demo only: a second, differently seeded synthetic set written in UTKFace's file layout and
    ingested with the real ingest code, as a clearly labelled stand-in for a real dataset."""

    num_images: int = Field(96, ge=8)
    seed: int = 1


class RealConfig(StrictModel):
    dataset: str = Field("utkface", pattern="^(utkface|fairface)$")
    src: InputPath | None = Field(None, description="the dataset as downloaded (folder or archive); "
                                                    "ignored when `standin` is set")
    uri: InputPath | None = Field(None, description="an already ingested real set; skips ingest")
    seed: int = 42
    skip_bad: bool = False


class PipelineConfig(StageConfig):
    run_dir: OutputPath = Field(description="folder URI for every output of the pipeline")
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    generate: dict[str, Any] = Field(default_factory=dict, description="GenerateConfig minus output")
    standin: StandInConfig | None = None
    real: RealConfig = RealConfig()
    sample: dict[str, Any] | None = Field(default_factory=dict, description="SampleConfig minus synthetic/real")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig shared by every run")
    runs: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"synthetic_only": {"plan": "synthetic"}, "real_only": {"plan": "real"},
                                 "synthetic_to_real": {"plan": "pretrain_finetune", "use_selection": True}},
        description="named training runs: overrides of `train`; use_selection trains on the selection")
    tune: dict[str, Any] | None = Field(None, description="TuneConfig minus paths; null skips the sweep")
    evaluate_on: list[str] = Field(default_factory=lambda: ["utkface:test"])


@dataclass
class StagePlan:
    """The validated config of every stage, paths filled in."""

    generate: Any
    standin: Any | None
    real_uri: str
    real_src: str | None
    sample: Any | None
    runs: dict[str, Any]
    tune: Any | None
    selection_runs: set[str] = field(default_factory=set)


def _section(model: type, data: dict[str, Any], name: str, source: str):
    return validate(model, data, f"{source} (section {name})")


def plan_stages(cfg: PipelineConfig, source: str = "<pipeline>") -> StagePlan:
    """Validate every section against its stage's config model, before any work."""
    from synthfar_ray.generate import GenerateConfig
    from synthfar_ray.sampling import SampleConfig
    from synthfar_ray.train import TrainConfig

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"{source}: stages: unknown {unknown}; choose from {list(STAGES)}")
    run_dir, st = cfg.run_dir, cfg.storage.model_dump()
    synthetic = storage.join(run_dir, "synthetic")
    gen = _section(GenerateConfig, {**cfg.generate, "output": synthetic, "storage": st}, "generate", source)
    standin = None
    if cfg.standin is not None:
        standin = gen.model_copy(update={"output": storage.join(run_dir, "standin_parquet"),
                                         "num_images": cfg.standin.num_images, "seed": cfg.standin.seed,
                                         "val_fraction": 0.0})
    real_uri = cfg.real.uri or storage.join(run_dir, "real")
    real_src = None if cfg.real.uri else (os.path.join(_local(run_dir), "standin_utkface") if standin else cfg.real.src)
    if "ingest" in cfg.stages and not cfg.real.uri and real_src is None:
        raise ConfigError(f"{source}: real: give `src` (the downloaded dataset), `uri` (an ingested set) or a `standin`")
    sample = None
    if cfg.sample is not None:
        sample = _section(SampleConfig, {**cfg.sample, "synthetic": synthetic, "real": real_uri, "storage": st},
                          "sample", source)
    runs, selection_runs = {}, set()
    for name, over in cfg.runs.items():
        over = dict(over)
        if over.pop("use_selection", False):
            if sample is None:
                raise ConfigError(f"{source}: runs.{name}: use_selection needs a `sample` section")
            selection_runs.add(name)
        data = {**cfg.train, **over, "name": name, "storage_path": storage.join(run_dir, "train"),
                "synthetic": synthetic, "real": real_uri, "storage": st}
        runs[name] = _section(TrainConfig, data, f"runs.{name}", source)
    tune = None
    if cfg.tune is not None and "tune" in cfg.stages:
        from synthfar_ray.tune import TuneConfig

        tune = _section(TuneConfig, tune_section(cfg, synthetic, real_uri), "tune", source)
    return StagePlan(gen, standin, real_uri, real_src, sample, runs, tune, selection_runs)


def tune_section(cfg: PipelineConfig, synthetic: str, real_uri: str) -> dict[str, Any]:
    """The tune section with the pipeline's paths, shared training settings and sampler settings
    filled in (same sampler settings as the sample stage, so the sweep reuses its cached scores)."""
    from synthfar_ray.tune import SamplerSettings

    data = dict(cfg.tune or {})
    data["train"] = {**cfg.train, **data.get("train", {}), "synthetic": synthetic, "real": real_uri}
    data.setdefault("name", "tune")
    data.setdefault("storage_path", cfg.run_dir)
    shared = {k: v for k, v in (cfg.sample or {}).items() if k in SamplerSettings.model_fields}
    data["sampling"] = {**shared, **data.get("sampling", {})}
    data["storage"] = cfg.storage.model_dump()
    return data


def _local(uri: str) -> str:
    if storage.is_s3(uri):
        return os.path.join(tempfile.gettempdir(), "synthfar-pipeline", uri.replace("s3://", "").replace("/", "_"))
    return storage.resolve(uri)[1]


def write_standin_utkface(parquet_uri: str, folder: str, opts: storage.StorageOptions) -> int:
    """Write a generated set as UTKFace-style files `age_gender_race_date.jpg.chip.jpg` (stand-in only)."""
    from synthfar_ray.ingest import utkface_file_name

    os.makedirs(folder, exist_ok=True)
    n = 0
    for name in storage.list_files(parquet_uri, opts, suffix=".parquet"):
        fs, path = storage.resolve(storage.join(parquet_uri, name), opts)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["id", "image", "age", "gender", "ethnicity"])
        for row in table.to_pylist():
            stamp = f"2026{row['id']:013d}"
            target = os.path.join(folder, utkface_file_name(int(row["age"]), row["gender"], row["ethnicity"], stamp))
            with open(target, "wb") as out:
                out.write(row["image"])
            n += 1
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write("STAND-IN, NOT REAL FACES: a differently seeded synthetic set written in UTKFace's file layout\n"
                "by `synthfar pipeline` so the demo can exercise the real ingest and fine-tuning path offline.\n")
    return n


@dataclass
class PipelineResult:
    run_dir: str
    report: str | None
    seconds: float
    stage_seconds: dict[str, float]
    metrics: dict[str, Any]


def run_pipeline(cfg: PipelineConfig, source: str = "<pipeline>") -> PipelineResult:
    """Run the stages in order; the first that fails stops the pipeline with StageFailed naming it."""
    from synthfar_ray.raycluster import ensure_ray

    plan = plan_stages(cfg, source)
    ensure_ray()
    t_start, times, metrics = time.time(), {}, {}
    opts = cfg.storage
    logger.info("pipeline %s -> %s (stages: %s)", source, cfg.run_dir, ", ".join(cfg.stages))

    def timed(name: str, fn, *args, **kwargs):
        logger.info("=== %s ===", name)
        t0 = time.time()
        try:
            out = fn(*args, **kwargs)
        except (UserError, FileNotFoundError, FileExistsError) as e:
            logger.error("stage %s failed:\n%s", name, e)  # the whole message (e.g. every bad file)
            raise StageFailed(f"pipeline stopped: stage {name} failed: {first_line(e)}") from e
        except Exception:
            logger.error("pipeline stopped: stage %s crashed (traceback below)", name)
            raise
        times[name] = round(time.time() - t0, 2)
        logger.info("=== %s done in %.1f s ===", name, times[name])
        return out

    if "generate" in cfg.stages:
        from synthfar_ray.generate import run_generate

        timed("generate", run_generate, plan.generate)
    if "ingest" in cfg.stages and cfg.real.uri is None:
        if storage.exists(storage.join(plan.real_uri, "_manifest.json"), opts):
            logger.info("real set already ingested at %s", plan.real_uri)
        else:
            if plan.standin is not None:
                from synthfar_ray.generate import run_generate

                timed("standin-generate", run_generate, plan.standin)
                n = timed("standin-files", write_standin_utkface, plan.standin.output, plan.real_src, opts)
                logger.info("wrote %d stand-in files in UTKFace layout to %s (NOT real faces)", n, plan.real_src)
            from synthfar_ray.ingest import ingest_fairface, ingest_utkface

            ingest = ingest_utkface if cfg.real.dataset == "utkface" else ingest_fairface
            timed("ingest", ingest, plan.real_src, plan.real_uri, seed=cfg.real.seed,
                  skip_bad=cfg.real.skip_bad, storage=opts)
    selection = None
    if plan.sample is not None and "sample" in cfg.stages:
        from synthfar_ray.sampling import run_sample

        selection = timed("sample", run_sample, plan.sample).output
    checkpoints: dict[str, str] = {}
    if "train" in cfg.stages:
        from synthfar_ray.train import run_train

        for name, tcfg in plan.runs.items():
            if name in plan.selection_runs and selection is not None:
                tcfg = tcfg.model_copy(update={"synthetic_selection": selection})
            result = timed(f"train:{name}", run_train, tcfg)
            checkpoints[name] = result.checkpoint
    if plan.tune is not None:
        from synthfar_ray.tune import run_tune

        tune_result = timed("tune", run_tune, plan.tune)
        metrics["tune"] = {"best_params": tune_result.best_params, "best_metric": tune_result.best_metric}
    evaluations: dict[str, str] = {}
    if "evaluate" in cfg.stages and checkpoints:
        from synthfar_ray.evaluate import EvaluateConfig, run_evaluate

        dataset = cfg.real.dataset
        for name, ckpt in checkpoints.items():
            evaluations[name] = storage.join(cfg.run_dir, "eval", name)
            ecfg = EvaluateConfig(checkpoint=ckpt, on=cfg.evaluate_on, data={dataset: plan.real_uri},
                                  out=evaluations[name], storage=opts)
            metrics[name] = timed(f"evaluate:{name}", run_evaluate, ecfg)
    report_path = None
    if "report" in cfg.stages:
        from synthfar_ray.report import build_report

        real_name = f"{cfg.real.dataset} (stand-in)" if plan.standin else cfg.real.dataset
        rep = timed("report", build_report, cfg.run_dir, runs=evaluations or None,
                    datasets={"synthetic": plan.generate.output, real_name: plan.real_uri}, storage=opts)
        report_path = rep.html_path
    seconds = time.time() - t_start
    logger.info("pipeline done in %.1f s: %s", seconds, ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return PipelineResult(cfg.run_dir, report_path, seconds, times, metrics)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    result = run_pipeline(cfg, args.config)
    print(f"pipeline finished in {result.seconds:.0f} s; outputs in {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args

    p = sub.add_parser("pipeline", help="run the whole chain (generate ... report) for one config")
    add_config_args(p)
    p.set_defaults(func=_cli)
