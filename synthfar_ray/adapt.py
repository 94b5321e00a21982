"""Unsupervised domain adaptation for training on synthetic faces and testing on real ones.

`train.adapt` (any plan that trains on synthetic rows) adds a stream of unlabelled REAL train rows
(the target) to every step and one of:

- `dann` (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by Backpropagation"): a domain
  discriminator on the encoder's features, behind a gradient reversal layer. The discriminator
  descends its real-vs-synthetic cross-entropy; the reversed gradient makes the encoder ascend it,
  i.e. learn features the discriminator cannot tell apart.
- `daln` (Chen et al. CVPR 2022, "Reusing the Task-specific Classifier as a Discriminator:
  Discriminator-free Adversarial Domain Adaptation"): no discriminator. The classification heads
  themselves are the critic of the nuclear-norm Wasserstein discrepancy
  NWD = ||softmax(C(f_s))||_* / n_s - ||softmax(C(f_t))||_* / n_t
  (nuclear norms of the prediction matrices; a large one means confident and diverse predictions).
  The heads see the features through gradient reversal and the loss holds -NWD, so the heads ascend
  NWD while the encoder descends it: target predictions become as confident and diverse as source
  ones. Here NWD is summed over the net's classification heads (ethnicity, age bin, and gender as a
  two-column softmax); it depends on the batch size, and under DDP each rank computes it on its
  own batch.
- `aux_bn` ("Diversify, Don't Fine-Tune", Yu et al. 2023: auxiliary batch normalisation): every
  BatchNorm keeps separate statistics (and, with `aux_bn_affine`, separate scale and shift) for
  synthetic and real rows; evaluation and checkpoints use the real ones. A batch is split by source
  inside one forward pass (DDP sees one forward per step).

The reversal coefficient ramps from 0 to 1 over `warmup_steps` with DANN's schedule
2 / (1 + exp(-10 p)) - 1, p = step / warmup_steps, so the adversarial signal starts once the
features mean something; `weight` scales the adaptation loss.

Written from the papers; no reference code was copied. This module holds the settings and
checkpoint-key rules (no torch import: configs load without it); the modules the training step runs
are in adapt_modules.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from synthfar_ray.config import StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn

AdaptMethod = Literal["none", "dann", "daln"]
# Names of the two halves of a DualBatchNorm in state_dict keys: checkpoints keep the real half
# under the plain BatchNorm's keys (evaluate loads a plain net) and the synthetic half beside them.
REAL_BN, SYNTHETIC_BN = "real_bn", "synthetic_bn"


class AdaptConfig(StrictModel):
    """`train.adapt`: domain adaptation from synthetic to real (see synthfar_ray/adapt.py)."""

    method: AdaptMethod = Field("none", description="none, dann (domain discriminator + gradient reversal) or daln "
                                                    "(nuclear-norm Wasserstein discrepancy, the heads as critic)")
    weight: float = Field(1.0, ge=0, description="weight of the adaptation loss")
    warmup_steps: int = Field(1000, ge=0, description="steps over which the reversal coefficient ramps 0 -> 1 "
                                                      "(DANN schedule; 0: 1 from the start)")
    aux_bn: bool = Field(False, description="separate BatchNorm statistics for synthetic and real rows; "
                                            "evaluation uses the real ones")
    aux_bn_affine: bool = Field(True, description="aux_bn: separate scale/shift too (false: statistics only)")
    discriminator_width: int = Field(256, ge=1, description="dann: hidden width of the domain discriminator")

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.aux_bn


def reversal_coefficient(step: int, warmup_steps: int) -> float:
    """DANN's ramp 2 / (1 + exp(-10 p)) - 1 of p = step / warmup_steps (1 once p >= 1)."""
    if warmup_steps <= 0:
        return 1.0
    p = min(1.0, step / warmup_steps)
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A net's state_dict -> (the plain net's state: real BatchNorm halves under the plain keys,
    the synthetic halves under their own keys). Without aux BatchNorms: (state, {})."""
    plain, synthetic = {}, {}
    for key, value in state.items():
        if f".{SYNTHETIC_BN}." in key:
            synthetic[key] = value
        else:
            plain[key.replace(f".{REAL_BN}.", ".")] = value
    return plain, synthetic


def join_state_dict(net: nn.Module, plain: dict[str, torch.Tensor],
                    synthetic: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_state_dict for `net` (which may or may not have aux BatchNorms)."""
    out = dict(synthetic)
    for key in net.state_dict():
        if f".{SYNTHETIC_BN}." in key:
            continue
        source = key.replace(f".{REAL_BN}.", ".")
        if source in plain:
            out[key] = plain[source]
    return out
