"""Weighted multi-task loss with per-row label masking.

Per head: L1 on age (years), cross-entropy on age bins, BCE-with-logits on gender, cross-entropy on
ethnicity; with synthetic heads (synthetic_heads.py), smooth L1 on the pose angles (degrees /
POSE_SCALE, each known angle a term), cross-entropy on hair length and hair colour, and smooth L1
on the keypoint coordinates (fractions of the image side / KEYPOINT_SCALE, each known coordinate a
term, so a row contributes only the points it defines), the dense ones and a real set's sparse ones.

Datasets miss labels (FairFace has no ages; real sets have no pose or hair; a mixed batch may carry
rows that lack a field), so each head averages only over the rows that have its label: a missing
label (age or angle NaN, class < 0) contributes neither loss nor gradient, and a head with no
labelled row in the batch gives an exact 0 that is still part of the graph (DDP needs every
parameter to get a gradient).

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
    # Synthetic heads' weights (used only when model.synthetic_heads has the head). Left out of a
    # dump at the default, so run_config.json of runs started before they existed still matches.
    pose: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                        description="smooth L1 on yaw/pitch/roll in units of 30 degrees (synthetic rows only)")
    hair_length: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                               description="cross-entropy on hair length (synthetic rows only)")
    hair_color: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                              description="cross-entropy on hair colour (synthetic rows only)")
    race7: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                         description="cross-entropy of model.transfer's 7-race head (real rows with ethnicity7)")
    keypoints: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                             description="smooth L1 on keypoint coordinates in units of a quarter of the image "
                                         "side (synthetic rows only)")
    keypoints_real: float = Field(1.0, ge=0, exclude_if=lambda v: v == 1.0,
                                  description="the same on model.transfer's sparse keypoint head (real rows with "
                                              "keypoints_real)")


def _masked_mean(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_cross_entropy(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows with a class (>= 0)."""
    import torch.nn.functional as F

    logits = logits.float()
    true = true.to(logits.device).long()
    return _masked_mean(F.cross_entropy(logits, true.clamp(min=0), reduction="none"), true >= 0)


def _known_or_pred(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with the unknown (NaN) ones replaced by the detached prediction, known mask).
    Replacing before the subtraction matters: NaN * 0 is NaN, also in the gradient."""
    import torch

    known = ~torch.isnan(true)
    return torch.where(known, true, pred.detach()), known


def head_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unweighted masked loss of every head the outputs have.

    targets: "age" float (NaN unknown), "age_bin" / "gender" / "ethnicity" integer (< 0 unknown);
    with synthetic heads also "pose_yaw" / "pose_pitch" / "pose_roll" float degrees (NaN unknown)
    and "hair_length" / "hair_color" class indices (< 0 unknown), "keypoints" (N, 2K) fractions of
    the image side (NaN unknown); with keypoint transfer "keypoints_real" (N, 2R), the same.
    """
    import torch
    import torch.nn.functional as F

    from synthfar_ray.synthetic_heads import KEYPOINT_BETA, KEYPOINT_SCALE, POSE_BETA, POSE_COLUMNS, POSE_SCALE

    losses: dict[str, torch.Tensor] = {}
    if "age" in outputs:
        pred = outputs["age"].float()
        true, known = _known_or_pred(pred, targets["age"].to(pred.device, torch.float32))
        losses["age"] = _masked_mean((pred - true).abs(), known)
    if "age_bin_logits" in outputs:
        losses["age_bin"] = _masked_cross_entropy(outputs["age_bin_logits"], targets["age_bin"])
    if "gender_logit" in outputs:
        logit = outputs["gender_logit"].float()
        true = targets["gender"].to(logit.device)
        losses["gender"] = _masked_mean(
            F.binary_cross_entropy_with_logits(logit, true.clamp(min=0).float(), reduction="none"), true >= 0)
    if "ethnicity_logits" in outputs:
        losses["ethnicity"] = _masked_cross_entropy(outputs["ethnicity_logits"], targets["ethnicity"])
    if "pose" in outputs:  # (N, 3) degrees; each known angle is one term of the mean
        pred = outputs["pose"].float() / POSE_SCALE
        true = torch.stack([targets[c].to(pred.device, torch.float32) for c in POSE_COLUMNS], dim=1) / POSE_SCALE
        true, known = _known_or_pred(pred, true)
        losses["pose"] = _masked_mean(F.smooth_l1_loss(pred, true, reduction="none", beta=POSE_BETA), known)
    for attr in ("hair_length", "hair_color"):
        if f"{attr}_logits" in outputs:
            losses[attr] = _masked_cross_entropy(outputs[f"{attr}_logits"], targets[attr])
    for column in ("keypoints", "keypoints_real"):  # (N, 2K); each known coordinate is one term of the mean
        if column in outputs:  # keypoints_real: label transfer, its inputs are detached (model.py)
            pred = outputs[column].float() / KEYPOINT_SCALE
            true, known = _known_or_pred(pred, targets[column].to(pred.device, torch.float32) / KEYPOINT_SCALE)
            losses[column] = _masked_mean(F.smooth_l1_loss(pred, true, reduction="none", beta=KEYPOINT_BETA), known)
    if "race7_logits" in outputs:  # label transfer: its inputs are detached (model.py)
        losses["race7"] = _masked_cross_entropy(outputs["race7_logits"], targets["ethnicity7"])
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
