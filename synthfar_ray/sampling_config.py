"""Stage 3: choose the synthetic rows worth training on (`synthfar sample CONFIG [key=value ...]`).

Methods (the sampling paper's, adapted to diffusion data):
- `random`: a seeded uniform score per id (a pure function of (seed, id)), so "random top-K" is a
  reproducible random subset of each class.
- `cl-sam`: class confidence. A classifier trained on real data gives p(ethnicity|x), p(gender|x),
  p(age_bin|x) of the row's *own* labels; they are combined (`product`, `mean` or `min`) over the
  fields of `class_key`. High score = the image clearly shows the class it was generated for.
- `cr-sam`: class realism. A real-vs-synthetic discriminator (a binary head on a `build_backbone`
  encoder, trained here on real train rows vs synthetic rows, class-balanced batches) gives
  p(real | x). High score = hard to tell from a real photo. Cross-fitted: the synthetic train rows
  are split into `scorer_train.cross_fit_folds` folds (seeded hash of the id) and each fold is
  scored by a discriminator trained on the other folds, so no row is scored by a model that saw it.
- `quality`: a weighted mean of the percentile ranks of `synthfar quality` columns (`quality.weights`,
  default label_agreement 1.0 and p_real 0.5: cl-sam's and cr-sam's signals at once); blank,
  undecodable and near-duplicate rows rank last. Without `quality.folder` the stage runs (or reuses)
  `synthfar quality` on its own inputs.
- `rl`: an actor-critic policy over those quality columns, rewarded by small child networks' accuracy
  on the real val split when trained on the rows it picks (rl_sampler.py: formulation, budget,
  resume). Its state lives in `<synthetic>/_scores/rl-<key>/` (state.pt, rewards.json,
  tensorboard/); a re-run with more `rl.episodes` continues it. It is trained for one K.

Only the synthetic *train* split (split == 'train') is scored and selected: those are the rows
training reads, so K is met from rows training actually uses.

This module is the stage's config and command line; the stage itself (scoring, caching, top-K) is
synthfar_ray.sampling, imported when it runs. This module, with the settings the quality and tune
configs embed too (`ScorerTrain`, `QualityRanking`, `RLSettings`), needs neither pandas nor torch,
so a bad config fails at once.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from synthfar_ray.config import StageConfig, StrictModel, load_config
from synthfar_ray.labels import CLASS_FIELDS, ClassField
from synthfar_ray.paths import InputPath, OutputPath, WeightsLocation

METHODS: tuple[str, ...] = ("random", "cl-sam", "cr-sam", "quality", "rl")
Method = Literal["random", "cl-sam", "cr-sam", "quality", "rl"]

Combine = Literal["product", "mean", "min"]  # cl-sam: how the per-field probabilities combine


class QualityRanking(StrictModel):
    """`synthfar sample method=quality`: rank rows by a weighted mean of quality columns, each turned
    into its percentile rank within the set (so columns of different scales weigh as told). Rows
    that fail the hard checks rank below every row that passes."""

    folder: InputPath | None = Field(None, description="a quality folder; default: run `synthfar quality` on the "
                                                        "synthetic set with the stage's real set, classifier and seed")
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"label_agreement": 1.0, "p_real": 0.5},
        description="quality column -> weight (label_agreement, p_<label>, p_real, faces, pixel_std, "
                    "pose_centre_error (lower is better, ranked reversed) ...)")
    drop_blank: bool = True
    drop_duplicates: bool = True
    require_face: bool = False


class ScorerTrain(StrictModel):
    """Small training budget for the models the sample and quality stages train themselves (cl-sam
    classifier when none is given, cr-sam discriminators)."""

    backbone: str = Field("resnet18", description="model.build_backbone name (tiny, resnet18/34/50/101, timm/...)")
    pretrained: WeightsLocation = Field(None, description="local backbone weights file, or 'torchvision' (hub cache)")
    image_size: int = Field(64, ge=8, description="side of the square inputs")
    steps: int = Field(300, ge=1, description="optimizer steps (per discriminator: each fold trains its own)")
    batch_size: int = Field(64, ge=2, description="discriminator: half real, half synthetic")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = Field(True, description="paper augmentations on the training batches")
    max_rows: int = Field(20000, ge=2, description="discriminator: rows read per domain (random, seeded), "
                                                   "held decoded in memory")
    cross_fit_folds: int = Field(2, ge=2, le=20, description=(
        "cr-sam: synthetic train rows are split into this many folds (seeded hash of the id); fold f is "
        "scored by a discriminator trained on the other folds, so no row is scored by a model that saw it. "
        "Costs one discriminator training per fold (parallel Ray tasks); with more folds each "
        "discriminator sees more of the synthetic set"))
    center_crop: int | None = Field(None, ge=8, description="real images: centre square crop side before resizing "
                                                            "(FairFace 448 px: 300), as in train.py")
    synthetic_center_crop: int | None = Field(None, ge=8, description="synthetic images: the same")
    use_gpu: bool | None = Field(None, description="default: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="classifier: CPUs of its Ray Train worker")
    data_cpus: float = Field(0.5, gt=0, description="classifier: CPUs per Ray Data decode task")


class RLSettings(StrictModel):
    """Budget and hyper-parameters of the RL sampler (synthfar_ray.rl_sampler's docstring explains the method)."""

    episodes: int = Field(30, ge=1, description="policy updates; a re-run with more continues the stored state")
    children_per_episode: int = Field(4, ge=1, description="policy samples per episode, each a child trained as "
                                                           "a Ray task; even = mirrored pairs")
    reference_children: int = Field(4, ge=1, description="children trained once on random selections of the same "
                                                         "K: their mean accuracy is reward 0")
    child_steps: int = Field(150, ge=1, description="optimizer steps of each child")
    child_batch_size: int = Field(32, ge=2, description="child batch size")
    child_lr: float = Field(3e-3, gt=0, description="child Adam learning rate")
    image_size: int = Field(32, ge=8, description="side of the square images the children see")
    center_crop: int | None = Field(None, ge=8, description="real images: centre square crop side before resizing")
    synthetic_center_crop: int | None = Field(None, ge=8, description="synthetic images: the same")
    max_val_rows: int = Field(2000, ge=1, description="real val rows the reward is measured on (seeded pick)")
    policy_lr: float = Field(0.1, gt=0, description="actor Adam learning rate (mean and log-std of the weights)")
    critic_lr: float = Field(0.01, gt=0, description="critic (scalar value) Adam learning rate: Adam moves the "
                                                      "value about this much per episode, so keep it near the "
                                                      "reward scale (rewards are accuracy gains, ~0.01-0.1)")
    init_std: float = Field(1.0, gt=0, description="initial std of the weight distribution (standardised features)")
    min_std: float = Field(0.05, gt=0, description="lower clamp of the learned std")
    max_std: float = Field(3.0, gt=0, description="upper clamp of the learned std")
    learn_std: bool = Field(True, description="learn the exploration std (else it stays init_std)")
    entropy: float = Field(0.0, ge=0, description="entropy bonus weight (keeps exploring)")
    cpus_per_child: float = Field(1.0, gt=0, description="CPUs of each child's Ray task")


class SampleConfig(StageConfig):
    synthetic: InputPath = Field(description="synthetic dataset URI (its split=='train' rows are scored)")
    real: InputPath = Field(description="real dataset URI (its split=='train' rows are used)")
    real_subset: Literal[25, 50, 75, 100] = Field(100, description="real rows with subset <= this")
    method: Method = "cl-sam"
    k: int | None = Field(None, ge=1, description="absolute number of synthetic rows to keep ...")
    k_multiple: float | None = Field(1.0, gt=0, description="... or a multiple of the real training set size")
    class_key: list[ClassField] = Field(default_factory=lambda: list(CLASS_FIELDS),
                                        description="fields that make a class for top-K per class")
    combine: Combine = Field("product", description="cl-sam: how the per-field probabilities combine")
    redistribute: bool = Field(False, description="give the shortfall of short classes to the other classes")
    classifier: InputPath | None = Field(None, description="cl-sam: checkpoint URI of a model trained on real data")
    scorer_train: ScorerTrain = ScorerTrain()
    quality: QualityRanking = Field(default_factory=QualityRanking, description="method quality: which columns "
                                    "of a `synthfar quality` folder rank the rows, with what weights (its folder "
                                    "also gives method rl its features)")
    rl: RLSettings = Field(default_factory=RLSettings, description="method rl: budget and hyper-parameters")
    output: OutputPath | None = Field(None, description="selection URI; default <synthetic>/_selections/<method>-<K>")
    reuse_scores: bool = Field(True, description="use cached scores of the same inputs (by content) and settings")
    seed: int = Field(0, description="random scores, cr-sam folds and scorer training")
    batch_size: int = Field(64, ge=1, description="scoring batch")
    num_actors: int | None = Field(None, ge=1, description="scoring actors; default: one per GPU, else 1")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")

    @model_validator(mode="before")
    @classmethod
    def _k_replaces_default_multiple(cls, data: Any) -> Any:
        # `k=500` alone means "500 rows": drop the default multiple instead of calling it ambiguous.
        if isinstance(data, dict) and data.get("k") is not None and "k_multiple" not in data:
            data = {**data, "k_multiple": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SampleConfig":
        if (self.k is None) == (self.k_multiple is None):
            raise ValueError("set exactly one of k (rows) and k_multiple (x real training rows); "
                             "to replace a config's k_multiple on the command line: k=N k_multiple=null")
        if not self.class_key or len(set(self.class_key)) != len(self.class_key):
            raise ValueError(f"class_key must list distinct fields of {CLASS_FIELDS}, got {self.class_key}")
        return self


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args, stage_parser

    p = stage_parser(subparsers, "sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(SampleConfig, args.config, args.overrides)
    from synthfar_ray.sampling import run_sample  # pandas, pyarrow, the scorers: only once the config is valid

    result = run_sample(cfg)
    print(f"{result.method}: kept {result.chosen} rows (K={result.k}) over {len(result.per_class)} classes "
          f"in {result.seconds:.1f} s -> {result.output}")
    if result.precision is not None:
        print(f"label precision (all three labels match the picture): chosen {result.precision['chosen']['all']:.3f}, "
              f"all scored rows {result.precision['pool']['all']:.3f}")
    return 0
