"""The whole chain: generate -> ingest -> sample -> quality -> train runs -> tune -> evaluate -> report.

`synthfar pipeline CONFIG [key=value ...]` (and `workflows/pipeline.py`) runs it for any config;
`make demo` runs `configs/pipeline/demo.yaml`. Each section of the config is the config of one
stage minus the paths, which the pipeline derives from `run_dir`:

    run_dir/synthetic            generated set             run_dir/real_<dataset>      ingested real set(s)
    run_dir/diffusion_preview    small diffusion set       run_dir/synthetic/_selections/...  selection
    run_dir/standin/<layout>     stand-in files            run_dir/standin_parquet     stand-in as rendered
    run_dir/train/<run>          checkpoints, TensorBoard  run_dir/eval/<run>/metrics.json
    run_dir/tune                 sweep (tune_results.csv)                     run_dir/report/report.{md,html}
    run_dir/synthetic/_quality/<key>  quality columns + summary (run_dir/quality.json points at it)

Every section is validated before any work starts. Stages that finished on an earlier run are
resumed or skipped (generation and training resume by design; ingest/sample reuse their outputs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, StageConfig, StrictModel, load_config, validate
from synthfar_ray.errors import StageFailed, UserError, first_line
from synthfar_ray.faces import PhotoStyle
from synthfar_ray.paths import InputPath, OutputPath
from synthfar_ray.report_groundtruth import (  # run_dir files the report reads
    ADAPTATION, ADAPTATION_METRICS, SELECTION_PRECISION, TUNE_AGREEMENT,
)

logger = logging.getLogger(__name__)

STAGES = ("generate", "ingest", "sample", "quality", "train", "tune", "evaluate", "report")


class StandInConfig(StrictModel):
    """Demo and tests only: procedural faces (photo style, exact labels) rendered with a different
    seed, split between UTKFace's and FairFace's file layouts (standin.py) and ingested with the
    real ingest code, as clearly labelled stand-ins for the real datasets."""

    num_images: int = Field(96, ge=8, description="rendered images, split between the layouts by id")
    seed: int = 1
    layouts: list[Literal["utkface", "fairface"]] = Field(default_factory=lambda: ["utkface"], min_length=1)
    style: Literal["synthetic", "photo"] = "photo"
    photo: PhotoStyle = PhotoStyle()
    races7: bool = Field(False, description="render FairFace's 7 races visibly (faces.RenderConfig.races7) and write "
                         "each face's rendered race in the FairFace layout; independent of generate.render.races7")
    landmarks: bool = Field(False, description="write a landmarks.csv per layout: the real set's sparse keypoints "
                            "(keypoints.REAL_KEYPOINT_NAMES, their own convention) that ingest reads into "
                            "`keypoints_real`")


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
    preview: dict[str, Any] | None = Field(None, description="GenerateConfig minus output: a small extra set "
                                           "(e.g. diffusion) shown in the report, not trained on")
    standin: StandInConfig | None = None
    real: RealConfig = RealConfig()
    sample: dict[str, Any] | None = Field(default_factory=dict, description="SampleConfig minus synthetic/real")
    quality: dict[str, Any] | None = Field(None, description="QualityConfig minus dataset/real (null: no quality "
                                           "stage); without a classifier it uses the one cl-sam trained, if any")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig shared by every run")
    runs: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"synthetic_only": {"plan": "synthetic"}, "real_only": {"plan": "real"},
                                 "synthetic_to_real": {"plan": "pretrain_finetune", "use_selection": True}},
        description="named training runs: overrides of `train`; use_selection trains on the selection")
    parallel_runs: int | Literal["auto"] = Field(
        1, description="training runs in flight at once, each a Ray task driving its own TorchTrainer with the "
        "resources its config asks for (fractional train.gpus_per_worker packs several on one GPU); auto: as many "
        "as the cluster (live nodes + what the autoscaler may add) holds at once")

    @field_validator("parallel_runs")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("parallel_runs must be >= 1 or auto")
        return v
    tune: dict[str, Any] | None = Field(None, description="TuneConfig minus paths; null skips the sweep")
    evaluate_on: list[str] = Field(default_factory=lambda: ["utkface:test"], description=(
        "NAME:SPLIT scored for every run: a real set (utkface, fairface) or `synthetic` (the generated set, "
        "e.g. synthetic:val for synthetic-style held-out data)"))


@dataclass
class StagePlan:
    """The validated config of every stage, paths filled in."""

    generate: Any
    standin: Any | None
    real_uri: str  # the real set runs train on
    real_src: str | None
    sample: Any | None
    runs: dict[str, Any]
    tune: Any | None
    selection_runs: dict[str, str] = field(default_factory=dict)  # run -> the method of the selection it trains on
    preview: Any | None = None
    real_sets: dict[str, str] = field(default_factory=dict)  # dataset -> ingested URI (evaluation data)
    standin_folders: dict[str, str] = field(default_factory=dict)  # layout -> local folder of stand-in files
    quality: Any | None = None


def _section(model: type, data: dict[str, Any], name: str, source: str):
    return validate(model, data, f"{source} (section {name})")


def plan_stages(cfg: PipelineConfig, source: str = "<pipeline>") -> StagePlan:
    """Validate every section against its stage's config model, before any work."""
    from synthfar_ray.generate import GenerateConfig
    from synthfar_ray.sampling_config import METHODS, SampleConfig
    from synthfar_ray.train import TrainConfig

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"{source}: stages: unknown {unknown}; choose from {list(STAGES)}")
    run_dir, st = cfg.run_dir, cfg.storage.model_dump()
    synthetic = storage.join(run_dir, "synthetic")
    gen = _section(GenerateConfig, {**cfg.generate, "output": synthetic, "storage": st}, "generate", source)
    preview = None
    if cfg.preview is not None:
        preview = _section(GenerateConfig, {**cfg.preview, "output": storage.join(run_dir, "diffusion_preview"),
                                            "storage": st}, "preview", source)
    standin, folders = None, {}
    if cfg.standin is not None:
        if cfg.real.dataset not in cfg.standin.layouts:
            raise ConfigError(f"{source}: real.dataset={cfg.real.dataset} but standin.layouts={cfg.standin.layouts}")
        render = gen.render.model_copy(update={"style": cfg.standin.style, "photo": cfg.standin.photo,
                                               "label_noise": 0.0, "races7": cfg.standin.races7})
        standin = gen.model_copy(update={"output": storage.join(run_dir, "standin_parquet"), "generator": "procedural",
                                         "num_images": cfg.standin.num_images, "seed": cfg.standin.seed,
                                         "val_fraction": 0.0, "render": render})
        folders = {layout: os.path.join(_local(run_dir), "standin", layout) for layout in cfg.standin.layouts}
    if cfg.real.uri:
        real_sets = {cfg.real.dataset: cfg.real.uri}
    else:
        names = cfg.standin.layouts if cfg.standin is not None else [cfg.real.dataset]
        real_sets = {name: storage.join(run_dir, f"real_{name}") for name in names}
    real_uri = real_sets[cfg.real.dataset]
    real_src = None if cfg.real.uri else (folders[cfg.real.dataset] if standin else cfg.real.src)
    if "ingest" in cfg.stages and not cfg.real.uri and real_src is None:
        raise ConfigError(f"{source}: real: give `src` (the downloaded dataset), `uri` (an ingested set) or a `standin`")
    sample = None
    if cfg.sample is not None:
        sample = _section(SampleConfig, {**cfg.sample, "synthetic": synthetic, "real": real_uri, "storage": st},
                          "sample", source)
    quality = None
    if cfg.quality is not None and "quality" in cfg.stages:
        from synthfar_ray.quality_config import QualityConfig

        quality = _section(QualityConfig, {**cfg.quality, "dataset": synthetic, "real": real_uri, "storage": st},
                           "quality", source)
    runs, selection_runs = {}, {}
    for name, over in cfg.runs.items():
        over = dict(over)
        use = over.pop("use_selection", False)
        if use not in (False, True, *METHODS):
            raise ConfigError(f"{source}: runs.{name}: use_selection must be true (the sample stage's selection), "
                              f"a method of {list(METHODS)} (that method's pick of the same K) or false, not {use!r}")
        if use:
            if sample is None or ("train" in cfg.stages and "sample" not in cfg.stages):
                raise ConfigError(f"{source}: runs.{name}: use_selection needs a `sample` section, and the sample "
                                  "stage wherever the train stage runs (it makes the selection the run reads)")
            selection_runs[name] = sample.method if use is True else use
        data = {**cfg.train, **over, "name": name, "storage_path": storage.join(run_dir, "train"),
                "synthetic": synthetic, "real": real_uri, "storage": st}
        runs[name] = _section(TrainConfig, data, f"runs.{name}", source)
    tune = None
    if cfg.tune is not None and "tune" in cfg.stages:
        from synthfar_ray.tune import TuneConfig

        tune = _section(TuneConfig, tune_section(cfg, synthetic, real_uri), "tune", source)
    unknown_eval = sorted({item.split(":")[0] for item in cfg.evaluate_on} - set(real_sets) - {"synthetic"})
    if unknown_eval:
        raise ConfigError(f"{source}: evaluate_on names {unknown_eval}: score `synthetic` or a real set this "
                          f"pipeline has ({sorted(real_sets)})")
    return StagePlan(gen, standin, real_uri, real_src, sample, runs, tune, selection_runs, preview, real_sets, folders,
                     quality)


