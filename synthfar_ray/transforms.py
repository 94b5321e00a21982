"""Image preprocessing and the paper's train augmentations.

Pipeline: JPEG bytes -> centre square crop (optionally a fixed side, e.g. FairFace 300 px of 448)
-> resize to `size` (196) -> uint8 -> [augment] -> float, ImageNet normalisation.

Decoding runs either in the Ray Data pipeline (`decode_batch`, PIL with JPEG draft mode so a big
image is decoded at a reduced scale) or in the training worker (`decode_to_tensor`, torchvision's
decode_jpeg, on the GPU via nvJPEG when there is one).

Augmentations (albumentations in the paper; no horizontal flip): shift-scale-rotate p .5 (shift
.0625, scale .1, rotate 45), to-gray p .1, Gaussian blur p .3 (kernel 3-7), RGB shift p .2 (20).
Two implementations of the same distribution:
- `paper_augment()`: torchvision.transforms.v2, one image at a time (for CPU data tasks);
- `BatchAugment`: every sample draws its own parameters but the whole batch is transformed with a
  handful of batched kernels (affine_grid/grid_sample, one blur per kernel size, masks), so it is
  cheap on the device batch where a per-image loop would cost ~1,000 kernel launches per step.
  It pads with reflection as albumentations does; torchvision's RandomAffine can only fill black.
  It also moves keypoint labels with each sample's shift-scale-rotate (`to_model_input_with_points`);
  `paper_augment()` does not, so the keypoint head needs the device path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from PIL import Image

from synthfar_ray.keypoints import KEYPOINT_LAYOUTS, keypoints_array
from synthfar_ray.synthetic_heads import HAIR_COLUMNS, POSE_COLUMNS, hair_indices, head_columns

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: Ray Data's decode tasks import this module
# in fresh worker processes, and decoding needs only PIL and numpy.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's augmentation parameters.
SSR_P, SSR_SHIFT, SSR_SCALE, SSR_ROTATE = 0.5, 0.0625, 0.1, 45.0
GRAY_P = 0.1
BLUR_P, BLUR_KERNELS = 0.3, (3, 5, 7)
RGB_SHIFT_P, RGB_SHIFT = 0.2, 20.0

LABEL_COLUMNS = ("age", "age_bin", "gender", "ethnicity")
FLOAT_LABELS = ("age", *POSE_COLUMNS)  # NaN = unknown; the other labels are classes, -1 = unknown


def label_columns(synthetic_heads: Iterable[str] = ()) -> tuple[str, ...]:
    """The label columns a net with these synthetic heads (synthetic_heads.py) trains and is scored on."""
    return LABEL_COLUMNS + head_columns(synthetic_heads)


def _blur_sigma(kernel: int) -> float:
    """OpenCV's sigma for a kernel size (albumentations' GaussianBlur default, sigma_limit=0)."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def crop_box(w: int, h: int, crop: int | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre square crop of a w x h image: side `crop` (at most
    the short side), or the short side when None."""
    side = min(w, h) if crop is None else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


# ---------------------------------------------------------------------------------------------
# Decoding

def _draft_crop(data: bytes, box_of, side: int) -> Image.Image:
    """Open image bytes and return the RGB crop `box_of(w, h)` (stored pixels), decoded at the smallest
    JPEG draft scale (1/2^k) that still leaves >= `side` pixels across the crop's short side."""
    img = Image.open(io.BytesIO(data))
    w0, h0 = img.size
    box = box_of(w0, h0)
    short0 = min(box[2] - box[0], box[3] - box[1])
    if img.format == "JPEG":
        img.draft("RGB", (math.ceil(w0 * side / short0), math.ceil(h0 * side / short0)))
    sx, sy = img.size[0] / w0, img.size[1] / h0
    return img.convert("RGB").crop((round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)))


def decode_resize(data: bytes, size: int, center_crop: int | None = None) -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8: centre square crop (side `center_crop`, else the short
    side), resized with antialiasing. `center_crop` is in pixels of the stored image."""
    try:
        img = _draft_crop(data, lambda w, h: crop_box(w, h, center_crop), size)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img)
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"undecodable image ({len(data)} bytes): {e}") from e


def resize_short_side(data: bytes, size: int, center_crop: int | None = None) -> Image.Image | None:
    """Image bytes -> an RGB image whose short side is `size` (aspect kept), after an optional centre
    square crop (stored pixels); None when it is already that small and uncropped (keep the bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if center_crop is None and min(probe.size) <= size:
                return None
        img = _draft_crop(data, (lambda w, h: crop_box(w, h, center_crop)) if center_crop else
                          (lambda w, h: (0, 0, w, h)), size)
        w, h = img.size
        scale = size / min(w, h)
        target = (max(size, round(w * scale)), max(size, round(h * scale)))
        return img if img.size == target else img.resize(target, Image.Resampling.BILINEAR)
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"undecodable image ({len(data)} bytes): {e}") from e


