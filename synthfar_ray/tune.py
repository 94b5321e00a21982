"""Stage 5: search the mixing ratio (or pretrain steps), the sampler, its top-K and the learning rate
with Ray Tune (`synthfar tune CONFIG [key=value ...]`).

Pattern (Ray 2.60, Train V2): each Tune trial is a small function trainable that builds its
`TrainConfig` (the base `train:` settings + the trial's parameters) and runs train.py's loop. A
one-worker trial (the default on CPU, and `gpus_per_trial: 1`) holds that worker's CPUs and GPU
and runs the loop in its own process (train.fit_in_trial), reporting each validation to Tune
itself; a trial of several DDP workers starts a TorchTrainer, whose reports a Train V2
`TuneReportCallback` forwards. Either way Tune gets `val_score` (the mean of the validation
accuracies, unless the metric is one train.py reports itself) at every validation, so ASHA can stop
weak trials early. In-process trials save each trial a Train controller, worker and split
coordinators: the demo's four 200-step trials took 113 s as TorchTrainers (2026-12-07), 58 s in
process (2026-12-08).

Samplers cost a model each (cl-sam classifier, cr-sam discriminator) and a pass over the synthetic
set, so each sampler's scores are computed once before the sweep (and cached with the synthetic set,
see sampling.py); the top-K selection of every (sampler, K) in the space is then cheap pandas,
written under `<sweep>/selections/`. A trial just points `synthetic_selection` at its selection.

Layout under `<storage_path>/<name>/`: Tune's experiment state and trial folders (progress.csv,
result.json, TensorBoard events), `runs/<trial_id>/` (train.py runs: checkpoints, TensorBoard
scalars of the training loop, trial.json), `selections/`, and `tune_results.csv` / `.md`.
Re-running the same config restores the sweep (`Tuner.restore`): finished trials are kept, not
rerun; unfinished ones resume from their last Train checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError, StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.errors import StageFailed, UserError, last_line
from synthfar_ray.paths import OutputPath, absolute_location
from synthfar_ray.labels import ClassField
from synthfar_ray.raycluster import capacity, check_request, ensure_ray, node_shapes
from synthfar_ray.sampling_config import Combine, QualityRanking, RLSettings, SampleConfig, ScorerTrain

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

SAMPLERS = ("none", "random", "cl-sam", "cr-sam", "quality", "rl")
RESULTS_CSV, RESULTS_MD = "tune_results.csv", "tune_results.md"
TRIAL_FILE = "trial.json"
RUNS_DIR, SELECTIONS_DIR = "runs", "selections"
# Columns report.py's load_tune needs (plus the metric column, named in `metric`).
TABLE_COLUMNS = ("trial_id", "mix_ratio", "sampler", "top_k", "lr")


# ---------------------------------------------------------------------------------------------
# Config


class Dist(StrictModel):
    """A searched parameter: exactly one of choice (sampled), grid (every value), uniform or loguniform."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Dist":
        set_ = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform (got {set_ or 'none'})")
        if self.choice is not None and not self.choice or self.grid is not None and not self.grid:
            raise ValueError("choice / grid needs at least one value")
        for name in ("uniform", "loguniform"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{name} needs [low, high] with low < high, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def values(self) -> list[Any] | None:
        """The finite set of values, or None for a continuous range."""
        return self.choice if self.choice is not None else self.grid

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


class SearchSpace(StrictModel):
    """Each entry: a fixed value, or a `Dist` ({choice: [...]}, {grid: [...]}, {loguniform: [lo, hi]} ...)."""

    mix_ratio: Dist | float = Field(default_factory=lambda: Dist(choice=[0.25, 0.5, 0.75]),
                                    description="mix plan: synthetic share of each batch")
    pretrain_steps: Dist | int | None = Field(None, description="pretrain_finetune plan: synthetic steps "
                                                                "(the rest of train.steps fine-tunes on real)")
    sampler: Dist | Literal["none", "random", "cl-sam", "cr-sam", "quality", "rl"] = Field(
        default_factory=lambda: Dist(choice=["random", "cl-sam", "cr-sam"]),
        description="none = the whole synthetic set")
    k_multiple: Dist | float = Field(default_factory=lambda: Dist(choice=[1.0, 2.0, 5.0]),
                                     description="top-K as a multiple of the real training rows")
    lr: Dist | float = Field(default_factory=lambda: Dist(loguniform=(1e-5, 1e-3)))
    adapt_method: Dist | Literal["none", "dann", "daln"] | None = Field(
        None, description="train.adapt.method per trial (null: train.adapt as given)")
    adapt_weight: Dist | float | None = Field(None, description="train.adapt.weight per trial (null: as given)")

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        if isinstance(self.adapt_method, Dist):
            bad = [m for m in self.adapt_method.values() or ["(a range)"] if m not in ("none", "dann", "daln")]
            if bad:
                raise ValueError(f"adapt_method values must be none, dann or daln, got {bad}")
        for name in ("sampler", "k_multiple"):
            value = getattr(self, name)
            if isinstance(value, Dist) and value.values() is None:
                raise ValueError(f"{name}: selections are made before the sweep, so use a fixed value, "
                                 "choice or grid, not a continuous range")
        for s in self.samplers():
            if s not in SAMPLERS:
                raise ValueError(f"sampler {s!r} is not one of {SAMPLERS}")
        for k in self.k_multiples():
            if not isinstance(k, (int, float)) or k <= 0:
                raise ValueError(f"k_multiple values must be > 0, got {k!r}")
        return self

    def samplers(self) -> list[str]:
        return list(self.sampler.values()) if isinstance(self.sampler, Dist) else [self.sampler]

    def k_multiples(self) -> list[float]:
        return [float(k) for k in (self.k_multiple.values() if isinstance(self.k_multiple, Dist) else [self.k_multiple])]


class SamplerSettings(StrictModel):
    """How each sampler scores the synthetic set (see sampling_config.SampleConfig)."""

    class_key: list[ClassField] = Field(default_factory=lambda: ["ethnicity", "gender", "age_bin"])
    combine: Combine = "product"
    redistribute: bool = False
    classifier: str | None = Field(None, description="cl-sam classifier checkpoint; default: train a small one")
    scorer_train: ScorerTrain = ScorerTrain()
    quality: QualityRanking = Field(default_factory=QualityRanking, description="sampler quality: its columns and weights")
    rl: RLSettings = Field(default_factory=RLSettings, description="sampler rl: its budget (one policy per K)")
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0)


