"""Precision and memory layout of the net on a device: one rule for training and evaluation.

`resolve_precision` is a pure function of the settings and the device's capabilities (unit-tested
on CPU for every device kind); `device_precision` asks torch about the actual device.

- amp `auto`: bf16 autocast without a GradScaler on CUDA devices with native bf16 (Ampere and later:
  A100, H100, H200, L4 ...); fp16 + GradScaler on older CUDA devices (V100, T4); none (fp32) on CPU.
  bf16 has fp32's exponent range, so it needs no loss scaling, and skipping the scaler also skips its
  per-step host sync (GradScaler.step reads the found-inf flag with `.item()`).
- amp `fp16` on a device without CUDA runs bf16 (CPU autocast has no fp16 scaler); amp `bf16` on a
  CUDA device without native bf16 runs fp16 + scaler (emulated bf16 is slower than fp32 there).
- channels_last `auto`: on for CUDA (cuDNN's NHWC kernels use the tensor cores), off on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

AmpMode = Literal["auto", "fp16", "bf16", "none"]
Layout = Literal["auto"] | bool


@dataclass(frozen=True)
class Precision:
    amp: Literal["fp16", "bf16", "none"]  # what autocast runs
    scaler: bool  # GradScaler on (fp16 only)
    channels_last: bool
    note: str = ""  # why a requested mode was changed ("" when it was not)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[self.amp]


def resolve_precision(amp: AmpMode, channels_last: Layout, device_type: str, bf16_supported: bool) -> Precision:
    """The autocast mode, GradScaler and layout for settings on a device kind ('cuda', 'cpu', ...)."""
    cuda = device_type == "cuda"
    note = ""
    mode = amp
    if mode == "auto":
        mode = ("bf16" if bf16_supported else "fp16") if cuda else "none"
    elif mode == "fp16" and not cuda:
        mode, note = "bf16", f"amp=fp16 needs CUDA; using bf16 autocast on {device_type}"
    elif mode == "bf16" and cuda and not bf16_supported:
        mode, note = "fp16", "amp=bf16 but this GPU has no native bf16; using fp16 + GradScaler"
    layout = cuda if channels_last == "auto" else bool(channels_last)
    return Precision(mode, mode == "fp16", layout, note)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this device (emulated bf16 on pre-Ampere GPUs does not count)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return device.type == "cpu"  # CPU autocast runs bf16


def device_precision(amp: AmpMode, channels_last: Layout, device: torch.device) -> Precision:
    """`resolve_precision` for an actual device; also turns on cuDNN autotuning on CUDA (fixed input
    shapes: each conv picks its fastest kernel once)."""
    import torch

    p = resolve_precision(amp, channels_last, device.type, bf16_supported(device))
    if p.note:
        logger.warning(p.note)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return p