def training_label(tcfg) -> str:
    """How a run trained, in a few words, for the adaptation table."""
    label = {"synthetic": "synthetic", "real": "real", "mix": f"mix {tcfg.mix_ratio:g} synthetic",
             "pretrain_finetune": "synthetic -> real"}[tcfg.plan]
    if tcfg.real_subset is not None and tcfg.real_subset < 100 and tcfg.plan != "synthetic":
        label += f" ({tcfg.real_subset} % real)"
    extras = []
    if tcfg.adapt.method != "none":
        extras.append(f"{tcfg.adapt.method} (weight {tcfg.adapt.weight:g})")
    if tcfg.adapt.aux_bn:
        extras.append("aux_bn")
    return label + (" + " + " + ".join(extras) if extras else "")


def adaptation_table(trained: dict[str, tuple[Any, Any]], evaluated: dict[str, dict[str, Any]],
                     splits: list[str]) -> dict[str, Any] | None:
    """adaptation.json's content when a run adapts (else None): every evaluated run's accuracies."""
    if not any(tcfg.adapt.enabled for tcfg, _ in trained.values()):
        return None
    rows = [{"run": name, "training": training_label(tcfg),
             "datasets": {sp: {k: (evaluated[name]["datasets"].get(sp) or {}).get(k) for k in ADAPTATION_METRICS}
                          for sp in splits}}
            for name, (tcfg, _) in trained.items() if name in evaluated]
    return {"splits": splits, "rows": rows}


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
    if storage.is_remote(uri):
        return os.path.join(tempfile.gettempdir(), "synthfar-pipeline", uri.split("://", 1)[1].replace("/", "_"))
    return storage.resolve(uri)[1]


