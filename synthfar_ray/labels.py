"""Label vocabularies and the Parquet row schema shared by every stage."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

ClassField = Literal["ethnicity", "gender", "age_bin"]  # the labels that define a class (selection, quality)
CLASS_FIELDS: tuple[str, ...] = ("ethnicity", "gender", "age_bin")
ETHNICITIES: tuple[str, ...] = ("white", "black", "asian", "indian", "other")
GENDERS: tuple[str, ...] = ("male", "female")
# Upper edges used with bucketize (right-open bins): 0-2, 3-9, 10-19, ..., 60-69, 70+.
AGE_BIN_EDGES: tuple[int, ...] = (3, 10, 20, 30, 40, 50, 60, 70)
AGE_BIN_NAMES: tuple[str, ...] = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
NUM_AGE_BINS = len(AGE_BIN_NAMES)
AGE_CLIP = (0.0, 150.0)

# FairFace's 7 races folded into the 5 classes used everywhere else.
FAIRFACE_RACE_TO_ETHNICITY: dict[str, str] = {
    "White": "white",
    "Middle Eastern": "white",
    "Black": "black",
    "East Asian": "asian",
    "Southeast Asian": "asian",
    "Indian": "indian",
    "Latino_Hispanic": "other",
}
FAIRFACE_RACES7: tuple[str, ...] = (
    "White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern",
)
# The fold inverted: per class (ETHNICITIES order) the indices into FAIRFACE_RACES7 folded into it.
RACES7_OF_ETHNICITY: tuple[tuple[int, ...], ...] = tuple(
    tuple(i for i, r in enumerate(FAIRFACE_RACES7) if FAIRFACE_RACE_TO_ETHNICITY[r] == e) for e in ETHNICITIES)
# Per race (FAIRFACE_RACES7 order) the index of the class it folds into.
ETHNICITY_OF_RACE7: tuple[int, ...] = tuple(ETHNICITIES.index(FAIRFACE_RACE_TO_ETHNICITY[r]) for r in FAIRFACE_RACES7)


def age_to_bin(age: np.ndarray | float) -> np.ndarray:
    """Age in years -> FairFace age-bin index (0..8)."""
    return np.searchsorted(np.asarray(AGE_BIN_EDGES, dtype=np.float64), np.asarray(age, dtype=np.float64), side="right")


def ethnicity_index(name: str) -> int:
    return ETHNICITIES.index(name)


def gender_index(name: str) -> int:
    return GENDERS.index(name)


# Columns every dataset (synthetic or real) carries; stages add their own extra columns.
CORE_FIELDS: list[pa.Field] = [
    pa.field("id", pa.int64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # JPEG bytes
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("age", pa.float32()),  # null where only a bin is known (FairFace)
    pa.field("age_bin", pa.int8()),
    pa.field("gender", pa.int8()),  # 0 male, 1 female
    pa.field("ethnicity", pa.int8()),  # index into ETHNICITIES
    pa.field("source", pa.string()),
    pa.field("split", pa.string()),
]
CORE_COLUMNS: tuple[str, ...] = tuple(f.name for f in CORE_FIELDS)
SPLITS: tuple[str, ...] = ("train", "val", "test")
