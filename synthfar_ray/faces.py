"""Procedural faces: a face domain with known ground truth, drawn from the attributes and head pose
that the prompt sampler and the pose sampler already draw per image id.

This is an instrument, not a face model: the pictures are cartoon heads, made so that learning,
sample selection and domain adaptation can be measured offline (no GPU, weights or downloads).

What shows in a face (all class cues come from OVERLAPPING distributions; see the tables below):
- age: proportions (a child's features sit lower on a rounder head, eyes larger, nose and jaw
  smaller, cheeks fuller until 25), skin lines (forehead lines, nasolabial folds, eye bags) growing
  from 24 to 85, paler skin and a sagging jaw; hair colour as given (the prompt sampler already
  greys hair with age);
- gender (weakly in children, fully from puberty on): jaw width and squareness, neck and shoulder
  width, eyebrow thickness and height; lips, lipstick and eye make-up for some women, facial hair
  for some adult men, receding hairline for some older men; hair length comes
  from the attributes (uniform in the sampler), so long-haired men and short-haired women occur;
- ethnicity: skin tone, eye opening, nose width and lip thickness, each a class-dependent mean with
  per-face noise; hair colour and style come from the attributes (the vocab ties them to the class).
  With `races7` (off by default) each face first draws one of FairFace's 7 races folded into its
  rendered class (White or Middle Eastern for white, East or Southeast Asian for asian) and takes
  that race's means, so the 7-race label is visible; the 5-class label does not change.

Styles make a domain gap: `synthetic` is flat colour on a plain single-colour background; `photo`
adds skin and hair texture, sphere shading, a lighting gradient, a colour cast, a cluttered
background, blur, sensor noise and (in `encode`) low JPEG quality.

Label noise imitates a text-to-image model that does not follow its prompt: with probability
`label_noise[attr]` per id the RENDERED attribute differs from the label (age from another age bin,
gender flipped, another ethnicity). `render_faces` returns the rendered values as ground truth.

Determinism: every image is a pure function of its seed, its inputs and the config. Each image draws
its random numbers from its own generators (`default_rng([seed, tag])`, one stream per concern:
labels, face, photo; races7 has its own, so turning it off leaves every image as it was), and the pixel math uses only IEEE-exact operations (+ - * /, sqrt, min/max,
floor) elementwise, with per-image trigonometry done in Python scalars, so a pixel's value does not
depend on the batch it is rendered in or on the SIMD path numpy takes. Geometry draws do not depend
on the style, so one id in both styles is the same face.

Geometry: head-local coordinates in units of the head half-width, x to the image right, y down,
origin at the head centre; HeadPose's conventions (positive yaw turns the nose to the image right,
positive pitch looks up, positive roll turns counter-clockwise in the image). Facial features live
on a vertical cylinder of radius 1 that is turned by yaw, so yaw moves them sideways and
foreshortens the far side. The framing is tighter than the OpenPose skeletons' (FACE_UNIT 0.27 of
the image side vs poses.HEAD_UNIT 0.2) so that a 64 px image shows the face large enough to learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from synthfar_ray.config import StrictModel
from synthfar_ray.errors import UserError
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import AGE_BIN_EDGES, ETHNICITIES, GENDERS, RACES7_OF_ETHNICITY

# Head half-width as a fraction of the image side at scale 1, and the head centre (fractions).
FACE_UNIT = 0.27
FACE_CENTRE = (0.5, 0.45)
SYNTHETIC_JPEG_QUALITY = 95
# The packaged vocab's hair lengths (synthfar_ray/data/vocab.yaml), shortest first.
HAIR_LENGTHS: tuple[str, ...] = ("very short", "short", "chin-length", "medium length", "shoulder-length", "long")
# Hair colours of the packaged vocab (natural and grey) as RGB in [0, 1].
HAIR_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.07, 0.06, 0.06),
    "dark brown": (0.20, 0.13, 0.08),
    "brown": (0.36, 0.23, 0.13),
    "light brown": (0.53, 0.38, 0.24),
    "blonde": (0.88, 0.75, 0.46),
    "dirty blonde": (0.68, 0.57, 0.36),
    "auburn": (0.48, 0.19, 0.09),
    "red": (0.72, 0.29, 0.12),
    "grey": (0.58, 0.58, 0.57),
    "white": (0.92, 0.91, 0.89),
    "silver": (0.76, 0.78, 0.81),
    "salt and pepper": (0.30, 0.30, 0.30),  # drawn as dark and grey strands
}
LABEL_NOISE_ATTRS: tuple[str, ...] = ("age", "gender", "ethnicity")
MAX_AGE = 120.0
LABEL_NOISE_MAX_AGE = 85  # ages drawn for a changed age label lie in [0, 85), the sampler's range

# Per-ethnicity means (index = labels.ETHNICITIES: white, black, asian, indian, other). Each face adds
# its own noise (the *_SD values), so neighbouring classes overlap.
SKIN_LIGHTNESS = np.array([0.80, 0.27, 0.70, 0.48, 0.59])
SKIN_LIGHTNESS_SD = 0.085
SKIN_YELLOW = np.array([0.00, 0.00, 0.025, 0.010, 0.018])  # +green -blue: warmer, yellower tone
SKIN_PINK = np.array([0.03, 0.00, 0.00, 0.00, 0.01])
EYE_OPENING = np.array([0.58, 0.58, 0.46, 0.60, 0.55])  # eye height / eye width
EYE_OPENING_SD = 0.06
NOSE_WIDTH = np.array([0.115, 0.165, 0.135, 0.140, 0.135])  # half-width of the nostrils
NOSE_WIDTH_SD = 0.018
LIP_THICKNESS = np.array([0.040, 0.058, 0.044, 0.048, 0.048])  # half-height of the lips
LIP_THICKNESS_SD = 0.008
BROW_EXTRA = np.array([0.0, 0.0, -0.004, 0.010, 0.004])
P_LIGHT_IRIS = np.array([0.45, 0.0, 0.0, 0.02, 0.08])  # blue or green eyes

# `races7` (RenderConfig): the same means per FairFace race (index = labels.FAIRFACE_RACES7: White,
# Black, Latino_Hispanic, East Asian, Southeast Asian, Indian, Middle Eastern). Black, Indian and
# Latino_Hispanic keep their class's means; the races that fold into one class differ: Middle
# Eastern is darker (2 lightness SDs), warmer, wider-nosed and rarely light-eyed than White, and
# Southeast Asian darker, rounder-eyed and wider-nosed than East Asian, each by about one to two
# per-face SDs, so the pairs overlap like the classes do.
SKIN_LIGHTNESS7 = np.array([0.83, 0.27, 0.59, 0.74, 0.60, 0.48, 0.66])
SKIN_YELLOW7 = np.array([0.00, 0.00, 0.018, 0.028, 0.020, 0.010, 0.012])
SKIN_PINK7 = np.array([0.035, 0.00, 0.01, 0.00, 0.00, 0.00, 0.01])
EYE_OPENING7 = np.array([0.57, 0.58, 0.55, 0.43, 0.51, 0.60, 0.60])
NOSE_WIDTH7 = np.array([0.110, 0.165, 0.135, 0.128, 0.146, 0.140, 0.130])
LIP_THICKNESS7 = np.array([0.038, 0.058, 0.048, 0.042, 0.048, 0.048, 0.045])
BROW_EXTRA7 = np.array([0.0, 0.0, 0.004, -0.005, -0.002, 0.010, 0.012])
P_LIGHT_IRIS7 = np.array([0.55, 0.0, 0.08, 0.0, 0.0, 0.02, 0.10])

# Hair styles with a visible effect; any other style name draws plain hair.
STYLE_VOLUME = {"curly": 0.16, "afro": 0.32, "wavy": 0.07, "messy": 0.09, "spiky": 0.10, "twists": 0.14,
                "dreadlocks": 0.10, "box braids": 0.08, "braided": 0.03, "layered": 0.05}
STYLE_MAX_LENGTH = {"buzz cut": 0, "fade": 0, "crew cut": 1, "bob": 2}  # caps the hair length index
STYLE_UPDO = frozenset({"bun", "ponytail"})
STYLE_STRANDS = frozenset({"braided", "box braids", "cornrows", "dreadlocks", "twists"})
STYLE_FRINGE_P = {"bob": 0.8, "slicked back": 0.0, "side-parted": 0.5, "straight": 0.3, "layered": 0.35}
DEFAULT_FRINGE_P = 0.2

_TAG_LABELS = 0xFACE01
_TAG_FACE = 0xFACE02
_TAG_PHOTO = 0xFACE03
_TAG_SEED = 0xFACE04
_TAG_RACE = 0xFACE05  # races7 only: a stream of its own, so with the option off no draw moves
# Pixels rendered together (64 images at 64 px): enough to amortise numpy's per-call cost, small
# enough to keep the temporaries in cache (and memory bounded at 256 px).
_CHUNK_PIXELS = 64 * 64 * 64
_NOISE_GRID = 9  # low-frequency texture grid per image


class PhotoStyle(StrictModel):
    """Strength knobs of the `photo` style; `strength` scales all of them at once (0 = no effects)."""

    strength: float = Field(1.0, ge=0, le=3)
    noise: float = Field(0.035, ge=0, le=0.3, description="sensor noise sd, fraction of full scale")
    blur: float = Field(1.0, ge=0, le=4, description="largest Gaussian blur sigma, pixels at 64 px (scaled with size)")
    lighting: float = Field(0.35, ge=0, le=1, description="brightness gradient across the image and face shading")
    color_cast: float = Field(0.08, ge=0, le=0.5, description="sd of the per-channel gains")
    clutter: int = Field(8, ge=0, le=40, description="random shapes in the background")
    texture: float = Field(0.10, ge=0, le=0.5, description="skin and hair texture amplitude")
    jpeg_quality: int = Field(40, ge=5, le=100, description="JPEG quality used by encode()")
    # A SYSTEMATIC shift: the same colour response for every photo image (a camera's), unlike the
    # per-image nuisance above. Off by default; the adaptation experiments turn it on (see README).
    # Both left out of a dumped config at their default (as races7 below), so the fingerprint of
    # datasets made before them does not change and those datasets still resume.
    tint: tuple[float, float, float] = Field((1.0, 1.0, 1.0), exclude_if=lambda v: tuple(v) == (1.0, 1.0, 1.0),
                                             description="per-channel (RGB) gains every photo "
                                             "image gets, e.g. [0.8, 0.62, 0.5]: darker and warmer (1 = none)")
    contrast: float = Field(1.0, ge=0.1, le=3, exclude_if=lambda v: v == 1.0, description="contrast about mid-grey every photo image gets (1 = none)")

    @field_validator("tint")
    @classmethod
    def _gains(cls, v):
        if not all(0.1 <= g <= 3.0 for g in v):
            raise ValueError(f"tint gains must lie in [0.1, 3], got {list(v)}")
        return v



class RenderConfig(StrictModel):
    size: int = Field(64, ge=32, le=256, description="image side in pixels")
    style: Literal["synthetic", "photo"] = "synthetic"
    photo: PhotoStyle = PhotoStyle()
    # Probability per id that the rendered attribute differs from its label; one number for all three.
    label_noise: float | dict[Literal["age", "gender", "ethnicity"], float] = 0.0
    races7: bool = Field(False, exclude_if=lambda v: not v, description="draw each face's appearance from one of FairFace's 7 races "
                         "folded into its rendered class (uniformly; adds render_race7); off: the 5 classes' means")

    @field_validator("label_noise")
    @classmethod
    def _rates(cls, v):
        rates = v.values() if isinstance(v, dict) else [v]
        for r in rates:
            if not (0.0 <= r <= 1.0):
                raise ValueError(f"label_noise rates must lie in [0, 1], got {v}")
        return v

    def noise_rate(self, attr: str) -> float:
        if attr not in LABEL_NOISE_ATTRS:
            raise ValueError(f"no label noise for {attr!r} (known: {', '.join(LABEL_NOISE_ATTRS)})")
        v = self.label_noise
        return float(v.get(attr, 0.0)) if isinstance(v, dict) else float(v)

    @property
    def jpeg_quality(self) -> int:
        return self.photo.jpeg_quality if self.style == "photo" else SYNTHETIC_JPEG_QUALITY


@dataclass(frozen=True)
class FaceBatch:
    """Labels and hair of N faces, as plain arrays (see prompts.FaceAttributes for one face)."""

    age: np.ndarray  # float years
    gender: np.ndarray  # 0 male, 1 female (labels.GENDERS)
    ethnicity: np.ndarray  # index into labels.ETHNICITIES
    hair_length: np.ndarray  # index into HAIR_LENGTHS
    hair_color: Sequence[str]  # keys of HAIR_COLORS
    hair_style: Sequence[str] | None = None  # optional; styles without an effect draw plain hair

    def __len__(self) -> int:
        return len(np.asarray(self.age))

    @classmethod
    def from_attributes(cls, attrs: Sequence) -> FaceBatch:
        """From prompts.FaceAttributes (gender/ethnicity/hair_length as the vocab's strings)."""
        for i, a in enumerate(attrs):
            if a.hair_length not in HAIR_LENGTHS:
                raise ValueError(f"hair_length[{i}] = {a.hair_length!r} is not one of {list(HAIR_LENGTHS)}")
            if a.gender not in GENDERS:
                raise ValueError(f"gender[{i}] = {a.gender!r} is not one of {list(GENDERS)}")
            if a.ethnicity not in ETHNICITIES:
                raise ValueError(f"ethnicity[{i}] = {a.ethnicity!r} is not one of {list(ETHNICITIES)}")
        return cls(
            age=np.array([a.age for a in attrs], dtype=np.float64),
            gender=np.array([GENDERS.index(a.gender) for a in attrs], dtype=np.int64),
            ethnicity=np.array([ETHNICITIES.index(a.ethnicity) for a in attrs], dtype=np.int64),
            hair_length=np.array([HAIR_LENGTHS.index(a.hair_length) for a in attrs], dtype=np.int64),
            hair_color=[a.hair_color for a in attrs],
            hair_style=[a.hair_style for a in attrs],
        )

    def take(self, index) -> FaceBatch:
        idx = np.atleast_1d(np.arange(len(self))[index])
        return FaceBatch(
            age=np.asarray(self.age)[idx], gender=np.asarray(self.gender)[idx],
            ethnicity=np.asarray(self.ethnicity)[idx], hair_length=np.asarray(self.hair_length)[idx],
            hair_color=[self.hair_color[i] for i in idx],
            hair_style=None if self.hair_style is None else [self.hair_style[i] for i in idx],
        )


@dataclass(frozen=True)
class PoseBatch:
    """Head poses of N faces (poses.HeadPose fields as arrays; angles in degrees)."""

    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    scale: np.ndarray
    offset_x: np.ndarray
    offset_y: np.ndarray

    def __len__(self) -> int:
        return len(np.asarray(self.yaw))

    @classmethod
    def from_poses(cls, poses: Sequence) -> PoseBatch:
        return cls(**{f: np.array([getattr(p, f) for p in poses], dtype=np.float64) for f in POSE_FIELDS})

    @classmethod
    def frontal(cls, n: int) -> PoseBatch:
        z = np.zeros(n)
        return cls(yaw=z, pitch=z, roll=z, scale=np.ones(n), offset_x=z, offset_y=z)

    def take(self, index) -> PoseBatch:
        idx = np.atleast_1d(np.arange(len(self))[index])
        return PoseBatch(**{f: np.asarray(getattr(self, f))[idx] for f in POSE_FIELDS})


POSE_FIELDS: tuple[str, ...] = ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")
_POSE_LIMITS = {"yaw": (-90, 90), "pitch": (-90, 90), "roll": (-180, 180), "scale": (0.2, 3.0),
                "offset_x": (-0.5, 0.5), "offset_y": (-0.5, 0.5)}


class VocabError(UserError, ValueError):
    """A prompt vocabulary with hair the renderer cannot draw."""


def check_vocab(vocab) -> None:
    """Refuse a prompts.Vocab whose hair lengths or colours the renderer does not know (names them)."""
    hair = vocab.hair
    colours = set(hair.colors) | set(hair.grey_colors)
    for e in vocab.ethnicities.values():
        colours |= set(e.hair_colors or ())
        for country in (*e.countries.values(), *e.races7_countries.values()):
            colours |= set(country.hair_colors or ())
    bad_len = [x for x in hair.lengths if x not in HAIR_LENGTHS]
    bad_col = sorted(c for c in colours if c not in HAIR_COLORS)
    if bad_len or bad_col:
        raise VocabError(
            "the procedural generator cannot draw this vocab's "
            + "; ".join(filter(None, [
                f"hair.lengths {bad_len} (known: {list(HAIR_LENGTHS)})" if bad_len else "",
                f"hair colours {bad_col} (known: {list(HAIR_COLORS)})" if bad_col else ""])))


def face_seeds(run_seed: int, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 63-bit render seed per image id: a pure function of (run_seed, image_id)."""
    ids = np.asarray(image_ids, dtype=np.int64).ravel()
    if run_seed < 0 or (ids < 0).any():
        raise ValueError(f"run_seed and image ids must be >= 0, got run_seed={run_seed}, min id={ids.min(initial=0)}")
    out = np.empty(len(ids), dtype=np.int64)
    for i, image_id in enumerate(ids):
        state = np.random.SeedSequence([run_seed, int(image_id), _TAG_SEED]).generate_state(1, np.uint64)[0]
        out[i] = int(state >> np.uint64(1))
    return out


# ----------------------------------------------------------------------------------------------
# Validation


def _field(name: str, values, n: int, dtype, lo=None, hi=None, integer=False) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the other inputs, got {arr.shape}")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        raise ValueError(f"{name} must be finite numbers, got dtype {arr.dtype}")
    if integer and arr.dtype.kind == "f" and (arr != np.floor(arr)).any():
        raise ValueError(f"{name} must hold integers, got {arr[arr != np.floor(arr)][:3].tolist()}")
    bad = np.zeros(n, dtype=bool)
    if lo is not None:
        bad |= arr < lo
    if hi is not None:
        bad |= arr > hi
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] = {arr[i]} is outside [{lo}, {hi}]")
    return arr.astype(dtype)


def _validate(attrs: FaceBatch, poses: PoseBatch, seeds) -> dict:
    n = len(np.asarray(attrs.age))
    if np.asarray(attrs.age).ndim != 1:
        raise ValueError(f"FaceBatch.age must be one-dimensional, got shape {np.asarray(attrs.age).shape}")
    v = {
        "age": _field("FaceBatch.age", attrs.age, n, np.float64, 0, MAX_AGE),
        "gender": _field("FaceBatch.gender", attrs.gender, n, np.int64, 0, 1, integer=True),
        "ethnicity": _field("FaceBatch.ethnicity", attrs.ethnicity, n, np.int64, 0, len(ETHNICITIES) - 1, integer=True),
        "hair_length": _field("FaceBatch.hair_length", attrs.hair_length, n, np.int64, 0, len(HAIR_LENGTHS) - 1, integer=True),
    }
    colors = list(attrs.hair_color)
    if len(colors) != n:
        raise ValueError(f"FaceBatch.hair_color must have {n} entries like the other inputs, got {len(colors)}")
    for i, c in enumerate(colors):
        if c not in HAIR_COLORS:
            raise ValueError(f"FaceBatch.hair_color[{i}] = {c!r} is not a known hair colour ({', '.join(HAIR_COLORS)})")
    v["hair_color"] = colors
    styles = [""] * n if attrs.hair_style is None else list(attrs.hair_style)
    if len(styles) != n or not all(isinstance(s, str) for s in styles):
        raise ValueError(f"FaceBatch.hair_style must be None or {n} strings")
    v["hair_style"] = styles
    for f in POSE_FIELDS:
        v[f] = _field(f"PoseBatch.{f}", getattr(poses, f), n, np.float64, *_POSE_LIMITS[f])
    s = np.asarray(seeds)
    if s.shape != (n,) or s.dtype.kind not in "iu":
        raise ValueError(f"seeds must be an integer array of shape ({n},), got {s.dtype} {s.shape}")
    if s.dtype.kind == "i" and (s < 0).any():
        raise ValueError(f"seeds must be >= 0, got {int(s.min())}")
    v["seeds"] = [int(x) for x in s]
    v["n"] = n
    return v


# ----------------------------------------------------------------------------------------------
# Label noise


_AGE_LOWS = (0, *AGE_BIN_EDGES)
_AGE_HIGHS = (*AGE_BIN_EDGES, LABEL_NOISE_MAX_AGE)


def _rendered_from(v: dict, cfg: RenderConfig) -> dict[str, np.ndarray]:
    """The attributes actually drawn; each id draws the same numbers whatever the rates, so a
    higher rate changes a superset of the ids a lower rate changes."""
    p_age, p_gender, p_eth = (cfg.noise_rate(a) for a in LABEL_NOISE_ATTRS)
    age = v["age"].copy()
    gender = v["gender"].copy()
    eth = v["ethnicity"].copy()
    n_bins = len(_AGE_LOWS)
    for i, seed in enumerate(v["seeds"]):
        rng = np.random.default_rng([seed, _TAG_LABELS])
        u = rng.random(4)
        other_bin = int(rng.integers(0, n_bins - 1))
        other_eth = int(rng.integers(0, len(ETHNICITIES) - 1))
        if u[0] < p_age:
            b = int(np.searchsorted(AGE_BIN_EDGES, age[i], side="right"))
            b2 = other_bin + (other_bin >= b)
            age[i] = float(_AGE_LOWS[b2] + math.floor(u[3] * (_AGE_HIGHS[b2] - _AGE_LOWS[b2])))
        if u[1] < p_gender:
            gender[i] = 1 - gender[i]
        if u[2] < p_eth:
            eth[i] = other_eth + (other_eth >= eth[i])
    rendered = {"render_age": age.astype(np.float32), "render_gender": gender.astype(np.int8),
                "render_ethnicity": eth.astype(np.int8)}
    if cfg.races7:
        rendered["render_race7"] = _races7(v["seeds"], eth)
    return rendered


def _races7(seeds: list[int], eth: np.ndarray) -> np.ndarray:
    """One FairFace race per face, uniform among those its rendered class folds (own stream)."""
    out = np.empty(len(seeds), dtype=np.int8)
    for i, seed in enumerate(seeds):
        races = RACES7_OF_ETHNICITY[int(eth[i])]
        u = np.random.default_rng([seed, _TAG_RACE]).random()
        out[i] = races[min(int(u * len(races)), len(races) - 1)]
    return out


def rendered_attributes(attrs: FaceBatch, poses: PoseBatch, cfg: RenderConfig, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """The `rendered` half of render_faces' result without drawing the images (cheap)."""
    return _rendered_from(_validate(attrs, poses, seeds), cfg)


# ----------------------------------------------------------------------------------------------
# Per-face parameters

# Standard normals and uniforms each face draws from its face stream, by name.
_Z = ("skin", "skin_hue", "jaw_w", "jaw_h", "jaw_sq", "eye_y", "eye_sep", "eye_w", "eye_open", "brow",
      "brow_y", "nose_w", "lip", "mouth_w", "nose_len", "neck", "wrinkle", "hairline", "hair_len", "hair_tone",
      "gaze", "smile", "ears")
_U = ("beard", "beard_kind", "lipstick", "iris", "iris_kind", "recede", "fringe", "bg_r", "bg_g", "bg_b",
      "shirt_r", "shirt_g", "shirt_b", "blush", "part", "bun_side", "lashes")
_ZI = {k: i for i, k in enumerate(_Z)}
_UI = {k: i for i, k in enumerate(_U)}


def _col(v) -> np.ndarray:
    """(n,) -> (n, 1, 1) float32, for broadcasting against (n, H, W) pixel arrays."""
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _rgb(v) -> np.ndarray:
    """(n, 3) -> (n, 3, 1, 1) float32, for broadcasting against (n, 3, H, W) images."""
    return np.asarray(v, dtype=np.float32)[:, :, None, None]


@dataclass
class _Face:
    """Per-face parameters of one chunk, (n,) float64 arrays unless noted."""

    n: int
    unit: np.ndarray  # head half-width in pixels
    cx: np.ndarray
    cy: np.ndarray
    c_roll: np.ndarray
    s_roll: np.ndarray
    c_yaw: np.ndarray
    s_yaw: np.ndarray
    s_pitch: np.ndarray
    p: dict  # named scalar parameters, (n,)
    colors: dict  # named colours, (n, 3)


def _appearance(rendered: dict, sl: slice) -> dict[str, np.ndarray]:
    """Per-face means of the ethnicity cues: the 7 races' (render_race7, when drawn) or the classes'."""
    if "render_race7" in rendered:
        r = rendered["render_race7"][sl].astype(np.int64)
        tables = (SKIN_LIGHTNESS7, SKIN_YELLOW7, SKIN_PINK7, EYE_OPENING7, NOSE_WIDTH7, LIP_THICKNESS7, BROW_EXTRA7,
                  P_LIGHT_IRIS7)
    else:
        r = rendered["render_ethnicity"][sl].astype(np.int64)
        tables = (SKIN_LIGHTNESS, SKIN_YELLOW, SKIN_PINK, EYE_OPENING, NOSE_WIDTH, LIP_THICKNESS, BROW_EXTRA, P_LIGHT_IRIS)
    names = ("skin", "yellow", "pink", "eye_open", "nose_w", "lip", "brow", "light_iris")
    return {k: t[r] for k, t in zip(names, tables)}


def _face_params(v: dict, rendered: dict, sl: slice, size: int) -> _Face:
    seeds = v["seeds"][sl]
    n = len(seeds)
    Z = np.empty((n, len(_Z)))
    U = np.empty((n, len(_U)))
    trig = np.empty((n, 5))
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([seed, _TAG_FACE])
        Z[i] = rng.standard_normal(len(_Z))
        U[i] = rng.random(len(_U))
        j = sl.start + i
        yaw, pitch, roll = (math.radians(v[k][j]) for k in ("yaw", "pitch", "roll"))
        trig[i] = (math.cos(roll), math.sin(roll), math.cos(yaw), math.sin(yaw), math.sin(pitch))

    def z(k):
        return Z[:, _ZI[k]]

    def u(k):
        return U[:, _UI[k]]

    age = rendered["render_age"][sl].astype(np.float64)
    male = rendered["render_gender"][sl] == 0
    eth = rendered["render_ethnicity"][sl].astype(np.int64)
    look = _appearance(rendered, sl)
    child = np.clip((16.0 - age) / 16.0, 0.0, 1.0)  # 1 newborn .. 0 from 16
    old = np.clip((age - 30.0) / 55.0, 0.0, 1.0)  # 0 up to 30 .. 1 at 85
    lined = np.clip((age - 24.0) / 61.0, 0.0, 1.0)  # skin lines: 0 up to 24 .. 1 at 85
    youth = np.clip((25.0 - age) / 25.0, 0.0, 1.0)  # cheek fullness, fading until 25
    puberty = np.clip((age - 11.0) / 7.0, 0.0, 1.0)
    sex = np.where(male, 1.0, -1.0) * (0.15 + 0.85 * puberty)  # sexual dimorphism: weak in children
    adult_f = (~male) * puberty
    hair_len = v["hair_length"][sl].copy()
    styles = v["hair_style"][sl]
    hair_names = v["hair_color"][sl]

    p = {}
    p["head_b"] = 0.97 + 0.08 * child
    p["jaw_a"] = 0.81 + 0.05 * sex + 0.035 * z("jaw_w") + 0.05 * child + 0.05 * youth + 0.04 * old
    p["jaw_b"] = 1.0 - 0.30 * child + 0.04 * z("jaw_h") + 0.10 * old
    p["jaw_sq"] = np.clip(0.42 + 0.28 * sex + 0.15 * z("jaw_sq") - 0.3 * child + 0.1 * old, 0.0, 1.0)
    p["eye_y"] = -0.06 + 0.20 * child + 0.025 * z("eye_y")
    p["eye_x"] = 0.37 + 0.02 * z("eye_sep") - 0.02 * child
    p["eye_w"] = 0.165 + 0.045 * child + 0.012 * z("eye_w") - 0.015 * old
    p["eye_h"] = p["eye_w"] * (look["eye_open"] + 0.12 * child - 0.1 * old + EYE_OPENING_SD * z("eye_open"))
    p["brow_t"] = np.maximum(0.045 + 0.022 * sex + look["brow"] + 0.009 * z("brow") - 0.015 * child, 0.022)
    # Brows: women's sit a little higher (sex < 0 lifts them).
    p["brow_y"] = p["eye_y"] - p["eye_h"] - 0.075 + 0.02 * np.minimum(sex, 0.0) + 0.015 * z("brow_y") + 0.02 * child
    p["nose_y"] = p["eye_y"] + 0.34 - 0.12 * child + 0.025 * z("nose_len") + 0.02 * old
    p["nose_w"] = np.maximum(look["nose_w"] + NOSE_WIDTH_SD * z("nose_w") - 0.035 * child + 0.01 * old, 0.06)
    p["lip_t"] = np.maximum(look["lip"] + 0.010 * adult_f + LIP_THICKNESS_SD * z("lip") - 0.012 * old - 0.01 * child, 0.02)
    p["mouth_y"] = p["nose_y"] + 0.22 - 0.06 * child + 0.02 * old
    p["mouth_w"] = 0.20 + 0.018 * z("mouth_w") - 0.06 * child
    p["smile"] = 0.03 * z("smile")
    p["gaze"] = 0.03 * np.clip(z("gaze"), -2, 2)
    p["neck_w"] = 0.40 + 0.055 * sex + 0.03 * z("neck") - 0.06 * child
    p["shoulder_y"] = 1.62 - 0.15 * child
    p["shoulder_a"] = 1.95 + 0.22 * sex + 0.1 * z("neck") - 0.45 * child
    p["wrinkle"] = lined * (0.8 + 0.2 * np.clip(z("wrinkle"), -2, 2)) + 0.2 * lined * lined
    p["ear_b"] = 0.19 + 0.015 * z("ears")

    # Hair.
    for i, s in enumerate(styles):
        if s in STYLE_MAX_LENGTH:
            hair_len[i] = min(hair_len[i], STYLE_MAX_LENGTH[s])
    updo = np.array([s in STYLE_UPDO for s in styles]) & (hair_len >= 2)
    p["hair_vol"] = np.array([STYLE_VOLUME.get(s, 0.04) for s in styles]) * np.where(hair_len <= 1, 0.3, 1.0)
    p["hair_vol"] = p["hair_vol"] + np.where(hair_len == 0, -0.02, 0.0)
    # How far the hanging hair reaches (head units below the head centre) per length index.
    reach = np.array([-0.45, -0.1, 1.05, 1.4, 1.85, 2.7])[hair_len] + 0.08 * z("hair_len")
    p["hair_end"] = np.where(updo, -0.1, reach)
    recede = male & (u("recede") < 0.55 * np.clip((age - 25.0) / 40.0, 0.0, 1.0))
    p["hairline"] = p["eye_y"] - 0.53 - 0.04 * z("hairline") - 0.22 * recede
    fringe_p = np.array([STYLE_FRINGE_P.get(s, DEFAULT_FRINGE_P) for s in styles])
    fringe = (u("fringe") < fringe_p) & (hair_len >= 1) & ~recede
    p["fringe_y"] = np.where(fringe, p["eye_y"] - 0.27, -9.0)
    p["part"] = np.where(np.array([s == "side-parted" for s in styles]), 0.35 * np.sign(u("part") - 0.5), 0.0)
    p["buzz"] = np.where(hair_len == 0, 0.6, 1.0)  # alpha of a buzz cut over the scalp
    p["bun"] = updo.astype(np.float64)
    p["bun_x"] = 0.25 * (u("bun_side") - 0.5)
    p["strands"] = np.array([s in STYLE_STRANDS for s in styles], dtype=np.float64)
    p["salt_pepper"] = np.array([c == "salt and pepper" for c in hair_names], dtype=np.float64)

    # Facial hair: some adult men (the chance grows from 16 to 26).
    has_beard = male & (u("beard") < 0.5 * np.clip((age - 16.0) / 10.0, 0.0, 1.0))
    kind = u("beard_kind")
    p["stubble"] = (has_beard & (kind < 0.4)).astype(np.float64)
    p["beard"] = (has_beard & (kind >= 0.6)).astype(np.float64)
    p["moustache"] = (has_beard & (kind >= 0.4)).astype(np.float64)
    p["lipstick"] = (adult_f > 0.5) & (u("lipstick") < 0.4)
    p["lashes"] = ((adult_f > 0.5) & (u("lashes") < 0.4)).astype(np.float64)
    p["blush"] = np.clip(0.12 * child + 0.08 * adult_f * (u("blush") < 0.5), 0, 1)

    # Colours.
    light = np.clip(look["skin"] + SKIN_LIGHTNESS_SD * z("skin") + 0.03 * child - 0.02 * old, 0.05, 1.0)
    dark_skin = np.array([0.17, 0.10, 0.06])
    light_skin = np.array([0.99, 0.86, 0.76])
    skin = dark_skin + (light_skin - dark_skin) * light[:, None]
    yellow = look["yellow"] + 0.012 * z("skin_hue")
    skin = skin + np.stack([look["pink"] + 0.02 * child, yellow, -yellow], axis=1)
    # Skin loses colour with age (toward its own grey level, so the lightness cue is kept).
    grey = skin.mean(axis=1, keepdims=True)
    skin = np.clip(skin + 0.25 * lined[:, None] * (grey - skin), 0.0, 1.0)
    hair = np.array([HAIR_COLORS[c] for c in hair_names]) * (1.0 + 0.08 * z("hair_tone"))[:, None]
    hair = np.clip(hair, 0.0, 1.0)
    lips = skin * np.array([0.86, 0.60, 0.60]) + np.array([0.08, 0.01, 0.02])
    lips = np.where(p["lipstick"][:, None], 0.45 * lips + 0.55 * np.array([0.72, 0.10, 0.20]), lips)
    brown_iris = np.array([0.28, 0.17, 0.09])
    light_iris = np.where((u("iris_kind") < 0.65)[:, None], np.array([[0.28, 0.48, 0.70]]), np.array([[0.34, 0.48, 0.28]]))
    iris = np.where((u("iris") < look["light_iris"])[:, None], light_iris, brown_iris * (0.6 + 0.4 * (eth == 0))[:, None])
    grey_hair = np.array([c in ("grey", "white", "silver", "salt and pepper") for c in hair_names])
    brows = np.where(grey_hair[:, None], 0.55 * hair + 0.1, 0.72 * hair + 0.04 * (1 - hair))
    brows = brows * (1 - 0.25 * child)[:, None] + 0.25 * child[:, None] * skin * 0.8
    colors = {
        "skin": skin, "hair": hair, "lips": lips, "iris": iris, "brows": brows,
        "beard": np.where(grey_hair[:, None], hair, 0.8 * hair),
        "background": 0.45 + 0.5 * np.stack([u("bg_r"), u("bg_g"), u("bg_b")], axis=1),
        "shirt": 0.12 + 0.75 * np.stack([u("shirt_r"), u("shirt_g"), u("shirt_b")], axis=1),
    }
    unit = FACE_UNIT * size * v["scale"][sl]
    cx = size * (FACE_CENTRE[0] + v["offset_x"][sl])
    cy = size * (FACE_CENTRE[1] + v["offset_y"][sl])
    return _Face(n=n, unit=unit, cx=cx, cy=cy, c_roll=trig[:, 0], s_roll=trig[:, 1], c_yaw=trig[:, 2],
                 s_yaw=trig[:, 3], s_pitch=trig[:, 4], p=p, colors=colors)


# ----------------------------------------------------------------------------------------------
# Drawing helpers (pixel arrays are (n, H, W) float32; images (n, 3, H, W) float32 in [0, 1])


class _Canvas:
    def __init__(self, unit: np.ndarray):
        self.u = _col(unit)  # pixels per head unit, (n,1,1)

    def sat(self, d):
        """Coverage of a pixel whose centre lies d head units inside an edge (anti-aliased)."""
        return np.clip(0.5 + d * self.u, 0.0, 1.0)


def _ellipse_inside(x, y, x0, y0, a, b):
    """Approximate signed distance inside the ellipse (positive inside), by f / |grad f|."""
    dx = (x - x0) / a
    dy = (y - y0) / b
    f = dx * dx + dy * dy - 1.0
    g = 2.0 * np.sqrt(dx * dx / (a * a) + dy * dy / (b * b)) + 1e-3
    return -f / g


def _over(img, m, color):
    """Composite colour (n,3,1,1) or (n,3,H,W) over img where the coverage is m (n,H,W)."""
    img += m[:, None] * (color - img)


def _shade(img, m, factor):
    """Multiply img by factor (broadcastable to (n,3,H,W)) where the coverage is m (n,H,W)."""
    img *= 1.0 + m[:, None] * (factor - 1.0)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """(n, G, G) -> (n, size, size) by bilinear interpolation (exact arithmetic only)."""
    g = grid.shape[-1]
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (g - 1) / size
    i0 = np.minimum(np.floor(pos).astype(np.int64), g - 2)
    w = (pos - i0).astype(np.float32)
    rows = grid[:, i0, :] * (1 - w)[None, :, None] + grid[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _blur(img: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Separable blur of (n,3,H,W) with per-image symmetric kernels (n, 2R+1), edge padding."""
    r = (weights.shape[1] - 1) // 2
    if r == 0:
        return img
    h, w_ = img.shape[-2:]
    k = [weights[:, j].astype(np.float32)[:, None, None, None] for j in range(2 * r + 1)]
    pad = np.pad(img, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    out = k[0] * pad[:, :, 0:h]
    for j in range(1, 2 * r + 1):
        out += k[j] * pad[:, :, j:j + h]
    pad = np.pad(out, ((0, 0), (0, 0), (0, 0), (r, r)), mode="edge")
    out = k[0] * pad[:, :, :, 0:w_]
    for j in range(1, 2 * r + 1):
        out += k[j] * pad[:, :, :, j:j + w_]
    return out


# ----------------------------------------------------------------------------------------------
# The face


def _draw(f: _Face, size: int, photo: dict | None) -> np.ndarray:
    n = f.n
    cv = _Canvas(f.unit)
    sat = cv.sat
    p = {k: _col(val) for k, val in f.p.items()}
    c = {k: _rgb(val) for k, val in f.colors.items()}

    # Head-local coordinates: undo the offset, scale and roll.
    pix = (np.arange(size, dtype=np.float32) + 0.5)
    unit = _col(f.unit)
    dx = (pix[None, None, :] - _col(f.cx)) / unit
    dy = (pix[None, :, None] - _col(f.cy)) / unit
    cr, sr = _col(f.c_roll), _col(f.s_roll)
    x = cr * dx - sr * dy
    y = sr * dx + cr * dy
    # Feature coordinates on a yawed cylinder of radius 1 (see the module doc).
    cy_, sy_ = _col(f.c_yaw), _col(f.s_yaw)
    xn = np.clip(x, -1.0, 1.0)
    cz = np.sqrt(1.0 - xn * xn)
    fx = xn * cy_ - cz * sy_
    front = cz * cy_ + xn * sy_  # cosine of the surface angle: < 0 on the back of the head
    fy = y + 0.55 * _col(f.s_pitch) * np.maximum(front, 0.0)
    ax = np.abs(fx)  # mirrored: left and right features in one pass
    facing = np.clip(front * 4.0, 0.0, 1.0)

    # Background.
    img = np.empty((n, 3, size, size), dtype=np.float32)
    img[:] = c["background"]
    if photo is not None:
        _photo_background(img, photo, size)

    # Shoulders, hair hanging behind, neck.
    torso = sat(_ellipse_inside(x, y, 0.0, p["shoulder_y"] + 1.1, p["shoulder_a"], 1.1))
    _over(img, torso, c["shirt"])
    hw = 1.04 + p["hair_vol"] + 0.14 * np.clip(y - 0.9, 0.0, 1.5)
    end = p["hair_end"] - 0.25 * (x / hw) * (x / hw)
    back = sat(np.minimum(np.minimum(hw - np.abs(x), end - y), y + 0.6)) * (p["hair_end"] > 0.0)
    hair_col = _hair_field(c, p, x, y, photo)
    _over(img, back, hair_col)
    bun = sat(_ellipse_inside(x, y, p["bun_x"], -1.12 - p["hair_vol"], 0.33, 0.27)) * p["bun"]
    _over(img, bun, hair_col)
    neck = sat(np.minimum(p["neck_w"] - np.abs(x), y - 0.3)) * sat(p["shoulder_y"] + 0.5 - y + 0.3)
    _over(img, neck, c["skin"] * 0.84)

    # Head: cranium ellipse united with a superellipse jaw (squareness mixes exponent 2 and 4).
    cran = _ellipse_inside(x, y, 0.0, -0.22, 1.0, p["head_b"])
    jx = x / p["jaw_a"]
    jy = (y - 0.18) / p["jaw_b"]
    jx2, jy2 = jx * jx, jy * jy
    sq = p["jaw_sq"]
    fj = (1.0 - sq) * (jx2 + jy2) + sq * (jx2 * jx2 + jy2 * jy2) - 1.0
    gx = (2.0 * (1.0 - sq) * jx + 4.0 * sq * jx2 * jx) / p["jaw_a"]
    gy = (2.0 * (1.0 - sq) * jy + 4.0 * sq * jy2 * jy) / p["jaw_b"]
    jaw = -fj / (np.sqrt(gx * gx + gy * gy) + 1e-3)
    head = sat(np.maximum(cran, jaw))
    skin = c["skin"]
    if photo is not None:
        skin = skin * _photo_skin(photo, cz)[:, None]
    _over(img, head, skin)

    # Ears: the one turned toward the camera is drawn over the head, the other hides behind it.
    ear_y = p["eye_y"] + 0.14
    for side in (-1.0, 1.0):
        facing_s = -side * _col(f.s_yaw)
        ear_x = side * 0.97 * _col(f.c_yaw)
        ear_a = 0.09 + 0.1 * np.maximum(facing_s, 0.0)
        ear = sat(_ellipse_inside(x, y, ear_x, ear_y, ear_a, p["ear_b"])) * (facing_s > -0.08)
        _over(img, ear, c["skin"] * 0.93)
        inner = sat(_ellipse_inside(x, y, ear_x, ear_y, ear_a * 0.45, p["ear_b"] * 0.55)) * ear
        _shade(img, inner * 0.5, 0.8)

    face = head * facing
    # Cheeks.
    blush = np.clip(1.0 - ((ax - 0.48) ** 2 + (fy - p["nose_y"]) ** 2) / 0.03, 0.0, 1.0) * face * p["blush"]
    _over(img, blush, _rgb(np.tile([[0.95, 0.45, 0.45]], (n, 1))))

    # Skin lines of age: forehead lines, nasolabial folds, eye bags.
    w = p["wrinkle"]
    lines = np.zeros_like(x)
    for k in range(3):
        ly = p["hairline"] + 0.16 + 0.09 * k
        lines = np.maximum(lines, sat(0.02 - np.abs(fy - ly - 0.1 * ax * ax)) * sat(0.45 - ax) * (ly < p["eye_y"] - 0.2))
    # Fold from beside the nostril (nose_w + .05, nose_y) down to beyond the mouth corner.
    t = np.clip((fy - p["nose_y"]) / (p["mouth_y"] + 0.08 - p["nose_y"]), 0.0, 1.0)
    fold_x = p["nose_w"] + 0.06 + t * (p["mouth_w"] - p["nose_w"] + 0.02)
    fold = sat(0.022 - np.abs(ax - fold_x)) * (t > 0.0) * (t < 1.0)
    bag = sat(0.02 - np.abs(_ellipse_inside(ax, fy, p["eye_x"], p["eye_y"] + p["eye_h"] * 0.6, p["eye_w"] * 0.85, p["eye_h"] * 1.3)))
    bag = bag * (fy > p["eye_y"] + p["eye_h"] * 0.9)
    lines = np.maximum(np.maximum(lines, fold), bag)
    _shade(img, lines * face * np.minimum(w * 1.1, 1.0), 0.5)

    # Stubble and beard, under the mouth and nose.
    # Beard line: just above the mouth near the middle, rising to the sideburns at the sides.
    lower = face * sat(fy - p["mouth_y"] + 0.12 + 0.55 * np.clip(ax - 0.25, 0.0, 1.0)) * sat(0.93 - ax)
    jawline = lower * sat(fy - p["mouth_y"] + 0.05 + 0.2 * (0.9 - ax))
    beard_col = c["beard"]
    _over(img, jawline * p["beard"] * 0.92, beard_col)
    _over(img, lower * p["stubble"] * 0.32, beard_col)

    # Nose: bridge shadow, nostrils, tip outline. The tip stands out, so it moves further with yaw.
    nfx = fx - 0.22 * _col(f.s_yaw)
    nax = np.abs(nfx)
    bridge = sat(0.022 - np.abs(nfx - 0.07)) * sat(fy - p["eye_y"] - 0.05) * sat(p["nose_y"] - 0.04 - fy)
    _shade(img, bridge * face * 0.6, 0.8)
    nostril = sat(_ellipse_inside(nax, fy, p["nose_w"] * 0.55, p["nose_y"], p["nose_w"] * 0.33, 0.032))
    _shade(img, nostril * face, 0.45)
    alar = sat(0.016 - np.abs(_ellipse_inside(nax, fy, 0.0, p["nose_y"] - 0.03, p["nose_w"], 0.075)))
    _shade(img, alar * (fy > p["nose_y"] - 0.03) * face * 0.7, 0.7)

    # Mouth: lips (curved by the smile), then the line between them.
    curve = p["smile"] * (fx / p["mouth_w"]) * (fx / p["mouth_w"])
    my = fy + curve
    lips = sat(_ellipse_inside(fx, my, 0.0, p["mouth_y"], p["mouth_w"], p["lip_t"]))
    _over(img, lips * face, c["lips"])
    mline = sat(0.013 - np.abs(my - p["mouth_y"])) * sat(p["mouth_w"] - np.abs(fx))
    _over(img, mline * face, c["lips"] * 0.45)
    moustache = sat(np.minimum(fy - p["nose_y"] - 0.03, p["mouth_y"] - p["lip_t"] * 0.7 - my)) * sat(p["mouth_w"] + 0.03 - ax)
    _over(img, moustache * face * p["moustache"] * 0.95, beard_col)

    # Eyes: lid outline, white, iris, pupil, highlight.
    ex = np.abs(fx) - p["eye_x"]
    # Lid outline; made-up eyes (some adult women) get a thick upper line.
    lid = p["eye_h"] + 0.02 + 0.035 * p["lashes"] * (fy < p["eye_y"])
    outline = sat(_ellipse_inside(ax, fy, p["eye_x"], p["eye_y"], p["eye_w"] + 0.025 + 0.02 * p["lashes"], lid))
    _over(img, outline * face, _rgb(np.tile([[0.12, 0.08, 0.07]], (n, 1))))
    white = sat(_ellipse_inside(ax, fy, p["eye_x"], p["eye_y"], p["eye_w"], p["eye_h"]))
    _over(img, white * face, _rgb(np.tile([[0.94, 0.93, 0.90]], (n, 1))))
    ix = ex * np.sign(fx) - p["gaze"]  # gaze moves both irises the same way
    r_iris = np.minimum(p["eye_w"] * 0.52, p["eye_h"] * 1.15)
    iris = sat(r_iris - np.sqrt(ix * ix + (fy - p["eye_y"]) ** 2)) * white
    _over(img, iris * face, c["iris"])
    pupil = sat(r_iris * 0.45 - np.sqrt(ix * ix + (fy - p["eye_y"]) ** 2)) * white
    _over(img, pupil * face, _rgb(np.tile([[0.03, 0.03, 0.03]], (n, 1))))

    # Eyebrows: arcs above the eyes.
    bx = (ax - p["eye_x"] - 0.02) / (p["eye_w"] + 0.06)
    brow_c = p["brow_y"] - 0.05 * (1.0 - bx * bx)
    brow = sat(p["brow_t"] * 0.5 - np.abs(fy - brow_c)) * sat((1.0 - np.abs(bx)) * (p["eye_w"] + 0.06))
    _over(img, brow * face, c["brows"])

    # Hair over the head: scalp cap above the hairline (and over the sides and back of the head),
    # fringe, and curtains over the face's sides for chin length and longer.
    vol = p["hair_vol"]
    cap = sat(_ellipse_inside(x, y, 0.0, -0.16 - vol * 0.5, 1.05 + vol, 1.07 + vol))
    hairline = p["hairline"] + 0.5 * (fx - p["part"] * 0.2) ** 2 * ax * ax
    above = np.maximum(np.maximum(sat(hairline - fy), sat(p["fringe_y"] - fy)),
                       np.maximum(sat(ax - 0.84) * sat(p["eye_y"] + 0.02 - y), sat(0.1 - front)))
    top = cap * above * sat(0.05 - y + (p["hair_end"] > 0.9) * 9.0)
    curtain = sat(ax - 0.8) * sat(p["hair_end"] - 0.35 - y) * sat(y + 0.9) * (p["hair_end"] > 0.9) * sat(hw - np.abs(x))
    front_hair = np.maximum(top * p["buzz"], curtain)
    _over(img, front_hair, hair_col)

    if photo is not None:
        img = _photo_finish(img, photo, x, y, size)
    return img


def _hair_field(c, p, x, y, photo):
    """Hair colour per pixel: salt-and-pepper and braid-like styles get strands."""
    base = c["hair"]
    sx = x * 15.0 + y * 3.0
    stripes = (sx - np.floor(sx) < 0.4).astype(np.float32)  # exact, unlike sin
    sp = p["salt_pepper"]
    dark = np.asarray([0.18, 0.18, 0.18], dtype=np.float32)[None, :, None, None]
    greyish = np.asarray([0.62, 0.62, 0.61], dtype=np.float32)[None, :, None, None]
    field = base + sp[:, None] * ((dark + (greyish - dark) * stripes[:, None]) - base)  # (n,3,H,W)
    braid = np.abs((x * 7.0 - np.floor(x * 7.0)) - 0.5) * 2.0  # 0 at strand centre, 1 between
    field = field * (1.0 - 0.45 * (p["strands"] * braid * braid)[:, None])
    if photo is not None:
        field = field * (1.0 + photo["texture"][:, None] * (0.8 * photo["lowf"] + 0.6 * photo["grain"])[:, None])
    return field


# ----------------------------------------------------------------------------------------------
# Photo style


def _photo_params(v: dict, sl: slice, cfg: RenderConfig) -> dict:
    ps = cfg.photo
    s = ps.strength
    size = cfg.size
    seeds = v["seeds"][sl]
    n = len(seeds)
    k_clutter = min(int(round(ps.clutter * s)), 60)
    max_sigma = ps.blur * s * size / 64.0
    radius = int(math.ceil(2.5 * max_sigma)) if max_sigma > 0.05 else 0
    Z = np.empty((n, 8))
    U = np.empty((n, 8))
    clutter = np.empty((n, k_clutter, 9))
    lowf = np.empty((n, _NOISE_GRID, _NOISE_GRID), dtype=np.float32)
    grain = np.empty((n, size, size), dtype=np.float32)
    sensor = np.empty((n, 3, size, size), dtype=np.float32)
    kernels = np.zeros((n, 2 * radius + 1))
    light_dir = np.empty((n, 2))
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([seed, _TAG_PHOTO])
        Z[i] = rng.standard_normal(8)
        U[i] = rng.random(8)
        clutter[i] = rng.random((k_clutter, 9))
        lowf[i] = rng.standard_normal((_NOISE_GRID, _NOISE_GRID), dtype=np.float32)
        grain[i] = rng.standard_normal((size, size), dtype=np.float32)
        sensor[i] = rng.standard_normal((3, size, size), dtype=np.float32)
        angle = 2.0 * math.pi * U[i, 0]
        light_dir[i] = (math.cos(angle), math.sin(angle))
        sigma = max_sigma * (0.3 + 0.7 * U[i, 1])
        if radius:
            ker = [math.exp(-0.5 * (j / sigma) ** 2) for j in range(-radius, radius + 1)]
            total = math.fsum(ker)
            kernels[i] = [k / total for k in ker]
    # The systematic shift, scaled by strength like every other knob (strength 0: none).
    tint = np.array([1.0 + s * (g - 1.0) for g in ps.tint])
    contrast = 1.0 + s * (ps.contrast - 1.0)
    identity = bool((tint == 1.0).all()) and contrast == 1.0  # then skipped: the same bytes as without the knobs
    return {
        "tint": None if identity else tint, "contrast": contrast,
        "texture": _col(ps.texture * s * (0.6 + 0.8 * U[:, 2])),
        "lighting": _col(ps.lighting * s * (0.5 + U[:, 3])),
        "light_x": _col(light_dir[:, 0]), "light_y": _col(light_dir[:, 1]),
        "gain": _rgb(np.clip(1.0 + ps.color_cast * s * Z[:, 0:3], 0.3, 2.0)),
        "brightness": _col(1.0 + 0.08 * s * Z[:, 3]),
        "noise": _col(ps.noise * s * (0.5 + U[:, 4])),
        "bg_grad": _rgb(0.25 * s * np.stack([Z[:, 4], Z[:, 5], Z[:, 6]], axis=1) * 0.3),
        "clutter": clutter,
        "lowf": _upsample(lowf, size),
        "grain": grain,
        "sensor": sensor,
        "kernels": kernels,
    }


def _photo_background(img, ph, size):
    """A gradient wall with random rectangles and ellipses in random colours."""
    pix = (np.arange(size, dtype=np.float32) + 0.5) / size
    img += ph["bg_grad"] * (pix[None, None, :, None] - 0.5) * 2.0
    xs = pix[None, None, :]
    ys = pix[None, :, None]
    px = np.float32(size)
    for k in range(ph["clutter"].shape[1]):
        q = ph["clutter"][:, k, :]
        x0, y0 = _col(q[:, 0]), _col(q[:, 1])
        a, b = _col(0.05 + 0.3 * q[:, 2]), _col(0.05 + 0.3 * q[:, 3])
        color = _rgb(0.5 * (0.15 + 0.7 * q[:, 4:5]) + 0.5 * (0.1 + 0.8 * q[:, 5:8]))  # muted: half grey
        rect = np.minimum(a - np.abs(xs - x0), b - np.abs(ys - y0))
        ell = _ellipse_inside(xs, ys, x0, y0, a, b)
        d = np.where(_col(q[:, 8]) < 0.5, rect, ell)
        m = np.clip(0.5 + d * px, 0.0, 1.0)
        _over(img, m, color)


def _photo_skin(ph, cz):
    """Sphere shading and blotchy texture multiplying the skin colour, (n, H, W)."""
    shade = 1.0 - 0.35 * ph["lighting"] * (1.0 - cz)
    return shade * (1.0 + ph["texture"] * (0.6 * ph["lowf"] + 0.5 * ph["grain"]))


def _photo_finish(img, ph, x, y, size):
    light = 1.0 + 0.35 * ph["lighting"] * np.clip(ph["light_x"] * x + ph["light_y"] * y, -2.0, 2.0)
    img *= light[:, None]
    img *= ph["gain"] * ph["brightness"][:, None]
    if ph["tint"] is not None:  # elementwise only (see Determinism); skipped at the default
        img = (img - 0.5) * np.float32(ph["contrast"]) + 0.5
        img *= ph["tint"].astype(np.float32)[None, :, None, None]
    img = _blur(img, ph["kernels"])
    img += ph["noise"][:, None] * ph["sensor"]
    return img


# ----------------------------------------------------------------------------------------------
# Public entry points


def render_faces(attrs: FaceBatch, poses: PoseBatch, cfg: RenderConfig, seeds: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw N faces -> (uint8 images (N, size, size, 3), rendered attributes).

    `rendered` holds the TRUE attributes of each picture: render_age (float32 years),
    render_gender (int8), render_ethnicity (int8); they differ from the labels only under
    label noise. With cfg.races7 also render_race7 (int8, index into labels.FAIRFACE_RACES7).
    Each image is a pure function of (seed, its inputs, cfg); see the module doc.
    """
    v = _validate(attrs, poses, seeds)
    rendered = _rendered_from(v, cfg)
    n, size = v["n"], cfg.size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        face = _face_params(v, rendered, sl, size)
        photo = _photo_params(v, sl, cfg) if cfg.style == "photo" else None
        img = _draw(face, size, photo)
        img = np.clip(img * 255.0 + 0.5, 0.0, 255.0)
        out[sl] = np.floor(img).astype(np.uint8).transpose(0, 2, 3, 1)
    return out, rendered


def encode(images: np.ndarray, cfg: RenderConfig) -> list[bytes]:
    """JPEG bytes per image at the style's quality (photo: cfg.photo.jpeg_quality, synthetic 95)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return [encode_jpeg(a, quality=cfg.jpeg_quality) for a in arr]


def sample_batch(n: int, run_seed: int = 0, first_id: int = 0) -> tuple[FaceBatch, PoseBatch, np.ndarray]:
    """Ids first_id .. first_id+n-1 as the generate stage draws them: attributes from
    prompts.sample_attributes (default PromptConfig), poses from poses.sample_pose (default
    PoseConfig) and render seeds from face_seeds. For tests, benchmarks and calibration."""
    from synthfar_ray.poses import PoseConfig, sample_pose
    from synthfar_ray.prompts import PromptConfig, sample_attributes

    ids = range(first_id, first_id + n)
    prompt_cfg, pose_cfg = PromptConfig(), PoseConfig()
    attrs = FaceBatch.from_attributes([sample_attributes(run_seed, i, prompt_cfg) for i in ids])
    poses = PoseBatch.from_poses([sample_pose(run_seed, i, pose_cfg) for i in ids])
    return attrs, poses, face_seeds(run_seed, list(ids))


# ----------------------------------------------------------------------------------------------
# Keypoints


def _feature_position(f: _Face, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head-local (x, y) where _draw puts the face feature at face coordinates (fx, fy), and whether
    it is on the visible half of the cylinder: _draw maps x -> fx = sin(asin(x) - yaw) and
    y -> fy = y + 0.55 sin(pitch) cos(asin(fx)), so x = sin(asin(fx) + yaw)."""
    yaw = np.arctan2(f.s_yaw, f.c_yaw)
    theta = np.arcsin(np.clip(fx, -1.0, 1.0)) + yaw
    return np.sin(theta), fy - 0.55 * f.s_pitch * np.sqrt(1.0 - fx * fx), np.cos(theta) > 0.0


def _keypoint_pixels(f: _Face) -> np.ndarray:
    """(n, NUM_KEYPOINTS, 2) continuous pixel positions (pixel centres at i + 0.5), NaN where hidden."""
    from synthfar_ray.keypoints import KEYPOINT_NAMES

    p = f.p
    zero = np.zeros(f.n)
    brow_x, brow_y = p["eye_x"] + 0.02, p["brow_y"] - 0.05  # the arc's top: bx = 0 in _draw
    features = {  # face coordinates (fx, fy) of the features on the cylinder
        "right_eye": (-p["eye_x"], p["eye_y"]), "left_eye": (p["eye_x"], p["eye_y"]),
        "right_eye_outer": (-p["eye_x"] - p["eye_w"], p["eye_y"]),
        "right_eye_inner": (-p["eye_x"] + p["eye_w"], p["eye_y"]),
        "left_eye_inner": (p["eye_x"] - p["eye_w"], p["eye_y"]),
        "left_eye_outer": (p["eye_x"] + p["eye_w"], p["eye_y"]),
        "right_brow": (-brow_x, brow_y), "left_brow": (brow_x, brow_y),
        "nose": (0.22 * f.s_yaw, p["nose_y"]),  # the tip is drawn shifted by 0.22 sin(yaw)
        "mouth_right": (-p["mouth_w"], p["mouth_y"] - p["smile"]),  # the smile curve lifts the corners
        "mouth_left": (p["mouth_w"], p["mouth_y"] - p["smile"]),
        "mouth_centre": (zero, p["mouth_y"]),
    }
    ear_y = p["eye_y"] + 0.14
    head = {  # head-local (x, y) of parts drawn off the cylinder, and whether _draw draws them
        "chin": (zero, 0.18 + p["jaw_b"], np.ones(f.n, dtype=bool)),
        "right_ear": (-0.97 * f.c_yaw, ear_y, f.s_yaw > -0.08),
        "left_ear": (0.97 * f.c_yaw, ear_y, -f.s_yaw > -0.08),
    }
    out = np.empty((f.n, len(KEYPOINT_NAMES), 2))
    for k, name in enumerate(KEYPOINT_NAMES):
        if name in features:
            x, y, shown = _feature_position(f, *features[name])
        else:
            x, y, shown = head[name]
        px, py = _to_pixels(f, x, y)
        out[:, k, 0] = np.where(shown, px, np.nan)
        out[:, k, 1] = np.where(shown, py, np.nan)
    return out


def render_keypoints(attrs: FaceBatch, poses: PoseBatch, cfg: RenderConfig, seeds: np.ndarray) -> np.ndarray:
    """Where render_faces draws each face's keypoints (keypoints.KEYPOINT_NAMES): (N, K, 2) float32,
    fractions of the image side (pixel centres at i + 0.5), NaN for a point turned behind the head
    (an eye, brow or mouth point past the silhouette) or an ear the renderer does not draw. Exact:
    the inverse of _draw's mapping from pixels to face coordinates. Cheap (no pixels drawn)."""
    v = _validate(attrs, poses, seeds)
    rendered = _rendered_from(v, cfg)
    face = _face_params(v, rendered, slice(0, v["n"]), cfg.size)
    return (_keypoint_pixels(face) / cfg.size).astype(np.float32)


# Where the stand-ins' "annotators" put the real set's sparse points (keypoints.REAL_KEYPOINT_NAMES),
# in face units: the eye point moves this share of the way from the eye centre to the brow's top,
# the subnasale sits this far below the nose line, the soft chin this share of the way from the
# jaw's lowest point to the mouth centre.
REAL_EYE_TO_BROW = 0.4
REAL_SUBNASALE_DROP = 0.05
REAL_CHIN_TO_MOUTH = 0.3


def _to_pixels(f: _Face, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head-local (x, y) -> continuous pixel positions: undo _draw's roll, scale and offset."""
    return (f.cx + f.unit * (f.c_roll * x + f.s_roll * y),
            f.cy + f.unit * (-f.s_roll * x + f.c_roll * y))


def _real_keypoint_pixels(f: _Face) -> np.ndarray:
    """(n, NUM_REAL_KEYPOINTS, 2) continuous pixel positions of the real layout, NaN where hidden."""
    from synthfar_ray.keypoints import REAL_KEYPOINT_NAMES

    p = f.p
    zero = np.zeros(f.n)
    t = REAL_EYE_TO_BROW
    eye_x = p["eye_x"] + t * 0.02  # toward the brow's top (eye_x + 0.02, brow_y - 0.05; see _keypoint_pixels)
    eye_y = p["eye_y"] + t * (p["brow_y"] - 0.05 - p["eye_y"])
    features = {  # face coordinates on the cylinder; the subnasale does not protrude as the tip does
        "right_eye": (-eye_x, eye_y), "left_eye": (eye_x, eye_y),
        "nose": (zero, p["nose_y"] + REAL_SUBNASALE_DROP),
        "mouth": (zero, p["mouth_y"] - p["lip_t"]),  # the top edge of the lips' ellipse, in the middle
    }
    out = np.empty((f.n, len(REAL_KEYPOINT_NAMES), 2))
    for k, name in enumerate(REAL_KEYPOINT_NAMES):
        if name == "chin":  # between the jaw's lowest point and the mouth centre, head-local
            mx, my, _ = _feature_position(f, zero, p["mouth_y"])
            x, y, shown = REAL_CHIN_TO_MOUTH * mx, 0.18 + p["jaw_b"] + REAL_CHIN_TO_MOUTH * (my - 0.18 - p["jaw_b"]), True
        else:
            x, y, shown = _feature_position(f, *features[name])
        px, py = _to_pixels(f, x, y)
        out[:, k, 0] = np.where(shown, px, np.nan)
        out[:, k, 1] = np.where(shown, py, np.nan)
    return out


def render_real_keypoints(attrs: FaceBatch, poses: PoseBatch, cfg: RenderConfig, seeds: np.ndarray) -> np.ndarray:
    """The real set's sparse points (keypoints.REAL_KEYPOINT_NAMES) where render_faces draws the
    features they are defined on: (N, R, 2) float32, continuous PIXEL positions (pixel centres at
    i + 0.5, as a landmark file holds them), NaN for an eye turned behind the head. Exact, cheap."""
    v = _validate(attrs, poses, seeds)
    face = _face_params(v, _rendered_from(v, cfg), slice(0, v["n"]), cfg.size)
    return _real_keypoint_pixels(face).astype(np.float32)