def _ingest_real(cfg: PipelineConfig, plan: StagePlan, timed) -> None:
    """Ingest the real set(s): the stand-in layouts (rendered and written first), or real.src."""
    from synthfar_ray.ingest import ingest_fairface, ingest_utkface

    opts = cfg.storage
    todo = {name: uri for name, uri in plan.real_sets.items()
            if not storage.exists(storage.join(uri, "_manifest.json"), opts)}
    for name in sorted(set(plan.real_sets) - set(todo)):
        logger.info("real set %s already ingested at %s", name, plan.real_sets[name])
    if not todo:
        return
    sources = {cfg.real.dataset: plan.real_src}
    if plan.standin is not None:
        from synthfar_ray.generate import run_generate
        from synthfar_ray.standin import write_layouts

        timed("standin-generate", run_generate, plan.standin)
        # Every layout is written (the split between them depends on how many there are).
        counts = timed("standin-files", write_layouts, plan.standin.output, plan.standin_folders, opts,
                       plan.standin if cfg.standin.landmarks else None)
        logger.info("wrote procedural stand-in files (NOT real faces): %s",
                    ", ".join(f"{n} {name} -> {plan.standin_folders[name]}" for name, n in counts.items()))
        sources = plan.standin_folders
    for name, uri in todo.items():
        ingest = ingest_utkface if name == "utkface" else ingest_fairface
        timed(f"ingest:{name}", ingest, sources[name], uri, seed=cfg.real.seed, skip_bad=cfg.real.skip_bad, storage=opts)


