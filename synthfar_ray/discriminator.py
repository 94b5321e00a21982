"""cr-sam's real-vs-synthetic discriminator: the network, its training loop, scoring, and its stored
form (weights + input geometry + cross-fit fold). Kept apart from scorers.py because it needs torch
at import time (an nn.Module subclass), and the sample stage's config must load without torch."""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthfar_ray.model import build_backbone
from synthfar_ray.transforms import BatchAugment, to_model_input

if TYPE_CHECKING:
    from synthfar_ray.sampling_config import ScorerTrain

logger = logging.getLogger(__name__)


class Discriminator(nn.Module):
    """A `build_backbone` encoder + Linear(feat, 1): the logit of p(real | x)."""

    def __init__(self, backbone: str, pretrained: str | None = None):
        super().__init__()
        self.backbone_name = backbone
        self.backbone, feat = build_backbone(backbone, pretrained)
        self.head = nn.Linear(feat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(-1)


def train_discriminator(real: np.ndarray, synthetic: np.ndarray, settings: ScorerTrain, seed: int = 0,
                        device: str = "cpu"):
    """Fit the discriminator on uint8 (N, H, W, 3) images: label 1 real, 0 synthetic.

    Every batch is half real, half synthetic (class-balanced whatever the domain sizes)."""
    if len(real) == 0 or len(synthetic) == 0:
        raise ValueError(f"discriminator needs rows of both domains (real {len(real)}, synthetic {len(synthetic)})")
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = Discriminator(settings.backbone, settings.pretrained).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    aug = BatchAugment() if settings.augment else None
    real_t, syn_t = torch.from_numpy(real), torch.from_numpy(synthetic)
    half = settings.batch_size // 2
    target = torch.cat([torch.ones(half), torch.zeros(half)]).to(device)
    model.train()
    t0 = time.time()
    for step in range(settings.steps):
        batch = torch.cat([real_t[gen.integers(0, len(real_t), half)], syn_t[gen.integers(0, len(syn_t), half)]])
        x = to_model_input(batch.to(device), augment=aug)
        loss = F.binary_cross_entropy_with_logits(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, settings.steps // 5) == 0 or step + 1 == settings.steps:
            logger.info("discriminator step %d/%d loss %.4f (%.1f s)", step + 1, settings.steps, loss.item(), time.time() - t0)
    return model.eval()


def realism_scores(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """p(real | x) for uint8 (N, H, W, 3) images."""
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_model_input(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device))
            out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def discriminator_bytes(model: Discriminator, settings: ScorerTrain, fold: int | None = None, folds: int | None = None,
                        fold_seed: int | None = None) -> bytes:
    """The stored form of a discriminator: weights, its input geometry and (cross-fit) its fold."""
    buf = io.BytesIO()
    torch.save({"backbone": settings.backbone, "image_size": settings.image_size,
                "synthetic_center_crop": settings.synthetic_center_crop,
                "fold": fold, "folds": folds, "fold_seed": fold_seed,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, buf)
    return buf.getvalue()


def load_discriminator_meta(data: bytes, device: str = "cpu") -> tuple[Discriminator, dict[str, Any]]:
    """(model in eval mode, meta: backbone, image_size, synthetic_center_crop, fold, folds, fold_seed)."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = Discriminator(blob["backbone"])
    model.load_state_dict(blob["state_dict"])
    meta = {k: blob.get(k) for k in ("backbone", "image_size", "synthetic_center_crop", "fold", "folds", "fold_seed")}
    meta["image_size"] = int(meta["image_size"])
    return model.to(device).eval(), meta


def load_discriminator(data: bytes, device: str = "cpu"):
    """(model, image_size, synthetic_center_crop) from the bytes `fit_discriminator` stores."""
    model, meta = load_discriminator_meta(data, device)
    return model, meta["image_size"], meta["synthetic_center_crop"]
