"""Facial keypoints: the one list of point names, the `keypoints` column, and the skeleton's points.

One layout for every row (`KEYPOINT_NAMES`; "right"/"left" are the subject's, so the right eye is on
the image left in a frontal view, as in OpenPose). The `keypoints` column is list<float32> of
x0, y0, x1, y1, ... in that order; NaN marks a point the row does not define, null the whole row
unknown (a dataset without the column reads as all unknown: every real set, older synthetic sets).

- Procedural rows (faces.render_keypoints) define every point the picture shows: all 15, except an
  eye, brow or mouth point turned behind the head by yaw and an ear the renderer does not draw.
- Diffusion rows define the OpenPose skeleton's face points that its ControlNet image showed
  (`SKELETON_POINTS`: nose, eyes, ears; a hidden one is NaN). They are the intended positions, not
  measured ones. The skeleton's model puts them a little differently on the face than the renderer
  does (poses.HEAD_MODEL), which is why they share names but are measured on other rows.
- Rows whose pose came from a pose folder have no stored pose: null.

A real set's sparse landmarks are another layout (`REAL_KEYPOINT_NAMES`, the `keypoints_real` column,
same frame and NaN/null rules; ingest reads them from a landmark file): the common 5-point set, but
annotated by its own convention, so its points are not a subset of the dense ones (the stand-ins'
"annotators" follow faces.render_real_keypoints). A head from the dense points learns the map
(`train.model.transfer: [keypoints]`); `BASELINE_MAP` is the fixed map it is measured against.

Frame: coordinates are fractions of the side of the image's centre square (side = min(width,
height)), pixel centres at i + 0.5: the frame training sees after transforms' centre square crop
(for a square image, the image itself). A point outside that square lies outside [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from synthfar_ray.errors import UserError

KEYPOINT_NAMES: tuple[str, ...] = (
    "right_eye", "left_eye",  # eye centres: the centre of the eye opening (not the pupil, which gazes)
    "right_eye_outer", "right_eye_inner", "left_eye_inner", "left_eye_outer",  # eye corners
    "right_brow", "left_brow",  # the middle (highest point) of each eyebrow arc
    "nose",  # nose tip, between the nostrils
    "mouth_right", "mouth_left", "mouth_centre",  # lip corners and the middle of the line between the lips
    "chin",  # lowest point of the jaw
    "right_ear", "left_ear",  # ear centres
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
KEYPOINT_INDEX: dict[str, int] = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
# NME's normaliser (inter-ocular distance): the eye centres, which both row kinds define.
INTEROCULAR: tuple[str, str] = ("right_eye", "left_eye")
# The skeleton points (poses.face_keypoints) a diffusion row carries.
SKELETON_POINTS: tuple[str, ...] = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")


# The real set's sparse layout (the stand-ins' convention, faces.render_real_keypoints): eye points are
# the eye socket's centre (the eye centre moved toward the brow), "nose" the subnasale on the face
# surface (not the protruding tip), "mouth" the top of the upper lip's middle, "chin" the soft chin
# (above the jaw's lowest point, toward the mouth).
REAL_KEYPOINT_NAMES: tuple[str, ...] = ("right_eye", "left_eye", "nose", "mouth", "chin")
NUM_REAL_KEYPOINTS = len(REAL_KEYPOINT_NAMES)
REAL_INTEROCULAR: tuple[str, str] = ("right_eye", "left_eye")  # the real set's NME normaliser
# The fixed baseline map: each real point's nearest dense equivalent.
BASELINE_MAP: dict[str, str] = {"right_eye": "right_eye", "left_eye": "left_eye", "nose": "nose",
                                "mouth": "mouth_centre", "chin": "chin"}
# Point columns and their layouts (both in the frame above, moved together by augmentation).
KEYPOINT_LAYOUTS: dict[str, tuple[str, ...]] = {"keypoints": KEYPOINT_NAMES, "keypoints_real": REAL_KEYPOINT_NAMES}


class KeypointLabelError(UserError, ValueError):
    """A `keypoints` value of the wrong length (names the row id and the length)."""


def square_frame(points: np.ndarray, width: int, height: int, crop: int | None = None) -> np.ndarray:
    """(..., 2) continuous pixel positions (pixel centres at i + 0.5) -> fractions of the side of
    the centre square (see the module doc), or of a smaller centred crop of side `crop` (the crop
    of transforms.crop_box)."""
    from synthfar_ray.transforms import crop_box

    left, top, right, _ = crop_box(width, height, crop)
    return (np.asarray(points, dtype=np.float64) - np.array([left, top])) / (right - left)


def cropped(points: np.ndarray, width: int, height: int, crop: int) -> np.ndarray:
    """(..., 2) keypoints of a width x height image (the module doc's frame) -> the same points in
    the frame of its centre crop of side `crop` (`synthfar prepare --center-crop`)."""
    from synthfar_ray.transforms import crop_box

    left, top, right, _ = crop_box(width, height, None)
    pixels = np.asarray(points, dtype=np.float64) * (right - left) + np.array([left, top])
    return square_frame(pixels, width, height, crop)


def skeleton_keypoints(pose, width: int, height: int) -> np.ndarray:
    """A diffusion row's keypoints: (NUM_KEYPOINTS, 2) float32, the skeleton's visible face points
    (poses.face_keypoints of a poses.HeadPose), NaN elsewhere."""
    from synthfar_ray.poses import face_keypoints, hidden_keypoints

    points = face_keypoints(pose, width, height)  # pixel centres at integers
    hidden = hidden_keypoints(pose)
    out = np.full((NUM_KEYPOINTS, 2), np.nan, dtype=np.float32)
    for name in SKELETON_POINTS:
        if name not in hidden:
            out[KEYPOINT_INDEX[name]] = square_frame(np.add(points[name], 0.5), width, height)
    return out


def to_column(points: np.ndarray, column: str = "keypoints") -> list[float]:
    """(K, 2) points of a column's layout (KEYPOINT_LAYOUTS) -> its flat x0, y0, x1, y1, ... list."""
    k = len(KEYPOINT_LAYOUTS[column])
    flat = np.asarray(points, dtype=np.float32).reshape(-1)
    if flat.shape != (2 * k,):
        raise ValueError(f"{column} must be ({k}, 2), got {np.shape(points)}")
    return flat.tolist()


def baseline_real(dense: np.ndarray) -> np.ndarray:
    """(N, 2 * NUM_KEYPOINTS) dense points -> (N, 2 * NUM_REAL_KEYPOINTS): BASELINE_MAP, each real
    point taken to be its nearest dense equivalent."""
    dense = np.asarray(dense).reshape(len(dense), NUM_KEYPOINTS, 2)
    return dense[:, [KEYPOINT_INDEX[BASELINE_MAP[name]] for name in REAL_KEYPOINT_NAMES]].reshape(len(dense), -1)


def keypoints_array(values: Sequence | None, n: int, ids: Sequence | None = None,
                    column: str = "keypoints") -> np.ndarray:
    """A batch's point column (`keypoints` or `keypoints_real`: lists, arrays or None per row; None
    for a dataset without the column) -> (n, 2K) float32 for the column's K points, NaN where
    unknown. A list of another length is an error naming the row (its id when given)."""
    names = KEYPOINT_LAYOUTS[column]
    out = np.full((n, 2 * len(names)), np.nan, dtype=np.float32)
    if values is None:
        return out
    if isinstance(values, np.ndarray) and values.dtype != object and values.shape == out.shape:
        return values.astype(np.float32)  # already decoded (a tensor column)
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = np.asarray(value, dtype=np.float32).reshape(-1)
        if value.shape != (2 * len(names),):
            where = f"id {ids[row]}" if ids is not None else f"row {row}"
            raise KeypointLabelError(f"{column} of {where} has {value.size} numbers, not {2 * len(names)} "
                                     f"(x, y of {', '.join(names)})")
        out[row] = value
    return out
