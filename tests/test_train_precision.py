"""Precision and layout: the one rule training and evaluation share (precision.py), the GPU-decode
path's batched crop + resize, and torch.compile of the tiny net on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthfar_ray.images import encode_jpeg
from synthfar_ray.precision import resolve_precision
from synthfar_ray.transforms import decode_resize, decode_to_tensor


@pytest.mark.parametrize("amp, device, bf16, expect", [
    # auto: bf16 without a scaler where the GPU has it, fp16 + scaler where not, fp32 on CPU
    ("auto", "cuda", True, ("bf16", False)),
    ("auto", "cuda", False, ("fp16", True)),
    ("auto", "cpu", True, ("none", False)),
    ("fp16", "cuda", True, ("fp16", True)),
    ("fp16", "cpu", True, ("bf16", False)),  # CPU autocast has no fp16 scaler
    ("bf16", "cuda", False, ("fp16", True)),  # no emulated bf16
    ("bf16", "cpu", True, ("bf16", False)),
    ("none", "cuda", True, ("none", False)),
])
def test_amp_rule(amp, device, bf16, expect):
    p = resolve_precision(amp, "auto", device, bf16)
    assert (p.amp, p.scaler) == expect
    assert bool(p.note) == (amp != "auto" and p.amp != amp)  # a changed request says why
    assert p.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[p.amp]


@pytest.mark.parametrize("setting, device, expect", [("auto", "cuda", True), ("auto", "cpu", False),
                                                     (True, "cpu", True), (False, "cuda", False)])
def test_channels_last_rule(setting, device, expect):
    assert resolve_precision("none", setting, device, True).channels_last is expect


def test_train_config_defaults_and_overrides():
    from synthfar_ray.config import load_config
    from synthfar_ray.train import TrainConfig

    cfg = TrainConfig(name="x", storage_path="/tmp/x", plan="synthetic", synthetic="/tmp/s")
    assert (cfg.amp, cfg.channels_last, cfg.compile) == ("auto", "auto", False)
    assert load_config(TrainConfig, None, ["name=x", "storage_path=/tmp/x", "synthetic=/tmp/s",
                                           "channels_last=false", "compile=true"]).channels_last is False


def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 128 + 80 * np.sin(xx / 7 + seed)[..., None] * np.cos(yy / 9)[..., None] + rng.normal(0, 3, (h, w, 3))
    return encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=95)


@pytest.mark.parametrize("crop", [None, 70])
def test_batched_decode_matches_per_image_reference(crop):
    # Mixed stored sizes (three groups, interleaved) below 2x the output side, so the reference's
    # JPEG draft mode does not decode at a reduced scale and both paths resample the same pixels.
    shapes = [(100, 90), (80, 120), (100, 90), (96, 96), (80, 120), (64, 64)]
    data = [_jpeg(h, w, i) for i, (h, w) in enumerate(shapes)]
    batched = decode_to_tensor(data, 48, center_crop=crop).permute(0, 2, 3, 1).numpy().astype(int)
    assert batched.shape == (len(data), 48, 48, 3)
    for i, d in enumerate(data):
        ref = decode_resize(d, 48, center_crop=crop).astype(int)
        diff = np.abs(batched[i] - ref)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2, (i, shapes[i], diff.mean(), diff.max())
    assert decode_to_tensor([], 48).shape == (0, 3, 48, 48)


def test_compiled_tiny_net_trains_on_cpu():
    from synthfar_ray.losses import multitask_loss
    from synthfar_ray.model import MultiTaskNet

    torch.manual_seed(0)
    net = MultiTaskNet("tiny")
    model = torch.compile(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(8, 3, 32, 32)
    labels = {"age": torch.rand(8) * 80, "age_bin": torch.randint(0, 9, (8,)), "gender": torch.randint(0, 2, (8,)),
              "ethnicity": torch.randint(0, 5, (8,))}
    losses = []
    for _ in range(5):
        out = model(x)
        loss, _ = multitask_loss(out, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert out["ethnicity_logits"].shape == (8, 5) and out["age"].shape == (8,)
    assert losses[-1] < losses[0]
    assert set(net.state_dict()) == set(MultiTaskNet("tiny").state_dict())  # checkpoints keep plain keys