def run_selections(cfg: PipelineConfig, plan: StagePlan, timed, metrics: dict[str, Any]) -> dict[str, str]:
    """The sample stage's selection, then the quality stage (with cl-sam's classifier), then a pick of
    the same K by every other method a run trains on, and by random when the synthetic set has
    ground truth (label precision of each method vs random). Returns {method: selection URI}."""
    from synthfar_ray.sampling import run_sample

    sampled = timed("sample", run_sample, plan.sample)
    out = {sampled.method: sampled.output}
    classifier = None
    manifest = storage.join(sampled.scores_uri.rsplit("/", 1)[0], "_manifest.json")
    if storage.exists(manifest, cfg.storage):  # random has no score cache; cl-sam records its classifier
        classifier = json.loads(storage.read_bytes(manifest, cfg.storage)).get("classifier")
    quality_folder = None
    if plan.quality is not None:
        quality_folder = run_quality_stage(cfg, plan, classifier, timed, metrics)
    others = [m for m in dict.fromkeys(plan.selection_runs.values()) if m != sampled.method]
    if sampled.precision is not None and "random" not in others and sampled.method != "random":
        others.append("random")
    results = {}
    for method in others:
        update: dict[str, Any] = {"method": method, "k": sampled.k, "k_multiple": None, "output": None}
        if quality_folder is not None:  # quality / rl rank by the quality stage's columns
            update["quality"] = plan.sample.quality.model_copy(update={"folder": quality_folder})
        results[method] = timed(f"sample:{method}", run_sample, plan.sample.model_copy(update=update))
        out[method] = results[method].output
    if sampled.precision is not None:
        metrics["selection"] = {"method": sampled.method, "k": sampled.k, "precision": sampled.precision,
                                "random_precision": results["random"].precision if "random" in results else None,
                                "others": {m: r.precision for m, r in results.items() if m != "random"}}
        storage.write_bytes(storage.join(cfg.run_dir, SELECTION_PRECISION),
                            json.dumps(metrics["selection"], indent=2).encode(), cfg.storage)
    return out


def run_quality_stage(cfg: PipelineConfig, plan: StagePlan, classifier: str | None, timed,
                      metrics: dict[str, Any]) -> str:
    """`synthfar quality` of the synthetic set (with the sample stage's cl-sam classifier when the
    section names none), and the pointer the report follows to it; returns the quality folder."""
    from synthfar_ray.quality import REPORT_POINTER, run_quality

    qcfg = plan.quality
    if qcfg.classifier is None and classifier:
        qcfg = qcfg.model_copy(update={"classifier": classifier})
    result = timed("quality", run_quality, qcfg)
    metrics["quality"] = {"folder": result.folder, "summary": result.summary}
    storage.write_bytes(storage.join(cfg.run_dir, REPORT_POINTER),
                        json.dumps({"folder": result.folder, "dataset": qcfg.dataset}).encode(), cfg.storage)
    return result.folder


def runs_to_train(plan: StagePlan, selections: dict[str, str]) -> dict[str, Any]:
    """The runs' TrainConfigs, each run that trains on a selection pointed at its URI."""
    return {name: tcfg.model_copy(update={"synthetic_selection": selections[plan.selection_runs[name]]})
            if name in plan.selection_runs else tcfg for name, tcfg in plan.runs.items()}


def runs_in_flight(setting: int | str, runs: dict[str, Any], shapes: list | None = None) -> int:
    """`parallel_runs` as a number: the setting, or (auto) how many of the largest run's requests the
    cluster holds at once, counting CPUs and GPUs of live nodes and autoscaler node types (`shapes`,
    default: this cluster's)."""
    if setting != "auto":
        return int(setting)
    from synthfar_ray.raycluster import capacity, node_shapes
    from synthfar_ray.train import run_request

    if not runs:
        return 1
    shapes = node_shapes() if shapes is None else shapes
    has_gpu = capacity("GPU", shapes) > 0
    requests = [run_request(t, has_gpu if t.use_gpu is None else t.use_gpu) for t in runs.values()]
    fits = len(runs)
    for key in ("CPU", "GPU"):
        need = max(r.get(key, 0.0) for r in requests)
        if need > 0:
            fits = min(fits, int(capacity(key, shapes) / need + 1e-9))
    largest = max(requests, key=lambda r: (r.get("GPU", 0.0), r["CPU"]))
    logger.info("parallel_runs auto: %d of %d runs at once (the largest asks for %s)", max(1, fits), len(runs), largest)
    return max(1, fits)


def _train_in_task(tcfg):
    from synthfar_ray.train import run_train

    return run_train(tcfg)


