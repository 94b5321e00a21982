"""Head poses for the OpenPose ControlNet: sampled per image id, rendered as a face skeleton.

The paper conditions on 24 fixed OpenPose face skeletons (neck, nose, eyes, ears). Here a skeleton is
rendered from a parametric head pose (yaw, pitch, roll, scale, offset) so the pose is continuous,
seeded per image id and recorded as a label. A folder of pose images can replace the renderer.

Geometry: a rigid 3-D head model in units of the head's half-width, x to the image right, y down,
z toward the camera. Nose ahead of the eye line, ears behind and to the sides. The head points are
rotated about the head centre by yaw, then pitch, then roll, and projected orthographically. The
neck keypoint belongs to the body: it stays below the head centre and does not turn with the head.

Sign conventions: positive yaw turns the nose toward the image right; positive pitch tilts the face
up (nose moves up); positive roll rotates the face counter-clockwise as seen in the image.

Visibility rule: a head keypoint whose rotated depth z is below HIDE_DEPTH (half a head-width behind
the head centre) is hidden behind the head and not drawn, nor any limb touching it. With the
default model that hides the far ear once |yaw| exceeds about 27 degrees.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from synthfar_ray import storage
from synthfar_ray.config import StrictModel
from synthfar_ray.images import decode_image
from synthfar_ray.paths import InputPath
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

# OpenPose's 18-colour palette (RGB); keypoint k and limb k of the body model use colour k.
OPENPOSE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# COCO-18 indices of the face keypoints.
KEYPOINT_INDEX: dict[str, int] = {"nose": 0, "neck": 1, "right_eye": 14, "left_eye": 15, "right_ear": 16, "left_ear": 17}
# Head limbs with their position in OpenPose's limb list, which sets their colour.
LIMBS: tuple[tuple[str, str, int], ...] = (
    ("neck", "nose", 12),
    ("nose", "right_eye", 13),
    ("right_eye", "right_ear", 14),
    ("nose", "left_eye", 15),
    ("left_eye", "left_ear", 16),
)
LIMB_DIM = 0.6  # the common OpenPose renderer blends limbs at 60 % over the black canvas

# Head model (x right, y down, z toward the camera; unit = head half-width). "right" is the
# subject's right, which appears on the image left in a frontal view (OpenPose convention).
HEAD_MODEL: dict[str, tuple[float, float, float]] = {
    "nose": (0.0, 0.10, 1.0),
    "right_eye": (-0.40, -0.20, 0.75),
    "left_eye": (0.40, -0.20, 0.75),
    "right_ear": (-0.95, -0.05, -0.05),
    "left_ear": (0.95, -0.05, -0.05),
}
NECK_BELOW = 1.6  # neck keypoint, head half-widths below the head centre
HIDE_DEPTH = -0.5
HEAD_UNIT = 0.2  # head half-width as a fraction of min(width, height) at scale 1: a close-up
HEAD_CENTRE = (0.5, 0.42)  # head centre as fractions of (width, height) at zero offset
_REFERENCE_SIZE = 512  # stick width and circle radius are 4 px at 512 px, scaled with the image
_TAG_POSE = 0x9E01
_TAG_FOLDER = 0x9E02

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class PoseConfig(StrictModel):
    """Uniform ranges (lo, hi) for each pose parameter; angles in degrees."""

    yaw: tuple[float, float] = (-35, 35)
    pitch: tuple[float, float] = (-15, 15)
    roll: tuple[float, float] = (-10, 10)
    scale: tuple[float, float] = (0.85, 1.15)
    offset_x: tuple[float, float] = (-0.05, 0.05)  # fraction of the width
    offset_y: tuple[float, float] = (-0.05, 0.05)  # fraction of the height
    folder: InputPath | None = Field(default=None, description="folder URI of pose PNG/JPEG images to use instead of rendering")

    @field_validator("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")
    @classmethod
    def _range(cls, v: tuple[float, float], info) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"{info.field_name} range must be finite with lo <= hi, got ({lo}, {hi})")
        limits = {"yaw": (-90, 90), "pitch": (-90, 90), "roll": (-180, 180), "offset_x": (-0.5, 0.5), "offset_y": (-0.5, 0.5)}
        if info.field_name == "scale":
            if lo <= 0:
                raise ValueError(f"scale must be > 0, got ({lo}, {hi})")
        elif not (limits[info.field_name][0] <= lo and hi <= limits[info.field_name][1]):
            raise ValueError(f"{info.field_name} range must lie within {limits[info.field_name]}, got ({lo}, {hi})")
        return v


@dataclass(frozen=True)
class HeadPose:
    yaw: float  # degrees, + turns the nose toward the image right
    pitch: float  # degrees, + looks up
    roll: float  # degrees, + counter-clockwise in the image
    scale: float
    offset_x: float  # fraction of the width
    offset_y: float  # fraction of the height


def sample_pose(run_seed: int, image_id: int, cfg: PoseConfig) -> HeadPose:
    """Uniform draw in each range; a pure function of (run_seed, image_id, cfg)."""
    if run_seed < 0 or image_id < 0:
        raise ValueError(f"run_seed and image_id must be >= 0, got {run_seed}, {image_id}")
    rng = np.random.default_rng(np.random.SeedSequence([run_seed, image_id, _TAG_POSE]))
    names = ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")
    values = {n: float(rng.uniform(*getattr(cfg, n))) for n in names}
    return HeadPose(**values)


def _rotation(pose: HeadPose) -> np.ndarray:
    y, p, r = (math.radians(a) for a in (pose.yaw, pose.pitch, pose.roll))
    # Yaw about the vertical axis: nose (0,0,1) -> (sin y, 0, cos y), i.e. toward +x.
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    # Pitch about the horizontal axis: nose -> y decreases (up, since y points down).
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    # Roll in the image plane, counter-clockwise on screen with y pointing down.
    rz = np.array([[math.cos(r), math.sin(r), 0], [-math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _rotated_head(pose: HeadPose) -> dict[str, np.ndarray]:
    rot = _rotation(pose)
    return {name: rot @ np.asarray(p) for name, p in HEAD_MODEL.items()}


def hidden_keypoints(pose: HeadPose) -> frozenset[str]:
    """Head keypoints turned behind the head (rotated depth below HIDE_DEPTH); see the module doc."""
    return frozenset(name for name, p in _rotated_head(pose).items() if p[2] < HIDE_DEPTH)


def face_keypoints(pose: HeadPose, width: int, height: int) -> dict[str, tuple[float, float]]:
    """Pixel (x, y) of neck, nose, eyes and ears, hidden ones included (see hidden_keypoints)."""
    unit = HEAD_UNIT * pose.scale * min(width, height)
    cx = width * (HEAD_CENTRE[0] + pose.offset_x)
    cy = height * (HEAD_CENTRE[1] + pose.offset_y)
    points = {"neck": (cx, cy + NECK_BELOW * unit)}
    for name, p in _rotated_head(pose).items():
        points[name] = (cx + unit * float(p[0]), cy + unit * float(p[1]))
    return points


def _stroke_sizes(width: int, height: int) -> tuple[float, float]:
    """(limb half-width, keypoint radius) in pixels: 4 at 512 px, never below 1."""
    size = max(1.0, 4.0 * min(width, height) / _REFERENCE_SIZE)
    return size, size


def _fill_ellipse(canvas: np.ndarray, a: tuple[float, float], b: tuple[float, float], half_width: float,
                  color: tuple[int, int, int]) -> None:
    """Filled ellipse spanning segment a-b (semi-axes |ab|/2 and half_width), pixel centres at integers."""
    (x0, y0), (x1, y1) = a, b
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    half_len = max(math.hypot(x1 - x0, y1 - y0) / 2, half_width)
    angle = math.atan2(y1 - y0, x1 - x0)
    reach = half_len + 1
    h, w = canvas.shape[:2]
    xa, xb = max(0, math.floor(mx - reach)), min(w, math.ceil(mx + reach) + 1)
    ya, yb = max(0, math.floor(my - reach)), min(h, math.ceil(my + reach) + 1)
    if xa >= xb or ya >= yb:
        return
    yy, xx = np.mgrid[ya:yb, xa:xb]
    dx, dy = xx - mx, yy - my
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    mask = (u / half_len) ** 2 + (v / half_width) ** 2 <= 1.0
    canvas[ya:yb, xa:xb][mask] = color


def render_pose(pose: HeadPose, width: int, height: int) -> np.ndarray:
    """OpenPose-style face skeleton, HxWx3 uint8 on black: dimmed limbs, then full-colour keypoints."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    points = face_keypoints(pose, width, height)
    hidden = hidden_keypoints(pose)
    half_width, radius = _stroke_sizes(width, height)
    for a, b, limb in LIMBS:
        if a in hidden or b in hidden:
            continue
        color = tuple(int(c * LIMB_DIM) for c in OPENPOSE_COLORS[limb])
        _fill_ellipse(canvas, points[a], points[b], half_width, color)
    for name, (x, y) in points.items():
        if name in hidden:
            continue
        _fill_ellipse(canvas, (x, y), (x, y), radius, OPENPOSE_COLORS[KEYPOINT_INDEX[name]])
    return canvas


