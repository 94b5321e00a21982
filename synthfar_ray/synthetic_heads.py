"""Heads only synthetic rows can train: head pose, hair and keypoints (`train.model.synthetic_heads`).

The generators store each row's pose (`pose_yaw`, `pose_pitch`, `pose_roll`, degrees; null when a
pose folder image decided it), hair (`hair_length`, `hair_color`, vocabulary strings) and facial
keypoints (`keypoints`, see keypoints.py); real sets have none of these columns. With a head on,
its columns join the label columns: a row (or a whole dataset) without them gets unknown labels
(NaN angles and coordinates, class -1), which the masked losses and the metrics skip, so real rows
in a mix, a finetune phase or adaptation's target stream train nothing through these heads.

- `pose`: 3 outputs (yaw, pitch, roll) in degrees; the loss is smooth L1 on degrees / POSE_SCALE.
- `hair`: hair length logits (faces.HAIR_LENGTHS) and hair colour logits (faces.HAIR_COLORS),
  cross-entropy each; the strings become class indices at read time (`hair_indices`).
- `keypoints`: x, y of each point of keypoints.KEYPOINT_NAMES, fractions of the image side; the
  loss is smooth L1 per known coordinate (NaN = unknown, per point) in units of KEYPOINT_SCALE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from synthfar_ray.errors import UserError

SyntheticHead = Literal["pose", "hair", "keypoints"]
POSE_COLUMNS: tuple[str, ...] = ("pose_yaw", "pose_pitch", "pose_roll")
HAIR_COLUMNS: tuple[str, ...] = ("hair_length", "hair_color")
KEYPOINT_COLUMNS: tuple[str, ...] = ("keypoints",)
HEAD_COLUMNS: dict[str, tuple[str, ...]] = {"pose": POSE_COLUMNS, "hair": HAIR_COLUMNS, "keypoints": KEYPOINT_COLUMNS}
# The net predicts degrees / POSE_SCALE: targets of order 1, like the other heads' logits.
POSE_SCALE = 30.0
# Smooth L1's quadratic zone, in scaled units (0.1 = 3 degrees).
POSE_BETA = 0.1
# The keypoint head predicts (coordinate - 0.5) / KEYPOINT_SCALE, and its loss is in those units:
# outputs of order 1; the quadratic zone KEYPOINT_BETA is 1 % of the image side.
KEYPOINT_SCALE = 0.25
KEYPOINT_BETA = 0.04


class HairLabelError(UserError, ValueError):
    """A hair string outside the vocabulary (names the row id and the value)."""


def head_columns(heads: Iterable[str]) -> tuple[str, ...]:
    """The label columns the given synthetic heads train on, in a fixed order."""
    heads = set(heads)
    return tuple(c for head, cols in HEAD_COLUMNS.items() if head in heads for c in cols)


def hair_vocab(column: str) -> tuple[str, ...]:
    """Class names of a hair column: the index of a name is its label."""
    from synthfar_ray.faces import HAIR_COLORS, HAIR_LENGTHS

    return {"hair_length": HAIR_LENGTHS, "hair_color": tuple(HAIR_COLORS)}[column]


def hair_indices(values: Sequence, column: str, ids: Sequence | None = None) -> np.ndarray:
    """Hair strings -> int64 class indices (-1 for null); an unknown string is an error naming the
    row (its id when given) and the value."""
    vocab = hair_vocab(column)
    index = {name: i for i, name in enumerate(vocab)}
    out = np.full(len(values), -1, dtype=np.int64)
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if value not in index:
            where = f"id {ids[row]}" if ids is not None else f"row {row}"
            raise HairLabelError(f"{column} of {where} is {value!r}, not one of {list(vocab)}")
        out[row] = index[value]
    return out