def labels_to_numpy(batch: dict[str, Any], columns: Iterable[str] = LABEL_COLUMNS) -> dict[str, np.ndarray]:
    """Label columns with nulls -> ages and pose angles float32 (NaN unknown), classes int64 (-1
    unknown; hair strings -> class indices), keypoints (N, 2K) float32 (NaN unknown). A column the
    batch lacks (a real set has no pose, hair or keypoints) is all unknown."""
    out: dict[str, np.ndarray] = {}
    n = len(batch["image"])
    for name in columns:
        col = batch.get(name)
        if name in KEYPOINT_LAYOUTS:
            out[name] = keypoints_array(col, n, batch.get("id"), name)
            continue
        if col is None:
            col = np.full(n, np.nan if name in FLOAT_LABELS else -1)
        col = np.asarray(col)
        if name in FLOAT_LABELS:
            out[name] = np.array([np.nan if v is None else v for v in col], dtype=np.float32) if col.dtype == object \
                else col.astype(np.float32)
        elif name in HAIR_COLUMNS and col.dtype.kind in "OUS":
            out[name] = hair_indices(col.tolist(), name, batch.get("id"))
        else:
            if col.dtype == object or col.dtype.kind == "f":  # nulls arrive as None / NaN
                col = np.array([-1 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in col])
            out[name] = col.astype(np.int64)
    return out


