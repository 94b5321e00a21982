"""Per-image and per-set quality checks of a synthetic face dataset (pure numpy / OpenCV; no Ray).

- Face found: OpenCV's frontal-face Haar cascade, whose weights ship inside the
  `opencv-python-headless<5` wheel (`cv2.data.haarcascades`; the 5.x wheels no longer bundle them,
  hence the pin). Images smaller than DETECT_SIDE are upscaled first: the cascade's smallest window
  is 24 px, and a 64 px training image holds a face of about 35 px.
- Pose adherence: where the detected face sits against where the requested head pose put it
  (centre error in head half-widths, size ratio).
- Degenerate images: near-constant pixels (a blank or black diffusion output) and undecodable bytes.
- Near duplicates: a 64-bit DCT perceptual hash per image finds candidates: hashes that differ in at
  most `max_distance` bits (from 4 bands of 16 bits: two hashes within 3 bits share at least one band
  exactly, so a set is never compared pair by pair). A candidate pair is a near duplicate only if
  their 8x8 colour thumbnails also differ by at most `max_thumb_diff` grey levels on average: the
  grey-level hash alone matched different procedural faces of the same framing (measured on the
  demo's 2,340 faces: 21 rows flagged, the pairs looked at were all different people).
- Set level: Fréchet distance between two Gaussians fitted to embeddings (the FID formula, computed
  in the space of the project's own real-trained classifier: Inception weights cannot be fetched
  here, so it is not FID and is not named so), and diversity as mean pairwise embedding distance.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np

from synthfar_ray.poses import HEAD_CENTRE, HEAD_UNIT

DETECT_SIDE = 128  # images are upscaled to at least this before detection
CONSTANT_STD = 2.0  # grey-level standard deviation (0..255) below which an image counts as blank
HASH_BANDS = 4


@functools.cache
def _cascade():
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its Haar cascade {path} (opencv-python-headless<5 ships it)")
    return cascade


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB or (H, W) -> uint8 (H, W) luma."""
    img = np.asarray(image)
    if img.ndim == 2:
        return img.astype(np.uint8)
    rgb = img[..., :3].astype(np.float32)
    return np.clip(rgb @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5, 0, 255).astype(np.uint8)


def detect_faces(image: np.ndarray, min_neighbors: int = 4) -> np.ndarray:
    """Face boxes (k, 4) as (x, y, w, h) in fractions of the image width/height, largest first."""
    import cv2

    gray = to_gray(image)
    h, w = gray.shape
    factor = max(1.0, DETECT_SIDE / min(h, w))
    if factor > 1.0:
        gray = cv2.resize(gray, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_LINEAR)
    gh, gw = gray.shape
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=min_neighbors,
                                        minSize=(max(24, min(gh, gw) // 8),) * 2)
    if len(found) == 0:
        return np.zeros((0, 4), np.float32)
    boxes = np.asarray(found, np.float32) / np.array([gw, gh, gw, gh], np.float32)
    return boxes[np.argsort(-(boxes[:, 2] * boxes[:, 3]), kind="stable")]


def expected_head(scale: float, offset_x: float, offset_y: float, centre: tuple[float, float] = HEAD_CENTRE,
                  unit: float = HEAD_UNIT) -> tuple[float, float, float]:
    """(centre x, centre y, head half-width) as fractions of the image side, for a square image, of
    the head the pose asked for (poses.py's skeleton geometry by default; faces.py passes its own)."""
    return centre[0] + offset_x, centre[1] + offset_y, unit * scale


def pose_adherence(box: np.ndarray, head: tuple[float, float, float]) -> tuple[float, float]:
    """(centre error in head half-widths, detected box width / head width) of one detected box."""
    x, y, w, h = (float(v) for v in box)
    cx, cy, unit = head
    error = float(np.hypot(x + w / 2 - cx, y + h / 2 - cy) / unit)
    return error, float(w / (2 * unit))


def pixel_std(image: np.ndarray) -> float:
    return float(to_gray(image).astype(np.float32).std())


def is_blank(image: np.ndarray) -> bool:
    return pixel_std(image) < CONSTANT_STD


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash: the signs of the 8x8 lowest DCT frequencies (DC excluded from the
    median) of the 32x32 grey image, as a signed int64 (Parquet has no uint64 in every reader)."""
    import cv2

    small = cv2.resize(to_gray(image), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return int(np.array(value, dtype=np.uint64).astype(np.int64))


THUMB_SIDE = 8
MAX_THUMB_DIFF = 8.0


def thumbnail(image: np.ndarray) -> bytes:
    """8x8 RGB area-averaged thumbnail (192 bytes): the colour check of a near-duplicate candidate."""
    import cv2

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return cv2.resize(img[..., :3].astype(np.uint8), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).tobytes()


def thumb_diff(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two thumbnails in grey levels (0..255)."""
    return float(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8)).mean())


def hamming(a: int, b: int) -> int:
    return int((int(a) ^ int(b)) & 0xFFFFFFFFFFFFFFFF).bit_count()


def near_duplicates(ids: np.ndarray, hashes: np.ndarray, max_distance: int = 3, thumbs: list[bytes] | None = None,
                    max_thumb_diff: float = MAX_THUMB_DIFF) -> dict[int, int]:
    """For each id that is a near duplicate of an earlier one (smaller id), that earlier id's group
    head: {id: first id of its group}. Ids not in the result are unique. max_distance <= 3 keeps the
    banded candidate search exact (4 bands of 16 bits); with `thumbs` (one per id, see `thumbnail`)
    a candidate pair must also pass the colour check."""
    if not 0 <= max_distance < HASH_BANDS:
        raise ValueError(f"max_distance must be 0..{HASH_BANDS - 1} (bands of {64 // HASH_BANDS} bits), got {max_distance}")
    ids = np.asarray(ids, dtype=np.int64)
    h = np.asarray(hashes, dtype=np.int64).astype(np.uint64)
    order = np.argsort(ids, kind="stable")
    ids, h = ids[order], h[order]
    thumbs = [thumbs[i] for i in order] if thumbs is not None else None
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(HASH_BANDS):
        keys = (h >> np.uint64(16 * band)) & np.uint64(0xFFFF)
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(keys.tolist()):
            buckets[k].append(i)
        for members in buckets.values():
            for a_pos, i in enumerate(members):
                for j in members[a_pos + 1:]:
                    if hamming(h[i], h[j]) <= max_distance and (
                            thumbs is None or thumb_diff(thumbs[i], thumbs[j]) <= max_thumb_diff):
                        ri, rj = root(i), root(j)
                        if ri != rj:
                            parent[max(ri, rj)] = min(ri, rj)  # the smallest index (id) heads the group
    return {int(ids[i]): int(ids[root(i)]) for i in range(len(ids)) if root(i) != i}


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussians fitted to the rows
    of a and b (the FID formula; symmetric PSD square roots, so no complex parts to drop)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (n >= 2, d) embedding sets of the same width, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(sa)
    cross = _sqrt_psd(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(cross))


def mean_pairwise_distance(x: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance over distinct pairs (of at most max_rows rows, seeded pick); NaN below 2 rows."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return float("nan")
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    n = len(x)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` (ties count half); NaN when a
    class is empty. The rank-sum (Mann-Whitney) form."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    import pandas as pd  # here, not at the top: quality_config (train's config too) imports this module

    ranks = pd.Series(s).rank(method="average").to_numpy()  # ties share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