class PoseFolder:
    """A folder (local or s3://) of pose images used instead of rendered skeletons.

    Files are listed once; picks are seeded per (run_seed, image_id). Decoded, resized images are
    kept in a small LRU cache since a folder usually holds a few dozen skeletons.
    """

    _CACHE_SIZE = 64

    def __init__(self, uri: str, storage_options: StorageOptions | None, width: int, height: int):
        self.uri = uri
        self.storage = storage_options
        self.width, self.height = width, height
        names = [n for n in storage.list_files(uri, storage_options) if n.lower().endswith(IMAGE_SUFFIXES)]
        if not names:
            what = "has no PNG/JPEG images" if storage.exists(uri, storage_options) else "does not exist"
            raise ValueError(f"pose folder {uri} {what}")
        self.names: list[str] = names
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        logger.info("pose folder %s: %d images", uri, len(names))

    def __len__(self) -> int:
        return len(self.names)

    def _load(self, name: str) -> np.ndarray:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        uri = storage.join(self.uri, name)
        try:
            image = decode_image(storage.read_bytes(uri, self.storage))
        except ValueError as e:
            raise ValueError(f"pose image {uri}: {e}") from e
        if image.shape[:2] != (self.height, self.width):
            image = np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.Resampling.BILINEAR))
        self._cache[name] = image
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return image

    def pick(self, run_seed: int, image_id: int) -> tuple[str, np.ndarray]:
        """(file name, HxWx3 uint8 image at the folder's width x height), chosen by (run_seed, image_id)."""
        rng = np.random.default_rng(np.random.SeedSequence([run_seed, image_id, _TAG_FOLDER]))
        name = self.names[int(rng.integers(len(self.names)))]
        return name, self._load(name)
