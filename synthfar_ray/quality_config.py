"""`synthfar quality DATASET [--real REAL] [--classifier CKPT] [key=value ...]`: which rows of a
synthetic set are worth training on, measured per row and for the set.

Per row (one Ray Data job, `QualityActor`, over every row of the dataset), keyed by id:
- decoded, blank, pixel_std: the image decodes; it is not near-constant (quality_checks.is_blank);
- faces, face_x/y/w/h: OpenCV Haar face boxes (count; the largest, in fractions of the image);
- pose_centre_error, pose_size_ratio: the largest box against the head the requested pose placed
  (poses.py's skeleton geometry for diffusion rows, faces.py's for procedural rows);
- phash, duplicate_of: 64-bit perceptual hash; the smallest id of the row's near-duplicate group
  (null when the row is unique), found over the whole set on the driver (hash candidates confirmed
  by an 8x8 colour thumbnail, see quality_checks);
- p_<field>, pred_<field>, conf_<field> (ethnicity, gender, age_bin) and pred_age: with a classifier
  trained on real data (`--classifier`, or a small one trained here on `--real`): p(stated label),
  the predicted label and its probability; label_agreement is the product of p(stated) over the
  fields (cl-sam's default score);
- p_real: with `--real` and `realism: true`, the cr-sam discriminator's p(real | x), cross-fitted
  (train split only; the same cached scores `synthfar sample method=cr-sam` uses).

Set level (summary.json + summary.md): detection rate, blank and near-duplicate rates, agreement
per field, diversity per ethnicity (mean pairwise distance in the classifier's embedding) and the
Fréchet distance between synthetic and real embeddings in that same space (the FID formula, but not
FID: Inception weights cannot be fetched here). On a procedural set (render_* truth columns) it also
reports how well label_agreement separates rows whose picture shows the label from rows where it
does not (AUC per field).

Output: `<dataset>/_quality/<fingerprint>/` with quality.parquet, summary.json, summary.md and
_manifest.json (written last: it marks the folder complete). The fingerprint is of what the columns
depend on, by content (the dataset's parts, the classifier's weights, the real set, the settings),
so a re-run with the same inputs reuses the folder. `_`-prefixed folders are skipped by Parquet
readers of the dataset.

This module is the stage's config and command line, with the quality settings train's config
embeds (`quality_filter`, `relabel`; sample's `quality` ranking is in synthfar_ray.sampling_config).
The stage itself is synthfar_ray.quality, imported when it runs: validating a quality or train
config (and failing fast on a bad one) needs neither pandas nor the scorers.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Literal

from pydantic import Field

from synthfar_ray import quality_checks as qc
from synthfar_ray.config import StageConfig, StrictModel, load_config
from synthfar_ray.labels import CLASS_FIELDS, ClassField
from synthfar_ray.paths import InputPath
from synthfar_ray.sampling_config import ScorerTrain


class QualityFilter(StrictModel):
    """Train on the synthetic rows that pass these thresholds of a `synthfar quality` folder (with a
    selection too: the rows in both). A row without the column a threshold needs (no classifier, or
    p_real outside the train split) fails that threshold."""

    folder: InputPath = Field(description="a quality folder: <dataset>/_quality/<fingerprint>")
    min_agreement: dict[ClassField, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="per label: the smallest p(stated label) kept, e.g. {ethnicity: 0.3}")
    min_p_real: float | None = Field(None, ge=0, le=1, description="cr-sam realism")
    require_face: bool = Field(False, description="the face detector found at least one face")
    drop_duplicates: bool = Field(True, description="keep one row of each near-duplicate group (the smallest id)")
    drop_blank: bool = Field(True, description="drop undecodable and near-constant images")


class Relabel(StrictModel):
    """Train on the classifier's label where it finds the stated label implausible (p(stated) at most
    `max_p_stated`; ages: its exact age when p(stated age bin) is that low and the ages are far
    apart). The changed rows are recorded in the run folder (relabelled.parquet: id, field, stated,
    new). Measured on the ground-truth domain (tests/test_quality.py): a rule on the prediction's
    confidence alone broke more clean labels than it fixed noisy ones (p(pred) >= 0.6: 43 fixed,
    48 broken); the stated label's implausibility is the signal (p(stated) < 0.05: 37 fixed, 5 broken)."""

    folder: InputPath = Field(description="a quality folder made with a classifier trained on real data")
    fields: list[Literal["ethnicity", "gender", "age"]] = Field(default_factory=lambda: ["ethnicity"], min_length=1)
    max_p_stated: float = Field(0.05, ge=0, le=1, description="a label is replaced when the classifier gives it at "
                                "most this probability (age: its age bin)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="... and gives its own prediction at least this")
    age_tolerance: float = Field(10.0, ge=0, description="age: replaced only when the predicted age is further "
                                 "than this many years from the stated one")


class QualityConfig(StageConfig):
    dataset: InputPath = Field(description="synthetic dataset URI (every row is checked)")
    real: InputPath | None = Field(None, description="real dataset URI: trains the classifier when none is given, "
                                                     "the realism discriminator, and the Fréchet reference")
    real_subset: Literal[25, 50, 75, 100] = Field(100, description="real rows with subset <= this")
    classifier: InputPath | None = Field(None, description="checkpoint of a model trained on real data (label "
                                                           "agreement, relabelling, embeddings)")
    fields: list[ClassField] = Field(default_factory=lambda: list(CLASS_FIELDS),
                                     description="labels whose agreement is measured")
    realism: bool = Field(True, description="with real: cr-sam p(real) per train row (trains the discriminators)")
    duplicate_distance: int = Field(3, ge=0, le=3, description="near duplicates: phash bits that may differ")
    duplicate_thumb_diff: float = Field(qc.MAX_THUMB_DIFF, ge=0, description="near duplicates: largest mean "
                                        "difference of their 8x8 colour thumbnails (grey levels)")
    embed_rows: int = Field(2000, ge=2, description="rows per set embedded for diversity and the Fréchet distance")
    scorer_train: ScorerTrain = ScorerTrain()
    reuse: bool = Field(True, description="use a complete folder of the same inputs and settings")
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else 1")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import stage_parser

    p = stage_parser(subparsers, "quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="synthetic dataset URI")
    p.add_argument("--real", help="real dataset URI")
    p.add_argument("--classifier", help="checkpoint trained on real data")
    p.add_argument("--config", help="YAML with further QualityConfig settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. embed_rows=500")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    given = [f"dataset={args.dataset}"] + [f"{k}={v}" for k in ("real", "classifier")
                                            if (v := getattr(args, k)) is not None]
    cfg = load_config(QualityConfig, args.config, given + list(args.overrides))
    from synthfar_ray.quality import run_quality  # pandas, the scorers: only once the config is valid

    result = run_quality(cfg)
    s = result.summary
    print(f"quality: {result.rows} rows, faces found in {s['face_detection_rate']:.1%}, near duplicates "
          f"{s['near_duplicate_rate']:.1%}, blank {s['blank_rate']:.1%}"
          f"{' (reused)' if result.reused else ''} -> {result.folder}")
    return 0