class TuneConfig(StageConfig):
    name: str = Field(description="sweep name: the folder under storage_path; re-running it resumes the sweep")
    storage_path: OutputPath = Field(description="where sweeps live (local path, file:// or s3://)")
    plan: Literal["mix", "pretrain_finetune"] = "mix"
    train: dict[str, Any] = Field(description="base train.TrainConfig fields (synthetic, real, steps, model, ...); "
                                              "name, storage_path, plan and the searched fields are set per trial")
    space: SearchSpace = SearchSpace()
    sampling: SamplerSettings = SamplerSettings()
    metric: str = Field("val_score", description="reported metric to optimise; val_score = mean of score_metrics")
    mode: Literal["max", "min"] = "max"
    score_metrics: list[str] = Field(default_factory=lambda: ["val_gender_acc", "val_ethnicity_acc", "val_age_bin_acc"])
    num_samples: int = Field(8, ge=1, description="trials (with grid entries: repeats of the grid)")
    search: Literal["auto", "optuna", "random"] = Field("auto", description="auto: Optuna when installed and the "
                                                                            "space has no grid, else random/grid")
    asha: bool = Field(True, description="ASHA early stopping on the metric at each validation")
    grace_steps: int | None = Field(None, ge=1, description="ASHA: steps before a trial can be stopped "
                                                            "(default: 2 validations)")
    reduction_factor: float = Field(3.0, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster fits")
    gpus_per_trial: int | None = Field(None, ge=0, description="DDP GPU workers per trial (default 1 with GPUs)")
    trial_cpus: float = Field(0.25, gt=0, description="CPUs of the trial's driver function (multi-worker trials; "
                                                   "a one-worker trial holds its worker's CPUs and GPU instead)")
    cpu_worker_cpus: float = Field(0.5, gt=0, description="CPU-only cluster: CPUs per train worker")
    cpu_data_cpus: float = Field(0.25, gt=0, description="CPU-only cluster: CPUs per Ray Data decode task")
    resume: bool = Field(True, description="restore an existing sweep of the same name")
    trial_max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial within one run")
    seed: int = 0

    @field_validator("train")
    @classmethod
    def _absolute_paths(cls, train: dict[str, Any]) -> dict[str, Any]:
        # Resolved here, on the driver: a trial runs in its own working directory.
        train = dict(train)
        for key in ("synthetic", "real"):
            if isinstance(train.get(key), str):
                train[key] = absolute_location(train[key])
        model = train.get("model")
        if isinstance(model, dict) and model.get("pretrained") not in (None, "torchvision"):
            train["model"] = {**model, "pretrained": absolute_location(str(model["pretrained"]))}
        return train

    @model_validator(mode="after")
    def _check(self) -> "TuneConfig":
        reserved = {"name", "storage_path", "plan", "synthetic_selection", "storage"}
        bad = sorted(reserved & set(self.train))
        if bad:
            raise ValueError(f"train: {bad} are set by the sweep, remove them")
        if self.plan == "pretrain_finetune" and self.space.pretrain_steps is None:
            raise ValueError("plan pretrain_finetune needs space.pretrain_steps")
        if "/" in self.name or not self.name.strip():
            raise ValueError(f"name {self.name!r} must be a plain folder name")
        # Fail now, not in trial 17: the base train config with sample values must validate.
        trial_train_config(self, _example_params(self), "probe", "/tmp/probe", None)
        return self

    @property
    def sweep_uri(self) -> str:
        return st.join(self.storage_path, self.name)


def _first(value: Any) -> Any:
    if not isinstance(value, Dist):
        return value
    if value.values() is not None:
        return value.values()[0]
    lo, hi = value.uniform or value.loguniform
    return lo


SEARCHED = ("mix_ratio", "pretrain_steps", "sampler", "k_multiple", "lr", "adapt_method", "adapt_weight")


def _example_params(cfg: TuneConfig) -> dict[str, Any]:
    return {k: _first(getattr(cfg.space, k)) for k in SEARCHED}


def trial_train_config(cfg: TuneConfig, params: dict[str, Any], name: str, runs_uri: str,
                       selection: str | None):
    """The train.TrainConfig of one trial: base `train` + the trial's parameters."""
    from synthfar_ray.train import TrainConfig

    data = dict(cfg.train)
    data.update(name=name, storage_path=runs_uri, plan=cfg.plan, lr=float(params["lr"]),
                synthetic_selection=selection, storage=cfg.storage.model_dump())
    adapt = {k: params[f"adapt_{k}"] for k in ("method", "weight") if params.get(f"adapt_{k}") is not None}
    if adapt:
        data["adapt"] = {**dict(data.get("adapt") or {}), **adapt}
    if cfg.plan == "mix":
        data["mix_ratio"] = float(params["mix_ratio"])
    else:
        pre = int(params["pretrain_steps"])
        total = int(data.get("steps", TrainConfig.model_fields["steps"].default))
        if not 0 <= pre <= total:
            raise ValueError(f"pretrain_steps {pre} is outside [0, train.steps={total}]")
        data.update(pretrain_steps=pre, finetune_steps=total - pre)
        data.pop("steps", None)
    try:
        return TrainConfig.model_validate(data)
    except Exception as e:  # pydantic's message names the field
        raise ValueError(f"train settings of the sweep are not a valid TrainConfig: {e}") from e


@dataclass
class TuneResult:
    best_params: dict[str, Any]
    best_metric: float | None
    best_trial_id: str | None
    table_path: str  # tune_results.csv URI
    markdown_path: str
    sweep_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    restored: bool = False
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Reporting from Train V2 workers to Tune


def _score(metrics: dict[str, Any], parts: list[str]) -> float | None:
    vals = [float(metrics[p]) for p in parts
            if isinstance(metrics.get(p), (int, float)) and not math.isnan(float(metrics[p]))]
    return sum(vals) / len(vals) if vals else None


def _tune_metrics(metrics: dict[str, Any], metric: str, score_metrics: list[str]) -> dict[str, Any] | None:
    """A training report as Tune gets it: with `val_score` (mean of `score_metrics`), or None when
    it lacks the metric (no validation in it): Tune's schedulers need the metric in every result."""
    m = dict(metrics)
    score = _score(m, score_metrics)
    if score is not None:
        m.setdefault("val_score", score)
    value = m.get(metric)
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return m


def _make_report_callback(metric: str, score_metrics: list[str]):
    """A Train V2 UserCallback that forwards rank 0's reports to the Tune session (multi-worker trials)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = _tune_metrics(metrics[0] if metrics else {}, metric, score_metrics)
            if m is not None:
                super().after_report(run_context, [m], checkpoint)

    return ReportToTune()


def _forward_to_tune(metric: str, score_metrics: list[str]):
    """The in-process trial's `on_report`: each report with the metric straight to the Tune session
    (no checkpoint: a restarted trial resumes from its run folder)."""
    from ray import tune

    def forward(metrics: dict[str, Any]) -> None:
        m = _tune_metrics(metrics, metric, score_metrics)
        if m is not None:
            tune.report(m)

    return forward


def _train_reporting(cfg: TuneConfig, tcfg) -> dict[str, Any]:
    from synthfar_ray import train

    if train.executor_of(tcfg, in_trial=True) == "trial":
        r = train.run_train(tcfg, on_report=_forward_to_tune(cfg.metric, cfg.score_metrics))
    else:
        r = train.run_train(tcfg, callbacks=[_make_report_callback(cfg.metric, cfg.score_metrics)])
    return {"checkpoint": r.checkpoint, "metrics": dict(r.metrics), "steps": r.steps}


@dataclass
class TrialSetup:
    """What every trial needs besides its parameters (shipped once via tune.with_parameters)."""

    cfg: TuneConfig  # the object, not JSON: a JSON dump masks the storage credentials (SecretStr)
    runs_uri: str
    selections: dict[str, str]  # "<sampler>|<k_multiple>" -> selection URI


def _selection_key(sampler: str, k_multiple: float) -> str:
    return f"{sampler}|{float(k_multiple):g}"


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one training run with this trial's parameters."""
    from ray import tune

    cfg = setup.cfg
    trial_id = tune.get_context().get_trial_id()
    sampler = config["sampler"]
    selection = None if sampler == "none" else setup.selections[_selection_key(sampler, config["k_multiple"])]
    tcfg = trial_train_config(cfg, config, trial_id, setup.runs_uri, selection)
    # trial.json: every start of this trial's training (a restored sweep must not add one to a
    # finished trial), then its outcome. The outcome is missing when the scheduler stopped the trial.
    record_uri = st.join(tcfg.run_uri, TRIAL_FILE)
    record: dict[str, Any] = {"trial_id": trial_id, "params": config, "selection": selection, "attempts": []}
    if st.exists(record_uri, cfg.storage):
        record = json.loads(st.read_bytes(record_uri, cfg.storage))
    record["attempts"].append({"started_at": time.time(), "pid": os.getpid()})
    st.write_bytes(record_uri, json.dumps(record, indent=2, default=str).encode(), cfg.storage)
    t0 = time.time()
    out = _train_reporting(cfg, tcfg)
    record.update(out, seconds=round(time.time() - t0, 2), finished_at=time.time())
    st.write_bytes(record_uri, json.dumps(record, indent=2, default=str).encode(), cfg.storage)


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_selections(cfg: TuneConfig) -> dict[str, str]:
    """Score the synthetic set once per sampler (cached) and write every (sampler, K) selection."""
    from synthfar_ray.sampling import compute_scores
    from synthfar_ray.scorers import count_real_train
    from synthfar_ray.selection import resolve_k, select_top_k, write_selection

    base = cfg.train
    samplers = [s for s in cfg.space.samplers() if s != "none"]
    if not samplers:
        return {}
    for key in ("synthetic", "real"):
        if not base.get(key):
            raise ConfigError(f"train.{key} is needed to score samplers {samplers}")
    real_subset = int(base.get("real_subset", 100))
    real_rows = count_real_train(base["real"], real_subset, cfg.storage)
    s = cfg.sampling
    out: dict[str, str] = {}
    for sampler in samplers:
        scfg = SampleConfig(
            synthetic=base["synthetic"], real=base["real"], real_subset=real_subset, method=sampler, k=1,
            class_key=s.class_key, combine=s.combine, redistribute=s.redistribute, classifier=s.classifier,
            scorer_train=s.scorer_train, quality=s.quality, rl=s.rl, seed=s.seed, batch_size=s.batch_size, num_actors=s.num_actors,
            cpus_per_actor=s.cpus_per_actor, gpus_per_actor=s.gpus_per_actor, storage=cfg.storage)
        scores, scores_uri = compute_scores(scfg) if sampler != "rl" else (None, "")
        for mult in cfg.space.k_multiples():
            k = resolve_k(None, mult, real_rows)
            if sampler == "rl":  # the policy is learnt for its K
                scores, scores_uri = compute_scores(scfg, k)
            uri = st.join(cfg.sweep_uri, SELECTIONS_DIR, f"{sampler}-{mult:g}x")
            selection = select_top_k(scores, k, list(s.class_key), s.redistribute)
            write_selection(selection, uri, sampler, k, cfg.storage, extra={
                "k_multiple": mult, "real_train_rows": real_rows, "class_key": list(s.class_key),
                "synthetic": base["synthetic"], "real": base["real"], "scores": scores_uri})
            out[_selection_key(sampler, mult)] = uri
            logger.info("selection %s %gx: %d of %d rows -> %s", sampler, mult, int(selection["chosen"].sum()),
                        len(selection), uri)
    return out


def _param_space(cfg: TuneConfig) -> dict[str, Any]:
    space: dict[str, Any] = {}
    names = ["sampler", "k_multiple", "lr"] + (["mix_ratio"] if cfg.plan == "mix" else ["pretrain_steps"])
    names += [n for n in ("adapt_method", "adapt_weight") if getattr(cfg.space, n) is not None]
    for name in names:
        value = getattr(cfg.space, name)
        space[name] = value.to_tune() if isinstance(value, Dist) else value
    return space


def _has_grid(cfg: TuneConfig) -> bool:
    return any(isinstance(getattr(cfg.space, n), Dist) and getattr(cfg.space, n).grid is not None
               for n in SEARCHED)


def _searcher(cfg: TuneConfig, concurrent: int):
    """(search algorithm, max_concurrent_trials for tune.TuneConfig).

    BasicVariantGenerator limits concurrency itself; Tune would ignore max_concurrent_trials for it."""
    from ray.tune.search import BasicVariantGenerator

    want_optuna = cfg.search == "optuna" or (cfg.search == "auto" and not _has_grid(cfg))
    if want_optuna:
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            if cfg.search == "optuna":
                raise ConfigError("search: optuna, but the optuna package is not installed") from None
            logger.info("search: random/grid (BasicVariantGenerator); optuna is not installed")
        else:
            if _has_grid(cfg):
                raise ConfigError("search: optuna cannot take grid entries; use choice")
            logger.info("search: Optuna (TPE), seed %d", cfg.seed)
            return OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.seed), concurrent
    else:
        logger.info("search: random/grid (BasicVariantGenerator)")
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent), None