def _await_run(ref):
    """The run's result; a failed run raises its own error (not Ray's wrapper) for the one-line report."""
    import ray

    from synthfar_ray.raycluster import task_error_cause

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise task_error_cause(e) from None


def train_runs(runs: dict[str, Any], parallel: int, timed) -> dict[str, tuple[Any, Any]]:
    """Train every run (configs with absolute paths): one after another in this process, or up to
    `parallel` at once, each as a Ray task (num_cpus=0: its TorchTrainer's workers hold the CPUs)
    driving its own TorchTrainer. The first failure stops the stage (runs in flight finish)."""
    from synthfar_ray.train import run_train

    if parallel <= 1 or len(runs) <= 1:
        return {name: (tcfg, timed(f"train:{name}", run_train, tcfg)) for name, tcfg in runs.items()}
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_train_in_task)
    pending, in_flight, done = list(runs), {}, {}
    logger.info("training %d runs, %d at a time: %s", len(runs), parallel, ", ".join(runs))
    try:
        while pending or in_flight:
            while pending and len(in_flight) < parallel:
                name = pending.pop(0)
                in_flight[task.remote(runs[name])] = name
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            name = in_flight.pop(ready[0])
            result = timed(f"train:{name}", _await_run, ready[0])
            done[name] = (runs[name], result)
            logger.info("run %s finished: step %d in %.1f s", name, result.steps, result.seconds)
    finally:
        for ref, name in in_flight.items():  # a run failed: stop the others (they resume from a checkpoint)
            logger.warning("cancelling run %s", name)
            ray.cancel(ref, force=True)
    return {name: done[name] for name in runs}


