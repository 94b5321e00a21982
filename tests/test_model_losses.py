"""Model heads, masked multi-task loss, weight loading and image transforms (no Ray)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthfar_ray.images import encode_jpeg
from synthfar_ray.losses import LossWeights, head_losses, multitask_loss
from synthfar_ray.model import MultiTaskNet, build_backbone, predict
from synthfar_ray.transforms import (
    BatchAugment,
    decode_batch,
    decode_resize,
    decode_to_tensor,
    labels_to_numpy,
    normalize,
    paper_augment,
    to_model_input,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
@pytest.mark.parametrize("age_mode,keys", [
    ("both", {"age", "age_bin_logits", "gender_logit", "ethnicity_logits"}),
    ("regression", {"age", "gender_logit", "ethnicity_logits"}),
    ("bins", {"age_bin_logits", "gender_logit", "ethnicity_logits"}),
])
def test_output_shapes(backbone, age_mode, keys):
    net = MultiTaskNet(backbone, age_mode=age_mode).eval()
    out = net(torch.randn(3, 3, 64, 64))
    assert set(out) == keys
    shapes = {"age": (3,), "age_bin_logits": (3, 9), "gender_logit": (3,), "ethnicity_logits": (3, 5)}
    for k, v in out.items():
        assert tuple(v.shape) == shapes[k], k


def test_resnet50_feature_width_and_age_init():
    net = MultiTaskNet("resnet50", age_mode="both")
    assert net.ethnicity.in_features == 2048  # the paper's Linear(2048, .) heads
    # The regression head starts at a plausible age, not 0.
    assert 20 < float(predict(net, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), nhwc=False)["age"]) < 50


def test_unknown_backbone_and_age_mode():
    with pytest.raises(ValueError, match="unknown backbone"):
        MultiTaskNet("vgg99")
    with pytest.raises(ValueError, match="age_mode"):
        MultiTaskNet("tiny", age_mode="years")


def test_pretrained_backbone_files(tmp_path):
    """Weights from .pth (with a prefix and classifier keys) and .safetensors reach the backbone."""
    from safetensors.torch import save_file

    donor, _ = build_backbone("tiny")
    for p in donor.parameters():
        torch.nn.init.normal_(p)
    state = {f"backbone.{k}": v for k, v in donor.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 3)  # a classifier the encoder does not have: ignored
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        net = MultiTaskNet("tiny", pretrained=str(tmp_path / name))
        for k, v in donor.state_dict().items():
            assert torch.equal(net.backbone.state_dict()[k], v), (name, k)
    with pytest.raises(FileNotFoundError):
        MultiTaskNet("tiny", pretrained=str(tmp_path / "missing.pth"))
    torch.save({"nothing.here": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no key"):
        MultiTaskNet("tiny", pretrained=str(tmp_path / "bad.pth"))


def test_torchvision_weights_only_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local torch hub cache"):
        MultiTaskNet("resnet18", pretrained="torchvision")
    # Put a file where torchvision's download would land: it is used, nothing is fetched.
    import torchvision.models as tvm

    donor = tvm.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(donor.state_dict(), cache / os.path.basename(tvm.ResNet18_Weights.DEFAULT.url))
    net = MultiTaskNet("resnet18", pretrained="torchvision")
    assert torch.equal(net.backbone.conv1.weight, donor.conv1.weight)


# ------------------------------------------------------------------------------------------- loss

def _outputs(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"age": (torch.rand(n, generator=g) * 60).requires_grad_(),
            "age_bin_logits": torch.randn(n, 9, generator=g).requires_grad_(),
            "gender_logit": torch.randn(n, generator=g).requires_grad_(),
            "ethnicity_logits": torch.randn(n, 5, generator=g).requires_grad_()}


def test_loss_matches_reference_on_known_rows():
    out = _outputs()
    tg = {"age": torch.tensor([10.0, NAN, 30.0, NAN]), "age_bin": torch.tensor([1, 2, -1, 8]),
          "gender": torch.tensor([0, 1, 1, -1]), "ethnicity": torch.tensor([-1, 4, 0, 2])}
    parts = head_losses(out, tg)
    assert parts["age"].item() == pytest.approx(F.l1_loss(out["age"][[0, 2]], tg["age"][[0, 2]]).item(), rel=1e-6)
    assert parts["age_bin"].item() == pytest.approx(
        F.cross_entropy(out["age_bin_logits"][[0, 1, 3]], tg["age_bin"][[0, 1, 3]]).item(), rel=1e-6)
    assert parts["gender"].item() == pytest.approx(F.binary_cross_entropy_with_logits(
        out["gender_logit"][:3], tg["gender"][:3].float()).item(), rel=1e-6)
    assert parts["ethnicity"].item() == pytest.approx(
        F.cross_entropy(out["ethnicity_logits"][1:], tg["ethnicity"][1:]).item(), rel=1e-6)


def test_masked_rows_get_no_gradient():
    out = _outputs()
    tg = {"age": torch.tensor([10.0, NAN, 30.0, NAN]), "age_bin": torch.tensor([1, -1, -1, 8]),
          "gender": torch.tensor([0, 1, -1, -1]), "ethnicity": torch.tensor([-1, 4, 0, -1])}
    total, _ = multitask_loss(out, tg)
    total.backward()
    masked = {"age": [1, 3], "age_bin_logits": [1, 2], "gender_logit": [2, 3], "ethnicity_logits": [0, 3]}
    for key, rows in masked.items():
        grad = out[key].grad
        assert torch.isfinite(grad).all(), key
        assert torch.all(grad[rows] == 0), key
        kept = [i for i in range(4) if i not in rows]
        assert grad[kept].abs().sum() > 0, key


def test_all_missing_head_is_zero_and_finite():
    out = _outputs()
    tg = {"age": torch.full((4,), NAN), "age_bin": torch.full((4,), -1), "gender": torch.tensor([0, 1, 0, 1]),
          "ethnicity": torch.full((4,), -1)}
    total, parts = multitask_loss(out, tg)
    assert parts["age"].item() == 0 and parts["age_bin"].item() == 0 and parts["ethnicity"].item() == 0
    assert math.isfinite(total.item()) and total.item() > 0  # gender still counts
    total.backward()
    assert torch.all(out["age"].grad == 0) and torch.all(out["ethnicity_logits"].grad == 0)
    assert out["gender_logit"].grad.abs().sum() > 0


def test_loss_weights():
    out = _outputs()
    tg = {"age": torch.tensor([10.0, 20, 30, 40]), "age_bin": torch.tensor([1, 2, 3, 4]),
          "gender": torch.tensor([0, 1, 0, 1]), "ethnicity": torch.tensor([0, 1, 2, 3])}
    w = LossWeights(age=0.5, age_bin=2, gender=3, ethnicity=0)
    total, parts = multitask_loss(out, tg, w)
    expected = 0.5 * parts["age"] + 2 * parts["age_bin"] + 3 * parts["gender"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert torch.all(out["ethnicity_logits"].grad == 0)  # weight 0: no gradient
    assert LossWeights() == LossWeights(age=1, age_bin=1, gender=5, ethnicity=5)  # the paper's UTK/synthetic


# ------------------------------------------------------------------------------------- transforms

def _framed_image(size: int = 448, inner: int = 300) -> np.ndarray:
    """Blue border, red centre square of side `inner`."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 2] = 255
    o = (size - inner) // 2
    img[o:o + inner, o:o + inner] = (255, 0, 0)
    return img


