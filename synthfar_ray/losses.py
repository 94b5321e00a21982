"""Weighted multi-task loss with per-row label masking.

Per head: L1 on age (years), cross-entropy on age bins, BCE-with-logits on gender, cross-entropy on
ethnicity. Datasets miss labels (FairFace has no ages; a mixed batch may carry rows that lack a
field), so each head averages only over the rows that have its label: a missing label (age NaN,
class < 0) contributes neither loss nor gradient, and a head with no labelled row in the batch
gives an exact 0 that is still part of the graph (DDP needs every parameter to get a gradient).

Masking is done with multiplications, not boolean indexing, so the loss never syncs the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from synthfar_ray.config import StrictModel

if TYPE_CHECKING:  # torch is imported where a loss is computed: configs load without it
    import torch


class LossWeights(StrictModel):
    """Per-head weights. Paper: age 1, gender 5, ethnicity 5 (UTKFace, synthetic); 1/1/1 (FairFace)."""

    age: float = Field(1.0, ge=0, description="L1 on the regression age")
    age_bin: float = Field(1.0, ge=0, description="cross-entropy on the 9 FairFace age bins")
    gender: float = Field(5.0, ge=0)
    ethnicity: float = Field(5.0, ge=0)


def _masked_mean(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp(min=1.0)


def head_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unweighted masked loss of every head the outputs have.

    targets: "age" float (NaN unknown), "age_bin" / "gender" / "ethnicity" integer (< 0 unknown).
    """
    import torch
    import torch.nn.functional as F

    losses: dict[str, torch.Tensor] = {}
    if "age" in outputs:
        pred = outputs["age"].float()
        true = targets["age"].to(pred.device, torch.float32)
        known = ~torch.isnan(true)
        # Replace unknown targets before the subtraction: NaN * 0 is NaN, also in the gradient.
        losses["age"] = _masked_mean((pred - torch.where(known, true, pred.detach())).abs(), known)
    if "age_bin_logits" in outputs:
        logits = outputs["age_bin_logits"].float()
        true = targets["age_bin"].to(logits.device).long()
        losses["age_bin"] = _masked_mean(F.cross_entropy(logits, true.clamp(min=0), reduction="none"), true >= 0)
    if "gender_logit" in outputs:
        logit = outputs["gender_logit"].float()
        true = targets["gender"].to(logit.device)
        losses["gender"] = _masked_mean(
            F.binary_cross_entropy_with_logits(logit, true.clamp(min=0).float(), reduction="none"), true >= 0)
    if "ethnicity_logits" in outputs:
        logits = outputs["ethnicity_logits"].float()
        true = targets["ethnicity"].to(logits.device).long()
        losses["ethnicity"] = _masked_mean(F.cross_entropy(logits, true.clamp(min=0), reduction="none"), true >= 0)
    return losses


def multitask_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   weights: LossWeights | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, unweighted per-head losses)."""
    weights = weights or LossWeights()
    parts = head_losses(outputs, targets)
    if not parts:
        raise ValueError("outputs hold no known head (age, age_bin_logits, gender_logit, ethnicity_logits)")
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, parts
