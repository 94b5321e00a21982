"""The multi-task face-attribute net: one image encoder, four linear heads (+ synthetic-only ones).

Heads (paper: ResNet-50 encoder, Linear(2048, .) heads): age regression (1, years), age bins (9,
FairFace bins), gender (1 logit, > 0 means female) and ethnicity (5 logits). `age_mode` chooses
which age heads exist; `synthetic_heads` adds heads only synthetic rows label (synthetic_heads.py):
`pose` (yaw, pitch, roll in degrees), `hair` (hair length and hair colour logits) and `keypoints`
(x, y of keypoints.KEYPOINT_NAMES as fractions of the image side); `transfer` adds heads on DETACHED
outputs that real labels train: `race7_logits` and `keypoints_real` (a real set's sparse points). `forward`
returns only the heads the net has, under the names `metrics.compute_metrics` reads.

Backbones: torchvision `resnet18` / `resnet34` / `resnet50` / `resnet101`, `tiny` (a four-layer CNN
for tests and laptops), and `timm/<name>` when timm is installed. Weights come only from local
files: a backbone state_dict (.pth/.pt/.safetensors), or "torchvision" meaning the file torchvision
would download, looked up in the local torch hub cache. Nothing is ever downloaded here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from synthfar_ray.errors import UserError
from synthfar_ray.labels import ETHNICITIES, FAIRFACE_RACES7, NUM_AGE_BINS
from synthfar_ray.precision import Precision
from synthfar_ray.keypoints import BASELINE_MAP, KEYPOINT_INDEX, NUM_KEYPOINTS, REAL_KEYPOINT_NAMES
from synthfar_ray.synthetic_heads import HEAD_COLUMNS, KEYPOINT_SCALE, POSE_COLUMNS, POSE_SCALE, hair_vocab

# train.model.transfer: "logits" / "features" are what the race7 head reads; "keypoints" adds the
# head from the dense keypoints to a real set's sparse ones (keypoints.REAL_KEYPOINT_NAMES).
RACE7_INPUTS: tuple[str, ...] = ("logits", "features")
TRANSFER_INPUTS: tuple[str, ...] = (*RACE7_INPUTS, "keypoints")

if TYPE_CHECKING:
    from synthfar_ray.train import AgeMode

logger = logging.getLogger(__name__)


class ModelError(UserError, ValueError):
    """A backbone or weights setting that cannot be built or loaded (names the file or name)."""


TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
HEAD_OUTPUTS = ("age", "age_bin_logits", "gender_logit", "ethnicity_logits")
AGE_BIAS_INIT = 35.0  # years


class TinyCNN(nn.Module):
    """Four strided conv blocks + a 4x4 average pool: learns the test fixtures in seconds on CPU.

    The pooled map keeps coarse position (features = 4 * 4 * channels): on photo-style procedural
    faces (faces.py, 64 px) a global average pool reached gender 0.59 after 1500 steps, the 4x4
    map 0.67 after 600 at about the same cost per step."""

    def __init__(self, width: int = 32, grid: int = 4):
        super().__init__()
        chans = [3, width // 2, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.num_features = chans[-1] * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _torchvision_cached_weights(name: str) -> str:
    """Path of torchvision's default ImageNet weights for `name` in the local hub cache, or a clear error."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained='torchvision' needs {name} weights in the local torch hub cache, but {path} does not exist. "
            f"Nothing is downloaded here: fetch {weights.url} into that folder (or set TORCH_HOME), "
            "or pass pretrained=<path to a .pth/.safetensors backbone state_dict>.")
    return path


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt (torch.save) or .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return state


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load encoder weights, tolerating a `backbone.`/`module.` prefix and classifier keys (fc/head)."""
    own = backbone.state_dict()
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            key = key.removeprefix(prefix)
        if key in own:
            cleaned[key] = value
    if not cleaned:
        raise ModelError(f"no key of {source} matches the backbone (first keys: {list(state)[:5]})")
    bad = [k for k, v in cleaned.items() if v.shape != own[k].shape]
    if bad:
        raise ModelError(f"{source}: shape mismatch for {bad[:5]} (e.g. {bad[0]}: {tuple(cleaned[bad[0]].shape)} "
                         f"vs {tuple(own[bad[0]].shape)})")
    missing = [k for k in own if k not in cleaned]
    backbone.load_state_dict(cleaned, strict=False)
    if missing:
        logger.warning("%s: %d backbone tensors not in the file, left at init (e.g. %s)", source, len(missing), missing[:3])
    logger.info("loaded %d backbone tensors from %s", len(cleaned), source)


def build_backbone(name: str, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """(encoder returning (N, feat) features, feat)."""
    if name == "tiny":
        net: nn.Module = TinyCNN()
        feat = net.num_features
    elif name in TORCHVISION_RESNETS:
        import torchvision.models as tvm

        net = getattr(tvm, name)(weights=None)
        feat = net.fc.in_features
        net.fc = nn.Identity()
    elif name.startswith("timm/"):
        try:
            import timm
        except ImportError as e:
            raise ModelError(f"backbone {name!r} needs the timm package, which is not installed") from e
        net = timm.create_model(name[len("timm/"):], pretrained=False, num_classes=0)
        feat = net.num_features
    else:
        raise ModelError(f"unknown backbone {name!r}: use tiny, {', '.join(TORCHVISION_RESNETS)} or timm/<name>")

    if pretrained:
        if pretrained == "torchvision":
            if name not in TORCHVISION_RESNETS:
                raise ModelError(f"pretrained='torchvision' only applies to torchvision backbones, not {name!r}")
            path = _torchvision_cached_weights(name)
        else:
            path = pretrained
        load_backbone_weights(net, read_state_dict(path), path)
    return net, feat


class MultiTaskNet(nn.Module):
    def __init__(self, backbone: str = "resnet50", pretrained: str | None = None, age_mode: AgeMode = "both",
                 synthetic_heads: Sequence[str] = (), transfer: Sequence[str] = ()):
        super().__init__()
        if age_mode not in ("regression", "bins", "both"):
            raise ValueError(f"age_mode must be regression, bins or both, not {age_mode!r}")
        unknown = sorted(set(synthetic_heads) - set(HEAD_COLUMNS))
        if unknown:
            raise ValueError(f"unknown synthetic heads {unknown}: use {', '.join(HEAD_COLUMNS)}")
        self.synthetic_heads = tuple(h for h in HEAD_COLUMNS if h in synthetic_heads)
        self.backbone_name = backbone
        self.age_mode = age_mode
        self.backbone, feat = build_backbone(backbone, pretrained)
        self.age = nn.Linear(feat, 1) if age_mode in ("regression", "both") else None
        if self.age is not None:
            # Start at a typical age, not 0: an L1 loss at lr 1e-5 would spend thousands of steps
            # just moving the bias.
            nn.init.constant_(self.age.bias, AGE_BIAS_INIT)
        self.age_bin = nn.Linear(feat, NUM_AGE_BINS) if age_mode in ("bins", "both") else None
        self.gender = nn.Linear(feat, 1)
        self.ethnicity = nn.Linear(feat, len(ETHNICITIES))
        # Synthetic-only heads (absent unless asked for: old checkpoints' state_dicts match).
        self.pose = nn.Linear(feat, len(POSE_COLUMNS)) if "pose" in self.synthetic_heads else None
        hair = "hair" in self.synthetic_heads
        self.hair_length = nn.Linear(feat, len(hair_vocab("hair_length"))) if hair else None
        self.hair_color = nn.Linear(feat, len(hair_vocab("hair_color"))) if hair else None
        self.keypoints = nn.Linear(feat, 2 * NUM_KEYPOINTS) if "keypoints" in self.synthetic_heads else None
        # Label transfer (train.model.transfer): FairFace's 7 races from the DETACHED ethnicity logits
        # and/or features, and the real set's sparse keypoints from the DETACHED dense ones, so real
        # labels train these maps and nothing below them.
        bad = sorted(set(transfer) - set(TRANSFER_INPUTS))
        if bad:
            raise ValueError(f"unknown transfer inputs {bad}: use {', '.join(TRANSFER_INPUTS)}")
        self.transfer = tuple(t for t in TRANSFER_INPUTS if t in transfer)
        self.race7_inputs = tuple(t for t in RACE7_INPUTS if t in self.transfer)
        width = len(ETHNICITIES) * ("logits" in self.transfer) + feat * ("features" in self.transfer)
        self.race7 = nn.Linear(width, len(FAIRFACE_RACES7)) if self.race7_inputs else None
        if "keypoints" in self.transfer and self.keypoints is None:
            raise ValueError("transfer 'keypoints' maps the dense keypoint head's points: add keypoints to synthetic_heads")
        self.keypoints_real = baseline_linear() if "keypoints" in self.transfer else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.backbone(x))

    def heads(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' outputs of encoder features (domain adaptation runs them on reversed features too)."""
        out = {"gender_logit": self.gender(f).squeeze(-1), "ethnicity_logits": self.ethnicity(f)}
        if self.age is not None:
            out["age"] = self.age(f).squeeze(-1)
        if self.age_bin is not None:
            out["age_bin_logits"] = self.age_bin(f)
        if self.pose is not None:
            out["pose"] = self.pose(f) * POSE_SCALE  # (N, 3) degrees: yaw, pitch, roll
        if self.hair_length is not None:
            out["hair_length_logits"] = self.hair_length(f)
            out["hair_color_logits"] = self.hair_color(f)
        if self.keypoints is not None:  # (N, 2K) x0, y0, x1, y1, ... fractions of the image side
            out["keypoints"] = 0.5 + self.keypoints(f) * KEYPOINT_SCALE
        if self.race7 is not None:
            inputs = {"logits": out["ethnicity_logits"], "features": f}
            out["race7_logits"] = self.race7(torch.cat([inputs[t].detach() for t in self.race7_inputs], dim=1))
        if self.keypoints_real is not None:  # (N, 2R) the real layout, same frame and scaling
            dense = (out["keypoints"].detach() - 0.5) / KEYPOINT_SCALE
            out["keypoints_real"] = 0.5 + self.keypoints_real(dense) * KEYPOINT_SCALE
        return out