def test_decode_resize_centre_crop():
    data = encode_jpeg(_framed_image())
    cropped = decode_resize(data, 64, center_crop=296)  # just inside the red square
    assert cropped.shape == (64, 64, 3) and cropped.dtype == np.uint8
    assert cropped[..., 0].min() > 200 and cropped[..., 2].max() < 60  # only red left
    full = decode_resize(data, 64)
    assert full[0, 0, 2] > 200  # the border is still there without the crop
    gpu_path = decode_to_tensor([data], 64, center_crop=296).permute(0, 2, 3, 1)[0].numpy()
    assert np.abs(gpu_path.astype(int) - cropped.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="undecodable"):
        decode_resize(b"not a jpeg", 32)


def test_decode_batch_and_label_nulls():
    img = encode_jpeg(np.full((40, 40, 3), 128, np.uint8))
    batch = {"image": np.array([img, img], dtype=object), "id": np.array([7, 8]),
             "age": np.array([None, 30.0], dtype=object), "age_bin": np.array([None, 4], dtype=object),
             "gender": np.array([1, 0]), "ethnicity": np.array([3.0, np.nan])}
    out = decode_batch(batch, 32, is_synthetic=1)
    assert out["image"].shape == (2, 32, 32, 3)
    assert np.isnan(out["age"][0]) and out["age"][1] == 30
    assert out["age_bin"].tolist() == [-1, 4] and out["ethnicity"].tolist() == [3, -1]
    assert out["is_synthetic"].tolist() == [1, 1] and out["id"].tolist() == [7, 8]
    assert labels_to_numpy({"image": [b"", b""]})["gender"].tolist() == [-1, -1]  # absent column: unknown


def test_batch_augment_is_per_sample_and_identity_when_off():
    torch.manual_seed(0)
    x = torch.from_numpy(np.stack([decode_resize(encode_jpeg(_framed_image(64, 40)), 48)] * 6)).permute(0, 3, 1, 2).float()
    off = BatchAugment(0, 0, 0, 0)(x)
    assert torch.allclose(off, x, atol=0.05)
    on = BatchAugment(1, 1, 1, 1)(x)
    assert on.shape == x.shape and on.min() >= 0 and on.max() <= 255
    assert (on[0] - on[1]).abs().mean() > 1  # each sample drew its own parameters
    assert torch.allclose(on[:, 0], on[:, 1], atol=41)  # to-gray then RGB shift (<= 20 each way)
    gray_only = BatchAugment(0, 1, 0, 0)(x)
    assert torch.allclose(gray_only[:, 0], gray_only[:, 2])


def test_paper_augment_and_normalisation():
    img = torch.from_numpy(_framed_image(64, 40)).permute(2, 0, 1)
    torch.manual_seed(1)
    outs = [paper_augment()(img) for _ in range(8)]
    assert all(o.shape == img.shape and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, img) for o in outs)
    x = to_model_input(torch.full((2, 8, 8, 3), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[:, 0], torch.full((2, 8, 8), (1 - 0.485) / 0.229))
    assert torch.allclose(normalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) /
                          torch.tensor([0.229, 0.224, 0.225]))
