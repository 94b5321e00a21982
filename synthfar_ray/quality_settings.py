"""The quality settings that other stages' configs embed (train's `quality_filter` and `relabel`,
sample's `quality` ranking). They live apart from synthfar_ray.quality, which needs pandas and the
scorers, so validating a train or sample config (and failing fast on a bad one) imports neither."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from synthfar_ray.config import StrictModel
from synthfar_ray.labels import ClassField
from synthfar_ray.paths import InputPath


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
