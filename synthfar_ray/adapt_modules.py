"""The torch side of domain adaptation (see adapt.py for the methods and their papers): gradient
reversal, the nuclear-norm Wasserstein discrepancy, auxiliary BatchNorms and the wrapper the
training step runs."""

from __future__ import annotations

import copy

import torch
from torch import nn

from synthfar_ray.adapt import REAL_BN, SYNTHETIC_BN, AdaptConfig


class GradReverse(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by -coefficient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def grad_reverse(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    return GradReverse.apply(x, coefficient)


def head_probabilities(outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(N, C) class probabilities of every classification head the outputs have (gender as two columns)."""
    probs = []
    if "ethnicity_logits" in outputs:
        probs.append(torch.softmax(outputs["ethnicity_logits"].float(), dim=1))
    if "age_bin_logits" in outputs:
        probs.append(torch.softmax(outputs["age_bin_logits"].float(), dim=1))
    if "gender_logit" in outputs:
        p = torch.sigmoid(outputs["gender_logit"].float())
        probs.append(torch.stack([1.0 - p, p], dim=1))
    return probs


def nuclear_wasserstein(outputs: dict[str, torch.Tensor], n_source: int) -> torch.Tensor:
    """NWD of a batch whose first n_source rows are the source (synthetic), summed over the heads;
    each nuclear norm is divided by its domain's row count. 0 (in the graph) when a domain is empty."""
    total = sum(o.sum() for o in outputs.values()) * 0.0
    n = next(iter(outputs.values())).shape[0]
    if n_source <= 0 or n_source >= n:
        return total
    for p in head_probabilities(outputs):
        total = total + torch.linalg.matrix_norm(p[:n_source], ord="nuc") / n_source
        total = total - torch.linalg.matrix_norm(p[n_source:], ord="nuc") / (n - n_source)
    return total


def _zero_grad_term(module: nn.Module) -> torch.Tensor | float:
    """0, in the graph of every trainable parameter of `module`: a part no row used this step still
    gets a (zero) gradient, as DDP expects for every parameter in every step."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0 if params else 0.0


class DualBatchNorm(nn.Module):
    """Two BatchNorms in one: rows [0, n_source) use the synthetic half, the rest the real half
    (`n_source` is set per step by set_source_rows); eval mode always uses the real half."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, affine: bool = True):
        super().__init__()
        self.separate_affine = affine
        setattr(self, REAL_BN, bn)
        synthetic = copy.deepcopy(bn)
        if not affine and synthetic.affine:  # statistics only: the real half's scale/shift serve both
            synthetic.weight, synthetic.bias, synthetic.affine = None, None, False
        setattr(self, SYNTHETIC_BN, synthetic)
        self.n_source: int | None = None

    @property
    def real(self) -> nn.Module:
        return getattr(self, REAL_BN)

    @property
    def synthetic(self) -> nn.Module:
        return getattr(self, SYNTHETIC_BN)

    def _synthetic(self, x: torch.Tensor) -> torch.Tensor:
        y = self.synthetic(x)
        if self.separate_affine or not self.real.affine:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.real.weight.view(shape) + self.real.bias.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n_source
        if not self.training:
            return self.real(x)
        if n is None or n <= 0:
            return self.real(x) + _zero_grad_term(self.synthetic)
        if n >= x.shape[0]:
            return self._synthetic(x) + _zero_grad_term(self.real)
        return torch.cat([self._synthetic(x[:n]), self.real(x[n:])])


class DomainDiscriminator(nn.Sequential):
    """DANN's discriminator: features -> hidden -> hidden -> one logit (> 0: real)."""

    def __init__(self, features: int, width: int):
        super().__init__(nn.Linear(features, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                         nn.ReLU(inplace=True), nn.Linear(width, 1))


class AdaptiveNet(nn.Module):
    """A MultiTaskNet with its adaptation parts: what the training step runs (and DDP wraps).
    forward(x, n_source, coefficient) -> (head outputs of every row, adaptation loss); rows
    [0, n_source) are synthetic, the rest real."""

    def __init__(self, net: nn.Module, cfg: AdaptConfig):
        super().__init__()
        self.net = net
        self.method = cfg.method
        if cfg.aux_bn and not has_aux_bn(net):
            convert_aux_bn(net, cfg.aux_bn_affine)
        self.discriminator = (DomainDiscriminator(net.gender.in_features, cfg.discriminator_width)
                              if cfg.method == "dann" else None)

    def forward(self, x: torch.Tensor, n_source: int, coefficient: float):
        set_source_rows(self.net, n_source)
        features = self.net.backbone(x)
        outputs = self.net.heads(features)
        n = features.shape[0]
        if self.method == "dann":
            if 0 < n_source < n:
                # The discriminator descends its cross-entropy; the reversed gradient makes the
                # encoder ascend it.
                logits = self.discriminator(grad_reverse(features, coefficient)).squeeze(-1).float()
                is_real = (torch.arange(n, device=logits.device) >= n_source).float()
                loss = nn.functional.binary_cross_entropy_with_logits(logits, is_real)
            else:
                loss = features.sum() * 0.0 + _zero_grad_term(self.discriminator)
        elif self.method == "daln":
            # The heads are the critic: the loss holds -NWD, so they ascend it; through the reversal
            # the encoder descends it.
            loss = -nuclear_wasserstein(self.net.heads(grad_reverse(features, coefficient)), n_source)
        else:
            loss = features.sum() * 0.0
        return outputs, loss


def convert_aux_bn(module: nn.Module, affine: bool = True) -> int:
    """Replace every BatchNorm under `module` by a DualBatchNorm (in place); returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child, affine))
            count += 1
        else:
            count += convert_aux_bn(child, affine)
    return count


def has_aux_bn(module: nn.Module) -> bool:
    return any(isinstance(m, DualBatchNorm) for m in module.modules())


def set_source_rows(module: nn.Module, n_source: int | None) -> None:
    """Rows [0, n_source) of the next forward passes are synthetic (None: every row is real)."""
    for m in module.modules():
        if isinstance(m, DualBatchNorm):
            m.n_source = n_source