def data_pipelines(cfg: TuneConfig) -> int:
    """Ray Data pipelines one trial runs at once: each train set it reads, plus the val split."""
    from synthfar_ray.train_data import val_source_of

    probe = trial_train_config(cfg, _example_params(cfg), "probe", "/tmp/probe", None)
    mix_sets = 2 if cfg.plan == "mix" else 1  # pretrain_finetune reads one set per phase
    return mix_sets + int(val_source_of(probe) != "none")


def _resources(cfg: TuneConfig) -> tuple[dict[str, Any], int, dict[str, float]]:
    """Train settings for the cluster's hardware, how many trials run at once, and what each trial's
    own process reserves.

    A trial launches its Train worker(s) and the Ray Data read/decode tasks of each dataset it reads
    (`data_cpus` each, one per pipeline at least). A one-worker trial is that worker (it reserves the
    worker's CPUs and GPU); a multi-worker trial's function (`trial_cpus`) starts a worker group
    beside it. All of it must fit at once, or trials sit at step 0 while Ray Data waits for a CPU
    ("Cluster resources are not enough to run any task"): concurrency is what the cluster fits, counting
    the nodes an autoscaler may add."""
    from synthfar_ray.train import executor_of

    shapes = node_shapes()
    n_gpu, n_cpu = int(capacity("GPU", shapes)), capacity("CPU", shapes)
    overrides: dict[str, Any] = {}
    workers = int(cfg.train.get("num_workers", 1))
    if n_gpu > 0 and cfg.gpus_per_trial != 0:
        workers = cfg.gpus_per_trial or workers
        overrides.update(use_gpu=True, num_workers=workers)
        if workers > n_gpu:
            raise UserError(f"a trial needs {workers} GPUs (gpus_per_trial) but the cluster has {n_gpu}")
        fits = n_gpu // workers
    else:
        overrides["use_gpu"] = False
        fits = None
    gpu = overrides["use_gpu"]
    cpus_per_worker = float(cfg.train.get("cpus_per_worker", cfg.cpu_worker_cpus if not gpu else 1.0))
    data_cpus = float(cfg.train.get("data_cpus", cfg.cpu_data_cpus if not gpu else 1.0))
    overrides.update(cpus_per_worker=cpus_per_worker, data_cpus=data_cpus)
    pipelines = data_pipelines(cfg)
    probe = trial_train_config(cfg.model_copy(update={"train": {**cfg.train, **overrides}}), _example_params(cfg),
                               "probe", "/tmp/probe", None)
    in_trial = executor_of(probe, in_trial=True) == "trial"
    worker = {"CPU": cpus_per_worker, "GPU": probe.gpus_per_worker if gpu else 0}
    if in_trial:
        trial = {"cpu": worker["CPU"], "gpu": worker["GPU"]}
        per_trial = cpus_per_worker + pipelines * data_cpus
        parts = f"its one worker {cpus_per_worker:g}, in the trial's process"
        check_request("tune: each trial (its one Train worker)", worker, shapes=shapes)
    else:
        trial = {"cpu": cfg.trial_cpus}
        per_trial = cfg.trial_cpus + workers * cpus_per_worker + pipelines * data_cpus
        parts = f"trial {cfg.trial_cpus:g} + {workers} workers x {cpus_per_worker:g}"
        check_request("tune: each trial's function", {"CPU": cfg.trial_cpus}, shapes=shapes)
        check_request("tune: each trial's Train worker", worker, workers, together=True, shapes=shapes)
    if per_trial > n_cpu + 1e-9:
        raise UserError(f"a trial needs {per_trial:g} CPUs ({parts} + {pipelines} data pipelines x {data_cpus:g}) "
                        f"but the cluster has {n_cpu:g}: lower train.cpus_per_worker, train.data_cpus"
                        f"{'' if in_trial else ' or trial_cpus'}")
    check_request("tune: each Ray Data decode task", {"CPU": data_cpus}, shapes=shapes)
    cpu_fits = int(n_cpu // per_trial + 1e-9)
    fits = cpu_fits if fits is None else min(fits, cpu_fits)
    concurrent = min(cfg.max_concurrent_trials or fits, fits)
    if cfg.max_concurrent_trials and cfg.max_concurrent_trials > fits:
        logger.warning("max_concurrent_trials=%d, but the cluster fits %d trials of %g CPUs: running %d at once",
                       cfg.max_concurrent_trials, fits, per_trial, concurrent)
    logger.info("each trial reserves %g CPUs (%d workers%s, %d data pipelines); %d at once on %g CPUs / %d GPUs",
                per_trial, workers, " in the trial's process" if in_trial else "", pipelines, concurrent, n_cpu, n_gpu)
    return overrides, max(1, concurrent), trial


def _check_validation_rows(cfg: TuneConfig, probe) -> None:
    """A val_* metric needs val rows: without them every trial ends without the metric and Tune
    fails the whole sweep at its first result. Say so before any trial starts."""
    import pyarrow.dataset as pads

    from synthfar_ray.scorers import open_dataset
    from synthfar_ray.train_data import val_source_of

    if not cfg.metric.startswith("val_"):
        return
    source = val_source_of(probe)
    if source == "none":
        raise ConfigError(f"metric {cfg.metric} comes from validation, but train.val_source is 'none'")
    uri = getattr(probe, source)
    if open_dataset(uri, cfg.storage).count_rows(filter=pads.field("split") == "val") == 0:
        raise ConfigError(f"metric {cfg.metric} comes from validation, but the val source {uri} (train.{source}) "
                          "has no rows with split == 'val'")


def _scheduler(cfg: TuneConfig, steps: int):
    """ASHA on the metric at each validation (time = optimizer step), or FIFO when ASHA is off or
    its grace period covers the whole budget."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from synthfar_ray.train import TrainConfig

    val_every = int(cfg.train.get("val_every", TrainConfig.model_fields["val_every"].default))
    grace = cfg.grace_steps or 2 * val_every
    if cfg.asha and grace < steps:
        # stop_last_trials=False: a trial that reaches max_t finishes on its own (and writes its
        # trial.json) instead of being stopped at its last report.
        logger.info("scheduler: ASHA on %s (grace %d steps, max %d, reduction %g)", cfg.metric, grace, steps,
                    cfg.reduction_factor)
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace,
                             reduction_factor=cfg.reduction_factor, stop_last_trials=False)
    if cfg.asha:
        logger.info("scheduler: FIFO (ASHA's grace of %d steps leaves nothing to stop in %d steps)", grace, steps)
    return FIFOScheduler()


def _status(result, steps: int, metric: str) -> str:
    if result.error is not None:
        return "ERROR"
    m = result.metrics or {}
    value = m.get(metric)
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return "NO_RESULT"
    step = m.get("step")
    if isinstance(step, (int, float)) and step < steps:
        return "STOPPED_EARLY"
    return "TERMINATED"


FAILED_STATUSES = ("ERROR", "NO_RESULT")


def _trial_table(cfg: TuneConfig, grid, real_rows: int | None, steps: int) -> pd.DataFrame:
    import pandas as pd

    from synthfar_ray.selection import resolve_k

    rows = []
    for result in grid:
        c, m = result.config or {}, result.metrics or {}
        sampler = c.get("sampler")
        status = _status(result, steps, cfg.metric)
        error = last_line(result.error) if result.error is not None else (
            f"finished without reporting {cfg.metric}" if status == "NO_RESULT" else None)
        rows.append({
            "trial_id": m.get("trial_id") or (os.path.basename(result.path.rstrip("/")) if result.path else None),
            "mix_ratio": c.get("mix_ratio") if cfg.plan == "mix" else None,
            "sampler": sampler,
            "top_k": c.get("k_multiple") if sampler != "none" else None,
            "lr": c.get("lr"),
            cfg.metric: m.get(cfg.metric),
            **({"val_score": m.get("val_score")} if cfg.metric != "val_score" else {}),
            "status": status,
            "error": error,
            "effective_mix_ratio": m.get("synthetic_fraction") if cfg.plan == "mix" else None,
            "pretrain_steps": c.get("pretrain_steps"),
            "adapt_method": c.get("adapt_method"),
            "adapt_weight": c.get("adapt_weight"),
            "k": resolve_k(None, c["k_multiple"], real_rows) if real_rows and sampler not in (None, "none") else None,
            "step": m.get("step"),
            "plan": cfg.plan,
            "metric": cfg.metric,
            "mode": cfg.mode,
            "checkpoint": m.get("checkpoint_path"),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df[cfg.metric] = pd.to_numeric(df[cfg.metric], errors="coerce")
    # Failed trials never rank: their metric is missing, and they sort last.
    df.loc[df["status"].isin(FAILED_STATUSES), cfg.metric] = float("nan")
    return df.sort_values(cfg.metric, ascending=cfg.mode == "min", na_position="last", kind="stable").reset_index(drop=True)


def _markdown(df: pd.DataFrame, cfg: TuneConfig) -> str:
    from synthfar_ray.report import markdown_table

    cols = [*TABLE_COLUMNS, cfg.metric, "status", "error"]
    if cfg.plan == "pretrain_finetune":
        cols.insert(2, "pretrain_steps")
    else:
        cols.insert(2, "effective_mix_ratio")
    cols[-3:-3] = [n for n in ("adapt_method", "adapt_weight") if getattr(cfg.space, n) is not None]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[fmt(r[c]) for c in cols] for r in df.to_dict("records")]
    return (f"# Tune sweep {cfg.name}\n\n{len(df)} trials, sorted by {cfg.metric} "
            f"({'higher' if cfg.mode == 'max' else 'lower'} is better), best first.\n\n" + markdown_table(cols, rows) + "\n")


def run_tune(cfg: TuneConfig) -> TuneResult:
    """Run (or restore) the sweep; write its trial tables. Raises StageFailed when any trial failed,
    after the tables are written (a re-run of the same sweep retries the failed trials only)."""
    import pandas as pd
    from ray import tune

    from synthfar_ray.scorers import count_real_train

    t0 = time.time()
    ensure_ray()
    fs, path = st.resolve_retrying(cfg.storage_path, cfg.storage)
    fs.create_dir(path, recursive=True)
    sweep_path = f"{path.rstrip('/')}/{cfg.name}"
    runs_uri = st.join(cfg.sweep_uri, RUNS_DIR)

    overrides, concurrent, trial_resources = _resources(cfg)
    cfg = cfg.model_copy(update={"train": {**cfg.train, **overrides}})
    selections = prepare_selections(cfg)
    setup = TrialSetup(cfg=cfg, runs_uri=runs_uri, selections=selections)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources)

    probe = trial_train_config(cfg, _example_params(cfg), "probe", runs_uri, None)
    steps = probe.steps
    _check_validation_rows(cfg, probe)
    st.write_bytes(st.join(cfg.sweep_uri, "tune_config.json"), json.dumps(dump_config(cfg), indent=2).encode(), cfg.storage)

    restored = cfg.resume and tune.Tuner.can_restore(sweep_path, storage_filesystem=fs)
    if restored:
        # Finished trials are kept; errored ones start again (their training run resumes from its
        # own last checkpoint), so fixing the cause and re-running completes the sweep.
        logger.info("restoring sweep %s: finished trials are kept, unfinished and errored ones run again", cfg.sweep_uri)
        tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = _scheduler(cfg, steps)
        logger.info("sweep %s: %d samples, up to %d trials at once, train overrides %s", cfg.sweep_uri,
                    cfg.num_samples, concurrent, overrides)
        search_alg, max_concurrent = _searcher(cfg, concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures)),
        )
    grid = tuner.fit()

    real_rows = count_real_train(cfg.train["real"], int(cfg.train.get("real_subset", 100)), cfg.storage) \
        if cfg.train.get("real") else None
    table = _trial_table(cfg, grid, real_rows, steps)
    csv_uri, md_uri = st.join(cfg.sweep_uri, RESULTS_CSV), st.join(cfg.sweep_uri, RESULTS_MD)
    st.write_bytes(csv_uri, table.to_csv(index=False).encode(), cfg.storage)
    st.write_bytes(md_uri, _markdown(table, cfg).encode(), cfg.storage)

    ranked = table[table[cfg.metric].notna()] if not table.empty else table
    best = ranked.iloc[0].to_dict() if not ranked.empty else None
    best_params = {k: best[k] for k in ("sampler", "top_k", "lr", "mix_ratio", "pretrain_steps", "adapt_method",
                                        "adapt_weight")
                   if best and k in best and pd.notna(best[k])} if best else {}
    result = TuneResult(best_params=best_params, best_metric=float(best[cfg.metric]) if best else None,
                        best_trial_id=best["trial_id"] if best else None, table_path=csv_uri, markdown_path=md_uri,
                        sweep_uri=cfg.sweep_uri, trials=table.to_dict("records"), restored=bool(restored),
                        seconds=time.time() - t0)
    failed = table[table["status"].isin(FAILED_STATUSES)] if not table.empty else table
    for r in failed.to_dict("records"):
        logger.error("trial %s %s: %s", r["trial_id"], r["status"], r["error"])
    if table.empty or len(failed):
        summary = "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed.to_dict("records")) or "no trial ran"
        raise StageFailed(f"sweep {cfg.sweep_uri}: {len(failed)} of {len(table)} trials failed ({summary}); "
                          f"table {csv_uri}; fix the cause and re-run the same command to retry them")
    logger.info("sweep %s: %d trials in %.1f s; best %s %s = %s", cfg.name, len(table), result.seconds,
                result.best_trial_id, cfg.metric, result.best_metric)
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args, stage_parser

    p = stage_parser(subparsers, "tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(TuneConfig, args.config, args.overrides)
    result = run_tune(cfg)
    print(f"sweep {cfg.name}: {len(result.trials)} trials{' (restored)' if result.restored else ''} "
          f"in {result.seconds:.1f} s")
    print(f"best trial {result.best_trial_id}: {cfg.metric} = {result.best_metric}; config {result.best_params}")
    print(f"trial table: {result.table_path} (and {result.markdown_path})")
    return 0