def decode_batch(batch: dict[str, np.ndarray], size: int, center_crop: int | None = None,
                 augment: bool = False, is_synthetic: int | None = None, seed: int | None = None,
                 columns: Iterable[str] = LABEL_COLUMNS) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: JPEG column -> (N, size, size, 3) uint8 + clean label columns
    (`columns`: `label_columns` of the net's synthetic heads).

    `augment` applies `paper_augment()` here on the CPU (else augment later on the device batch).
    `is_synthetic` adds a constant column so mixed batches can be counted.
    """
    images = np.stack([decode_resize(b, size, center_crop) for b in batch["image"]]) if len(batch["image"]) \
        else np.zeros((0, size, size, 3), np.uint8)
    if augment and len(images):
        import torch

        aug = paper_augment()
        if seed is not None:
            torch.manual_seed(seed)
        t = torch.from_numpy(images).permute(0, 3, 1, 2)
        images = torch.stack([aug(im) for im in t]).permute(0, 2, 3, 1).contiguous().numpy()
    out: dict[str, np.ndarray] = {"image": images, **labels_to_numpy(batch, columns)}
    if "id" in batch:
        out["id"] = np.asarray(batch["id"], dtype=np.int64)
    if is_synthetic is not None:
        out["is_synthetic"] = np.full(len(images), is_synthetic, dtype=np.int8)
    return out


def decode_to_tensor(images: list[bytes] | np.ndarray, size: int, center_crop: int | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """JPEG bytes -> (N, 3, size, size) uint8 on `device`, decoded by torchvision in one batched call
    (nvJPEG on CUDA). Crop + resize run as one batched op per distinct stored size (a dataset has one
    or a few), not per image; the output keeps the input order."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if len(images) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(decoded):  # shapes come from the JPEG headers: no device sync
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    resized = []
    for (h, w), idx in groups.items():
        left, top, right, bottom = crop_box(w, h, center_crop)
        resized.append(resize_batch(torch.stack([decoded[i][:, top:bottom, left:right] for i in idx]), size))
    if len(groups) == 1:
        return resized[0]
    order = torch.argsort(torch.tensor([i for idx in groups.values() for i in idx]))
    return torch.cat(resized)[host_to_device(order, resized[0].device)]


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, h, w) uint8 -> (N, 3, size, size) uint8, antialiased bilinear (PIL's filter), one kernel."""
    import torch
    import torch.nn.functional as F

    if tuple(images.shape[-2:]) == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def host_to_device(array: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host array on `device`: through pinned memory and an asynchronous copy when that is CUDA
    (a pageable copy blocks the host until it is done)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Augmentation

def paper_augment():
    """The paper's train augmentations with torchvision.transforms.v2, for one uint8 (3, H, W) image."""
    import torch
    from torchvision.transforms import v2

    def rgb_shift(img: torch.Tensor) -> torch.Tensor:
        shift = (torch.rand(3, 1, 1) * 2 - 1) * RGB_SHIFT
        return (img.float() + shift).round().clamp(0, 255).to(img.dtype)

    return v2.Compose([
        v2.RandomApply([v2.RandomAffine(degrees=SSR_ROTATE, translate=(SSR_SHIFT, SSR_SHIFT),
                                        scale=(1 - SSR_SCALE, 1 + SSR_SCALE),
                                        interpolation=v2.InterpolationMode.BILINEAR)], p=SSR_P),
        v2.RandomGrayscale(p=GRAY_P),
        v2.RandomApply([v2.RandomChoice([v2.GaussianBlur(k, sigma=_blur_sigma(k)) for k in BLUR_KERNELS])], p=BLUR_P),
        v2.RandomApply([v2.Lambda(rgb_shift)], p=RGB_SHIFT_P),
    ])


class BatchAugment:
    """The same augmentations on a (N, 3, H, W) float batch in [0, 255], each sample with its own draw."""

    def __init__(self, ssr_p: float = SSR_P, gray_p: float = GRAY_P, blur_p: float = BLUR_P, rgb_shift_p: float = RGB_SHIFT_P):
        self.ssr_p, self.gray_p, self.blur_p, self.rgb_shift_p = ssr_p, gray_p, blur_p, rgb_shift_p

    def _affine(self, x: torch.Tensor, points: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch
        import torch.nn.functional as F

        n, dev = x.shape[0], x.device
        on = (torch.rand(n, device=dev) < self.ssr_p).float()
        angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(SSR_ROTATE) * on
        scale = 1 + (torch.rand(n, device=dev) * 2 - 1) * SSR_SCALE * on
        # affine_grid works in [-1, 1] coordinates: a shift of 6.25 % of the side is 0.125.
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * SSR_SHIFT * 2 * on[:, None]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # theta maps output -> input coordinates: the inverse of (rotate, scale, then shift).
        inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (n, 2, 2)
        theta = torch.cat([inv, -(inv @ shift[:, :, None])], dim=2)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if points is None:
            return out, None
        # Points go forward (input -> output): p_out = inv^-1 p_in + shift, in [-1, 1] coordinates,
        # which align_corners=False puts at the image edges, as the points' fractions of the side.
        c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
        fwd = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # inv's inverse
        p = points.to(torch.float32).reshape(n, -1, 2) * 2 - 1
        p = p @ fwd.transpose(1, 2) + shift[:, None, :]
        return out, ((p + 1) / 2).reshape(points.shape)  # NaN (unknown) points stay NaN

    @overload
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    @overload
    def __call__(self, x: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, x, points=None):
        """The augmented batch; with `points` ((N, 2K) keypoints, fractions of the side, NaN unknown)
        also the points moved by each sample's shift-scale-rotate (the other augmentations keep them)."""
        import torch
        from torchvision.transforms.v2 import functional as TF

        n, dev = x.shape[0], x.device
        if n == 0:
            return x if points is None else (x, points)
        x, moved = self._affine(x, points)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].expand_as(x)
        x = torch.where((torch.rand(n, 1, 1, 1, device=dev) < self.gray_p), gray, x)
        # One blurred copy per kernel size, then a per-sample pick: no host sync, 3 cheap convs.
        pick = torch.randint(0, len(BLUR_KERNELS), (n,), device=dev)
        blur_on = torch.rand(n, device=dev) < self.blur_p
        for i, k in enumerate(BLUR_KERNELS):
            sel = (blur_on & (pick == i))[:, None, None, None]
            x = torch.where(sel, TF.gaussian_blur(x, [k, k], [_blur_sigma(k)] * 2), x)
        shift = (torch.rand(n, 3, 1, 1, device=dev) * 2 - 1) * RGB_SHIFT
        shift = shift * (torch.rand(n, 1, 1, 1, device=dev) < self.rgb_shift_p)
        x = (x + shift).clamp(0, 255)
        return x if points is None else (x, moved)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 255] (any dtype) -> float, ImageNet-normalised."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def to_model_input(images: torch.Tensor, augment: BatchAugment | None = None, channels_last: bool = False,
                   nhwc: bool = True) -> torch.Tensor:
    """uint8 batch (N, H, W, 3) if nhwc else (N, 3, H, W), on its device -> normalised float NCHW."""
    return _model_input(images, augment, channels_last, nhwc, None)[0]


def to_model_input_with_points(images: torch.Tensor, points: torch.Tensor, augment: BatchAugment | None = None,
                               channels_last: bool = False, nhwc: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """to_model_input, and the (N, 2K) keypoints (fractions of the side) moved with the augmentation."""
    x, moved = _model_input(images, augment, channels_last, nhwc, points)
    return x, points if moved is None else moved


def _model_input(images, augment, channels_last, nhwc, points):
    import torch

    x = (images.permute(0, 3, 1, 2) if nhwc else images).float()
    moved = None
    if augment is not None:
        if points is None:
            x = augment(x)
        else:
            x, moved = augment(x, points)
    x = normalize(x)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()), moved