def baseline_linear() -> nn.Linear:
    """The dense -> real keypoint map (scaled coordinates in, scaled coordinates out), starting as
    keypoints.BASELINE_MAP (each real point copies its nearest dense one, bias 0): training moves
    it from the fixed baseline, so it learns the convention's offsets rather than the whole shape."""
    layer = nn.Linear(2 * NUM_KEYPOINTS, 2 * len(REAL_KEYPOINT_NAMES))
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        for r, name in enumerate(REAL_KEYPOINT_NAMES):
            d = KEYPOINT_INDEX[BASELINE_MAP[name]]
            layer.weight[2 * r, 2 * d] = 1.0  # x from x
            layer.weight[2 * r + 1, 2 * d + 1] = 1.0  # y from y
    return layer


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, precision: Precision | None = None,
            nhwc: bool = True, features: bool = False) -> dict[str, torch.Tensor]:
    """Eval-mode outputs (float32) for a uint8 batch already on the model's device; `precision`
    (precision.device_precision: autocast and layout) defaults to fp32, NCHW. `features` adds the
    encoder's pooled features, (N, feat), under "features" (label transfer reads them)."""
    from synthfar_ray.transforms import to_model_input

    amp_dtype = precision.autocast_dtype if precision else None
    was_training = model.training
    model.eval()
    try:
        x = to_model_input(images, None, channels_last=bool(precision and precision.channels_last), nhwc=nhwc)
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if features:
                f = model.backbone(x)
                out = {**model.heads(f), "features": f}
            else:
                out = model(x)
        return {k: v.float() for k, v in out.items()}
    finally:
        model.train(was_training)