def _run_point(plan: StagePlan, name: str, tcfg) -> tuple[float, str] | None:
    """(synthetic share, sampler) of a pipeline run in the terms of a mix sweep; None if not comparable."""
    sampler = plan.selection_runs.get(name, "none")
    if tcfg.plan == "real":
        return None  # a sweep's 0 % mix ignores its sampler: no single trial to pair with
    share = 1.0 if tcfg.plan == "synthetic" else tcfg.mix_ratio if tcfg.plan == "mix" else None
    return None if share is None else (float(share), sampler)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs or no spread."""
    import numpy as np
    import pandas as pd

    if len(a) < 3:
        return None
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def tune_agreement(plan: StagePlan, tune_result, trained: dict[str, tuple[Any, Any]]) -> dict[str, Any] | None:
    """Does the sweep rank configurations as separately trained runs do? Pairs each finished trial
    of a mix sweep with the pipeline run of the same (synthetic share, sampler, real subset, K), scores
    the run like the sweep (mean of its score metrics at its last validation) and gives the Spearman
    correlation of the two scores. None when the sweep is not a mix sweep or nothing pairs."""
    from synthfar_ray.tune import _score

    tune = plan.tune
    if tune is None or tune.plan != "mix" or not trained:
        return None
    subset = int(tune.train.get("real_subset", 100))
    k = plan.sample.k if plan.sample is not None else None
    k_multiple = plan.sample.k_multiple if plan.sample is not None else None
    runs = {}
    for name, (tcfg, result) in trained.items():
        point = _run_point(plan, name, tcfg)
        if point is not None and tcfg.real_subset == subset:
            runs[point] = (name, _score(result.metrics, tune.score_metrics))
    pairs = []
    for trial in tune_result.trials:
        if trial.get("status") != "TERMINATED" or trial.get(tune.metric) is None:
            continue
        same_k = trial.get("sampler") == "none" or (
            k is None and trial.get("top_k") == k_multiple and plan.sample.real_subset == subset)
        point = (float(trial["mix_ratio"]), str(trial["sampler"]))
        if point in runs and same_k and runs[point][1] is not None:
            pairs.append({"mix_ratio": point[0], "sampler": point[1], "trial": trial.get("trial_id"),
                          "trial_score": float(trial[tune.metric]), "run": runs[point][0], "run_score": runs[point][1]})
    if not pairs:
        return None
    rho = spearman([p["trial_score"] for p in pairs], [p["run_score"] for p in pairs])
    return {"metric": tune.metric, "pairs": pairs, "spearman": rho}


def report_datasets(plan: StagePlan) -> dict[str, str]:
    """The datasets the report shows grids of, under names that say what they are."""
    gen = plan.generate
    if gen.generator == "procedural":
        noise = gen.render.label_noise
        name = f"synthetic (procedural, {gen.render.style} style, label noise {noise})"
    else:
        name = f"synthetic ({gen.generator})"
    out = {name: gen.output}
    for dataset, uri in plan.real_sets.items():
        out[f"{dataset} (procedural stand-in, not faces)" if plan.standin is not None else dataset] = uri
    if plan.preview is not None:
        label = ("random-weight diffusion: machinery only" if plan.preview.model.preset
                 else f"{plan.preview.generator} preview")
        out[f"diffusion preview ({label})"] = plan.preview.output
    return out


@dataclass
class PipelineResult:
    run_dir: str
    report: str | None
    seconds: float
    stage_seconds: dict[str, float]
    metrics: dict[str, Any]
    selections: dict[str, str] = field(default_factory=dict)  # use_selection value -> selected rows' URI


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

        if plan.preview is not None:
            timed("generate:preview", run_generate, plan.preview)
        timed("generate", run_generate, plan.generate)
    if "ingest" in cfg.stages and cfg.real.uri is None:
        _ingest_real(cfg, plan, timed)
    selections: dict[str, str] = {}
    if plan.sample is not None and "sample" in cfg.stages:
        selections = run_selections(cfg, plan, timed, metrics)
    elif plan.quality is not None:  # no sample stage this time: quality with its own classifier
        run_quality_stage(cfg, plan, None, timed, metrics)
    checkpoints: dict[str, str] = {}
    trained: dict[str, tuple[Any, Any]] = {}  # run -> (config as trained, TrainResult)
    if "train" in cfg.stages:
        todo = runs_to_train(plan, selections)
        for name, (tcfg, result) in train_runs(todo, runs_in_flight(cfg.parallel_runs, todo), timed).items():
            checkpoints[name] = result.checkpoint
            trained[name] = (tcfg, result)
            times[f"train:{name}"] = round(result.seconds, 2)  # the run's own time (runs may overlap)
    if plan.tune is not None:
        from synthfar_ray.tune import run_tune

        tune_result = timed("tune", run_tune, plan.tune)
        metrics["tune"] = {"best_params": tune_result.best_params, "best_metric": tune_result.best_metric}
        agreement = tune_agreement(plan, tune_result, trained)
        if agreement is not None:
            metrics["tune_agreement"] = agreement
            storage.write_bytes(storage.join(cfg.run_dir, TUNE_AGREEMENT), json.dumps(agreement, indent=2).encode(), opts)
            logger.info("tune vs separately trained runs: Spearman %s over %d matching configurations",
                        agreement["spearman"], len(agreement["pairs"]))
    evaluations: dict[str, str] = {}
    if "evaluate" in cfg.stages and checkpoints:
        from synthfar_ray.evaluate import EvaluateConfig, run_evaluations

        evaluations = {name: storage.join(cfg.run_dir, "eval", name) for name in checkpoints}
        data = {**plan.real_sets, "synthetic": plan.generate.output}
        ecfgs = [EvaluateConfig(checkpoint=ckpt, on=cfg.evaluate_on, data=data, out=evaluations[name],
                                storage=opts) for name, ckpt in checkpoints.items()]
        # Every run in one pass over the test splits: they are read and decoded once, not once per run.
        evaluated = dict(zip(checkpoints, timed("evaluate", run_evaluations, ecfgs)))
        metrics.update(evaluated)
        table = adaptation_table(trained, evaluated, cfg.evaluate_on)
        if table is not None:
            storage.write_bytes(storage.join(cfg.run_dir, ADAPTATION), json.dumps(table, indent=2).encode(), opts)
    report_path = None
    if "report" in cfg.stages:
        from synthfar_ray.report import build_report

        rep = timed("report", build_report, cfg.run_dir, runs=evaluations or None,
                    datasets=report_datasets(plan), storage=opts)
        report_path = rep.html_path
    seconds = time.time() - t_start
    logger.info("pipeline done in %.1f s: %s", seconds, ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return PipelineResult(cfg.run_dir, report_path, seconds, times, metrics, selections)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    result = run_pipeline(cfg, args.config)
    print(f"pipeline finished in {result.seconds:.0f} s; outputs in {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args, stage_parser

    p = stage_parser(sub, "pipeline")
    add_config_args(p)
    p.set_defaults(func=_cli)
