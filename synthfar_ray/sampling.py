"""Stage 3: choose the synthetic rows worth training on (`synthfar sample CONFIG [key=value ...]`).

Methods (the sampling paper's, adapted to diffusion data):
- `random`: a seeded uniform score per id (a pure function of (seed, id)), so "random top-K" is a
  reproducible random subset of each class.
- `cl-sam`: class confidence. A classifier trained on real data gives p(ethnicity|x), p(gender|x),
  p(age_bin|x) of the row's *own* labels; they are combined (`product`, `mean` or `min`) over the
  fields of `class_key`. High score = the image clearly shows the class it was generated for.
- `cr-sam`: class realism. A real-vs-synthetic discriminator (a binary head on a `build_backbone`
  encoder, trained here on real train rows vs synthetic rows, class-balanced batches) gives
  p(real | x). High score = hard to tell from a real photo.

Data flow: cl-sam / cr-sam scores are one Ray Data batch-inference job over every synthetic row
(`map_batches` with an actor class that loads its model once; random reads only ids), cached as Parquet under
`<synthetic>/_scores/<method>-<fingerprint>/` so Tune and repeated runs score each method once.
The selection (top-K per class, K split equally over the classes present, ties broken by id) is
pure pandas on the cached scores, written to `<synthetic>/_selections/<method>-<K>/`:
`selection.parquet` (id, score, class, chosen, rank, method) + `_manifest.json`.

Why folders starting with `_`: Ray Data's `read_parquet` skips paths starting with `_` or `.`, so a
reader of the synthetic dataset folder never picks up score or selection files by accident.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from synthfar_ray import storage as st
from synthfar_ray.config import StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.labels import AGE_BIN_NAMES, ETHNICITIES, GENDERS
from synthfar_ray.model import build_backbone
from synthfar_ray.storage import StorageOptions
from synthfar_ray.transforms import BatchAugment, decode_resize, to_model_input

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("random", "cl-sam", "cr-sam")
CLASS_FIELDS: tuple[str, ...] = ("ethnicity", "gender", "age_bin")
CLASS_NAMES: dict[str, tuple[str, ...]] = {"ethnicity": ETHNICITIES, "gender": GENDERS, "age_bin": AGE_BIN_NAMES}
MANIFEST = "_manifest.json"
SELECTIONS_DIR = "_selections"
SCORES_DIR = "_scores"
SELECTION_FILE = "selection.parquet"
SCORES_FILE = "scores.parquet"
DISCRIMINATOR_FILE = "discriminator.pt"
UNKNOWN_CLASS = "unknown"

Method = Literal["random", "cl-sam", "cr-sam"]
ClassField = Literal["ethnicity", "gender", "age_bin"]
Combine = Literal["product", "mean", "min"]


# ---------------------------------------------------------------------------------------------
# Config


class ScorerTrain(StrictModel):
    """Small training budget for the models this stage trains itself (cl-sam classifier when none
    is given, cr-sam discriminator)."""

    backbone: str = Field("resnet18", description="model.build_backbone name (tiny, resnet18/34/50/101, timm/...)")
    pretrained: str | None = Field(None, description="local backbone weights file, or 'torchvision' (hub cache)")
    image_size: int = Field(64, ge=8, description="side of the square inputs")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2, description="discriminator: half real, half synthetic")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = Field(True, description="paper augmentations on the training batches")
    max_rows: int = Field(20000, ge=2, description="discriminator: rows read per domain (random, seeded), "
                                                   "held decoded in memory")
    center_crop: int | None = Field(None, ge=8, description="real images: centre square crop side before resizing "
                                                            "(FairFace 448 px: 300), as in train.py")
    synthetic_center_crop: int | None = Field(None, ge=8, description="synthetic images: the same")
    use_gpu: bool | None = Field(None, description="default: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="classifier: CPUs of its Ray Train worker")
    data_cpus: float = Field(0.5, gt=0, description="classifier: CPUs per Ray Data decode task")


class SampleConfig(StageConfig):
    synthetic: str = Field(description="synthetic dataset URI")
    real: str = Field(description="real dataset URI (its split=='train' rows are used)")
    real_subset: Literal[25, 50, 75, 100] = Field(100, description="real rows with subset <= this")
    method: Method = "cl-sam"
    k: int | None = Field(None, ge=1, description="absolute number of synthetic rows to keep ...")
    k_multiple: float | None = Field(1.0, gt=0, description="... or a multiple of the real training set size")
    class_key: list[ClassField] = Field(default_factory=lambda: list(CLASS_FIELDS),
                                        description="fields that make a class for top-K per class")
    combine: Combine = Field("product", description="cl-sam: how the per-field probabilities combine")
    redistribute: bool = Field(False, description="give the shortfall of short classes to the other classes")
    classifier: str | None = Field(None, description="cl-sam: checkpoint URI of a model trained on real data")
    scorer_train: ScorerTrain = ScorerTrain()
    output: str | None = Field(None, description="selection URI; default <synthetic>/_selections/<method>-<K>")
    reuse_scores: bool = Field(True, description="use cached scores for the same method and settings")
    seed: int = 0
    batch_size: int = Field(64, ge=1, description="scoring batch")
    num_actors: int | None = Field(None, ge=1, description="scoring actors; default: one per GPU, else 1")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")

    @model_validator(mode="before")
    @classmethod
    def _k_replaces_default_multiple(cls, data: Any) -> Any:
        # `k=500` alone means "500 rows": drop the default multiple instead of calling it ambiguous.
        if isinstance(data, dict) and data.get("k") is not None and "k_multiple" not in data:
            data = {**data, "k_multiple": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SampleConfig":
        if (self.k is None) == (self.k_multiple is None):
            raise ValueError("set exactly one of k (rows) and k_multiple (x real training rows); "
                             "to replace a config's k_multiple on the command line: k=N k_multiple=null")
        if not self.class_key or len(set(self.class_key)) != len(self.class_key):
            raise ValueError(f"class_key must list distinct fields of {CLASS_FIELDS}, got {self.class_key}")
        return self


@dataclass
class SampleResult:
    output: str  # selection folder URI
    method: str
    k: int
    chosen: int
    scores_uri: str
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Pure pieces: random scores, class names, top-K per class


def random_scores(ids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) score per id, a pure function of (seed, id) (splitmix64 hash), so the same
    row gets the same score however the data is split into batches."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15) * np.uint64((seed & 0xFFFFFFFF) + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _label_array(col: Any, n: int) -> np.ndarray:
    """A label column (numpy, possibly float with NaN or object with None) -> int64, -1 unknown."""
    if col is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.array([-1 if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in arr], dtype=np.float64)
    if arr.dtype.kind == "f":
        arr = np.where(np.isnan(arr), -1, arr)
    return arr.astype(np.int64)


def class_names(scores: pd.DataFrame, class_key: Iterable[str]) -> pd.Series:
    """"white/female/20-29" per row (fields in class_key order); UNKNOWN_CLASS where a field is unknown."""
    parts = []
    unknown = np.zeros(len(scores), dtype=bool)
    for key in class_key:
        if key not in scores.columns:
            raise ValueError(f"scores have no column {key!r} (columns: {list(scores.columns)})")
        values = _label_array(scores[key].to_numpy(), len(scores))
        names = CLASS_NAMES[key]
        bad = (values < 0) | (values >= len(names))
        unknown |= bad
        parts.append(np.array([names[v] if not b else "" for v, b in zip(values, bad)], dtype=object))
    joined = ["/".join(p) for p in zip(*parts)] if parts else [""] * len(scores)
    return pd.Series(np.where(unknown, UNKNOWN_CLASS, np.array(joined, dtype=object)), index=scores.index, dtype=object)


def class_quotas(available: dict[str, int], k: int, redistribute: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """Split k equally over the classes (the remainder goes one each to the first classes by name).

    Returns (kept per class, wanted per class). A class with fewer rows than its share keeps all its
    rows; with `redistribute` the shortfall is shared again among the classes that have rows left
    (water-filling), so the total is min(k, all rows)."""
    names = sorted(c for c, n in available.items() if n > 0)
    kept = {c: 0 for c in available}
    wanted: dict[str, int] = {c: 0 for c in available}
    remaining, active, first = k, names, True
    while remaining > 0 and active:
        share, extra = divmod(remaining, len(active))
        for i, c in enumerate(active):
            want = share + (1 if i < extra else 0)
            if first:
                wanted[c] = want
            give = min(want, available[c] - kept[c])
            kept[c] += give
            remaining -= give
        first = False
        if not redistribute:
            break
        active = [c for c in active if kept[c] < available[c]]
    return kept, wanted


def select_top_k(scores: pd.DataFrame, k: int, class_key: list[str], redistribute: bool = False) -> pd.DataFrame:
    """Top-K per class of a score table.

    scores: columns id, score and the class_key fields (label indices, < 0 or null = unknown).
    K is split equally over the classes present (see `class_quotas`); within a class rows rank by
    score, highest first, ties by id (ascending), so the result is deterministic. Rows with an
    unknown class field are never chosen (class "unknown").
    Returns one row per input row: id, score, class, rank (1 = best in its class), chosen, sorted
    by class then rank.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for col in ("id", "score"):
        if col not in scores.columns:
            raise ValueError(f"scores have no column {col!r} (columns: {list(scores.columns)})")
    if scores["id"].duplicated().any():
        dup = scores.loc[scores["id"].duplicated(), "id"].iloc[0]
        raise ValueError(f"scores hold id {dup} more than once")
    out = pd.DataFrame({"id": scores["id"].astype(np.int64).to_numpy(),
                        "score": scores["score"].astype(np.float64).to_numpy(),
                        "class": class_names(scores, class_key).to_numpy()})
    if out["score"].isna().any():
        raise ValueError(f"{int(out['score'].isna().sum())} scores are NaN")
    out = out.sort_values(["class", "score", "id"], ascending=[True, False, True], kind="stable").reset_index(drop=True)
    out["rank"] = out.groupby("class", sort=False).cumcount().astype(np.int64) + 1

    known = out["class"] != UNKNOWN_CLASS
    n_unknown = int((~known).sum())
    if n_unknown:
        logger.warning("%d rows have an unknown %s label and are never chosen", n_unknown, "/".join(class_key))
    available = out.loc[known, "class"].value_counts().to_dict()
    kept, wanted = class_quotas(available, k, redistribute)
    short = {c: (available[c], wanted[c]) for c in sorted(available) if available[c] < wanted[c]}
    for c, (have, want) in short.items():
        logger.warning("class %s: %d rows < %d wanted; keeping all %d", c, have, want, have)
    if short:
        total = sum(kept.values())
        if redistribute:
            logger.warning("shortfall of %d rows redistributed over the other classes: %d of K=%d kept",
                           sum(w - h for h, w in short.values()), total, k)
        else:
            logger.warning("%d of K=%d rows kept (shortfall not redistributed)", total, k)
    quota = out["class"].map(kept).fillna(0).astype(np.int64)
    out["chosen"] = known & (out["rank"] <= quota)
    return out[["id", "score", "class", "rank", "chosen"]]


def resolve_k(cfg_k: int | None, k_multiple: float | None, real_train_rows: int) -> int:
    if cfg_k is not None:
        return int(cfg_k)
    if real_train_rows <= 0:
        raise ValueError("k_multiple needs real training rows, but the real set has none (split=='train')")
    return max(1, int(round(float(k_multiple) * real_train_rows)))


def selection_uri(synthetic: str, method: str, k: int) -> str:
    return st.join(synthetic, SELECTIONS_DIR, f"{method}-{k}")


# ---------------------------------------------------------------------------------------------
# Dataset access (label columns and sampled images; never every image on the driver)


def open_dataset(uri: str, opts: StorageOptions | None) -> pads.Dataset:
    return st.open_parquet_dataset(uri, opts)


def train_filter(dataset: pads.Dataset, real_subset: int | None = None) -> pc.Expression | None:
    """split == 'train' (when the set has splits) and subset <= real_subset (when it has subsets)."""
    names = dataset.schema.names
    expr = None
    if "split" in names:
        expr = pc.field("split") == "train"
    if real_subset is not None and real_subset < 100 and "subset" in names:
        sub = pc.field("subset") <= real_subset
        expr = sub if expr is None else expr & sub
    return expr


def count_real_train(uri: str, real_subset: int, opts: StorageOptions | None) -> int:
    dataset = open_dataset(uri, opts)
    return int(dataset.count_rows(filter=train_filter(dataset, real_subset)))


def sample_images(uri: str, n: int, size: int, opts: StorageOptions | None, seed: int,
                  real_subset: int | None = None, center_crop: int | None = None) -> np.ndarray:
    """Up to n training rows of a dataset (seeded random), decoded to (n, size, size, 3) uint8.
    Reads ids first, then only the chosen rows' image bytes."""
    dataset = open_dataset(uri, opts)
    expr = train_filter(dataset, real_subset)
    ids = dataset.to_table(columns=["id"], filter=expr).column("id").to_numpy()
    if len(ids) == 0:
        raise ValueError(f"dataset {uri} has no training rows")
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    id_filter = pc.field("id").isin(pa.array(ids))
    table = dataset.to_table(columns=["image"], filter=id_filter if expr is None else expr & id_filter)
    return np.stack([decode_resize(b, size, center_crop) for b in table.column("image").to_pylist()])


# ---------------------------------------------------------------------------------------------
# cr-sam: real-vs-synthetic discriminator


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


def _discriminator_bytes(model: Discriminator, settings: ScorerTrain) -> bytes:
    buf = io.BytesIO()
    torch.save({"backbone": settings.backbone, "image_size": settings.image_size,
                "synthetic_center_crop": settings.synthetic_center_crop,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, buf)
    return buf.getvalue()


def load_discriminator(data: bytes, device: str = "cpu"):
    """(model, image_size, synthetic_center_crop) from the bytes `fit_discriminator` stores."""
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = Discriminator(blob["backbone"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), int(blob["image_size"]), blob.get("synthetic_center_crop")


def _fit_discriminator_task(real: str, synthetic: str, real_subset: int, settings_json: str,
                            opts: StorageOptions | None, seed: int) -> bytes:
    settings = ScorerTrain.model_validate_json(settings_json)
    device = "cuda" if torch.cuda.is_available() and settings.use_gpu is not False else "cpu"
    real_images = sample_images(real, settings.max_rows, settings.image_size, opts, seed, real_subset,
                                settings.center_crop)
    syn_images = sample_images(synthetic, settings.max_rows, settings.image_size, opts, seed + 1, None,
                               settings.synthetic_center_crop)
    logger.info("discriminator: %d real vs %d synthetic images at %d px on %s",
                len(real_images), len(syn_images), settings.image_size, device)
    model = train_discriminator(real_images, syn_images, settings, seed=seed, device=device)
    return _discriminator_bytes(model, settings)


def fit_discriminator(real: str, synthetic: str, settings: ScorerTrain, opts: StorageOptions | None = None,
                      real_subset: int = 100, seed: int = 0) -> bytes:
    """Train the cr-sam discriminator as one Ray task (1 GPU when the cluster has GPUs); returns the
    serialised model (see `load_discriminator`)."""
    import ray

    _ensure_ray()
    gpu = _use_gpu(settings.use_gpu)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=1)(_fit_discriminator_task)
    return ray.get(task.remote(real, synthetic, real_subset, settings.model_dump_json(), opts, seed))


# ---------------------------------------------------------------------------------------------
# Scoring job (Ray Data)


class ScoreActor:
    """Ray Data map_batches actor: loads the scoring model once, scores batches of synthetic rows."""

    def __init__(self, method: str, model_uri: str | None, opts: StorageOptions | None, class_key: list[str],
                 combine: str, use_gpu: bool):
        self.method, self.class_key, self.combine = method, list(class_key), combine
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.center_crop: int | None = None
        if method == "cr-sam":
            self.model, self.size, self.center_crop = load_discriminator(st.read_bytes(model_uri, opts), self.device)
        elif method == "cl-sam":
            from synthfar_ray.train import load_model

            model, meta = load_model(model_uri, opts)
            self.model = model.to(self.device).eval()
            self.size, self.center_crop = _input_geometry(meta)
            fields = [f for f in self.class_key if _head_for(f, self.model)]
            missing = [f for f in self.class_key if f not in fields]
            if missing:
                logger.warning("classifier %s has no head for %s: cl-sam combines %s only", model_uri, missing, fields)
            if not fields:
                raise ValueError(f"classifier {model_uri} has no head for any of {self.class_key}")
            self.fields = fields
        else:
            raise ValueError(f"ScoreActor does not score method {method!r}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        labels = {f: _label_array(batch.get(f), n) for f in CLASS_FIELDS}
        images = np.stack([decode_resize(b, self.size, self.center_crop) for b in batch["image"]]) if n \
            else np.zeros((0, self.size, self.size, 3), np.uint8)
        with torch.no_grad():
            x = to_model_input(torch.from_numpy(images).to(self.device))
            if self.method == "cr-sam":
                score = torch.sigmoid(self.model(x).float()).cpu().numpy().astype(np.float64)
            else:
                score = cl_sam_scores({k: v.float().cpu().numpy() for k, v in self.model(x).items()},
                                      labels, self.fields, self.combine)
        return {"id": np.asarray(batch["id"], dtype=np.int64), **{f: labels[f] for f in CLASS_FIELDS},
                "score": score}


def _head_for(field_name: str, model) -> bool:
    return getattr(model, {"ethnicity": "ethnicity", "gender": "gender", "age_bin": "age_bin"}[field_name], None) is not None


def _input_geometry(meta: dict[str, Any]) -> tuple[int, int | None]:
    """Input size of the classifier and the centre crop it used for synthetic images (train.py's
    checkpoint meta)."""
    size, crop = meta.get("image_size"), meta.get("synthetic_center_crop")
    if not size:
        raise ValueError(f"classifier metadata does not say its input image_size (keys: {sorted(meta)})")
    return int(size), (int(crop) if crop else None)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cl_sam_scores(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], fields: list[str],
                  combine: str) -> np.ndarray:
    """Probability of each row's own label per field, combined over `fields`.

    outputs: MultiTaskNet outputs as numpy ("ethnicity_logits", "gender_logit", "age_bin_logits").
    A row whose label of a field is unknown (< 0) gets probability 0 for it."""
    probs = []
    for f in fields:
        y = labels[f]
        known = y >= 0
        if f == "gender":
            p1 = 1.0 / (1.0 + np.exp(-outputs["gender_logit"].reshape(-1).astype(np.float64)))
            p = np.where(y == 1, p1, 1.0 - p1)
        else:
            key = "ethnicity_logits" if f == "ethnicity" else "age_bin_logits"
            sm = _softmax(outputs[key].astype(np.float64))
            p = sm[np.arange(len(y)), np.clip(y, 0, sm.shape[1] - 1)]
        probs.append(np.where(known, p, 0.0))
    stacked = np.stack(probs)
    if combine == "product":
        return stacked.prod(axis=0)
    if combine == "mean":
        return stacked.mean(axis=0)
    if combine == "min":
        return stacked.min(axis=0)
    raise ValueError(f"combine must be product, mean or min, not {combine!r}")


def _random_batch(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    n = len(batch["id"])
    ids = np.asarray(batch["id"], dtype=np.int64)
    return {"id": ids, **{f: _label_array(batch.get(f), n) for f in CLASS_FIELDS}, "score": random_scores(ids, seed)}


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def _use_gpu(setting: bool | None) -> bool:
    import ray

    has = ray.cluster_resources().get("GPU", 0) > 0
    if setting and not has:
        raise ValueError("use_gpu is true but the Ray cluster has no GPU")
    return has if setting is None else bool(setting)


def score_dataset(cfg: SampleConfig, model_uri: str | None) -> pd.DataFrame:
    """Scores of every synthetic row -> DataFrame id, ethnicity, gender, age_bin, score (by id).

    cl-sam / cr-sam: a Ray Data batch-inference job (`ScoreActor` pool). random needs no model and
    no pixels: it reads the id and label columns only and hashes the ids on the driver."""
    import ray

    dataset = open_dataset(cfg.synthetic, cfg.storage)
    schema = dataset.schema.names
    labels = [f for f in CLASS_FIELDS if f in schema]
    missing = [f for f in cfg.class_key if f not in schema]
    if missing:
        raise ValueError(f"synthetic dataset {cfg.synthetic} has no column(s) {missing} named in class_key")
    t0 = time.time()
    if cfg.method == "random":
        table = dataset.to_table(columns=["id", *labels])
        batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        df = pd.DataFrame(_random_batch(batch, cfg.seed))
    else:
        _ensure_ray()
        fs, path = st.resolve(cfg.synthetic, cfg.storage)
        gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if _use_gpu(None) else 0.0)
        n_gpu = int(ray.cluster_resources().get("GPU", 0))
        actors = cfg.num_actors or (max(1, int(n_gpu // gpus)) if gpus > 0 else 1)
        ds = ray.data.read_parquet(path, filesystem=fs, columns=["id", "image", *labels]).map_batches(
            ScoreActor,
            fn_constructor_kwargs={"method": cfg.method, "model_uri": model_uri, "opts": cfg.storage,
                                   "class_key": list(cfg.class_key), "combine": cfg.combine, "use_gpu": gpus > 0},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=gpus,
        )
        frames = list(ds.iter_batches(batch_format="pandas", batch_size=None))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", *CLASS_FIELDS, "score"])
    logger.info("%s: scored %d synthetic rows in %.1f s", cfg.method, len(df), time.time() - t0)
    return df.sort_values("id", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Score cache


def _fingerprint(cfg: SampleConfig) -> str:
    """What the scores depend on (not K, not the output): method, inputs and scorer settings."""
    key: dict[str, Any] = {"method": cfg.method, "synthetic": cfg.synthetic}
    if cfg.method == "random":
        key["seed"] = cfg.seed
    elif cfg.method == "cl-sam":
        key.update(class_key=list(cfg.class_key), combine=cfg.combine, classifier=cfg.classifier)
        if cfg.classifier is None:
            key.update(real=cfg.real, real_subset=cfg.real_subset, scorer=cfg.scorer_train.model_dump(mode="json"),
                       seed=cfg.seed)
    else:
        key.update(real=cfg.real, real_subset=cfg.real_subset, scorer=cfg.scorer_train.model_dump(mode="json"),
                   seed=cfg.seed)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def scores_dir(cfg: SampleConfig) -> str:
    return st.join(cfg.synthetic, SCORES_DIR, f"{cfg.method}-{_fingerprint(cfg)}")


def _write_parquet(df: pd.DataFrame, uri: str, opts: StorageOptions | None) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    st.write_bytes(uri, buf.getvalue(), opts)


def _read_parquet(uri: str, opts: StorageOptions | None) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(st.read_bytes(uri, opts))).to_pandas()


def classifier_train_config(cfg: SampleConfig, storage_path: str):
    """The train.py TrainConfig of the small real-data classifier cl-sam trains when none is given."""
    from synthfar_ray.train import ModelConfig, TrainConfig

    s = cfg.scorer_train
    return TrainConfig(
        name="classifier", storage_path=storage_path, plan="real", real=cfg.real, real_subset=cfg.real_subset,
        steps=s.steps, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
        warmup_steps=max(0, s.steps // 10), augment=s.augment, image_size=s.image_size,
        center_crop=s.center_crop, synthetic_center_crop=s.synthetic_center_crop,
        model=ModelConfig(backbone=s.backbone, pretrained=s.pretrained, age_mode="both"),
        val_source="none", val_every=s.steps, log_every=max(1, s.steps // 5), use_gpu=s.use_gpu,
        cpus_per_worker=s.cpus_per_worker, data_cpus=s.data_cpus, seed=cfg.seed, keep_checkpoints=1,
        storage=cfg.storage)


def _train_classifier(cfg: SampleConfig, out_dir: str) -> str:
    """cl-sam without a classifier: train a small one on the real training rows with train.py."""
    from synthfar_ray.train import run_train

    s = cfg.scorer_train
    logger.info("cl-sam: training a %s classifier on %s (%d steps at %d px)", s.backbone, cfg.real, s.steps, s.image_size)
    result = run_train(classifier_train_config(cfg, out_dir))
    if not result.checkpoint:
        raise ValueError(f"classifier training in {out_dir} produced no checkpoint")
    return result.checkpoint


def compute_scores(cfg: SampleConfig) -> tuple[pd.DataFrame, str]:
    """Scores of every synthetic row for cfg.method, from the cache when there (and reuse_scores)."""
    folder = scores_dir(cfg)
    uri = st.join(folder, SCORES_FILE)
    if cfg.reuse_scores and st.exists(st.join(folder, MANIFEST), cfg.storage):
        logger.info("%s: using cached scores %s", cfg.method, uri)
        return _read_parquet(uri, cfg.storage), uri
    t0 = time.time()
    info: dict[str, Any] = {"method": cfg.method, "synthetic": cfg.synthetic, "fingerprint": _fingerprint(cfg)}
    model_uri = None
    if cfg.method == "cl-sam":
        model_uri = cfg.classifier or _train_classifier(cfg, folder)
        info["classifier"] = model_uri
        info["trained_classifier"] = cfg.classifier is None
    elif cfg.method == "cr-sam":
        model_uri = st.join(folder, DISCRIMINATOR_FILE)
        st.write_bytes(model_uri, fit_discriminator(cfg.real, cfg.synthetic, cfg.scorer_train, cfg.storage,
                                                    cfg.real_subset, cfg.seed), cfg.storage)
        info["discriminator"] = model_uri
    if cfg.method != "random":
        info.update(real=cfg.real, real_subset=cfg.real_subset, scorer_train=cfg.scorer_train.model_dump(mode="json"))
    df = score_dataset(cfg, model_uri)
    _write_parquet(df, uri, cfg.storage)
    info.update(rows=len(df), seconds=round(time.time() - t0, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # Manifest last: it marks the cache entry complete.
    st.write_bytes(st.join(folder, MANIFEST), json.dumps(info, indent=2).encode(), cfg.storage)
    return df, uri


# ---------------------------------------------------------------------------------------------
# Stage


def write_selection(selection: pd.DataFrame, output: str, method: str, k: int, opts: StorageOptions | None,
                    extra: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """selection.parquet (id, score, class, chosen, rank, method) + _manifest.json; returns per-class counts."""
    table = selection.assign(method=method)[["id", "score", "class", "chosen", "rank", "method"]]
    available = table[table["class"] != UNKNOWN_CLASS].groupby("class").size()
    kept = table[table["chosen"]].groupby("class").size()
    per_class = {c: {"available": int(available[c]), "kept": int(kept.get(c, 0))} for c in available.index}
    _write_parquet(table, st.join(output, SELECTION_FILE), opts)
    manifest = {"method": method, "k": k, "chosen": int(table["chosen"].sum()), "rows": len(table),
                "classes": per_class, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    st.write_bytes(st.join(output, MANIFEST), json.dumps(manifest, indent=2).encode(), opts)
    return per_class


def read_selection_ids(uri: str, opts: StorageOptions | None = None) -> np.ndarray:
    """Sorted ids chosen in a selection folder (what training keeps of the synthetic set)."""
    path = uri if uri.endswith(".parquet") else st.join(uri, SELECTION_FILE)
    table = pq.read_table(io.BytesIO(st.read_bytes(path, opts)), columns=["id", "chosen"])
    ids = table.filter(table.column("chosen")).column("id").to_numpy()
    return np.sort(ids)


def run_sample(cfg: SampleConfig) -> SampleResult:
    t0 = time.time()
    real_rows = count_real_train(cfg.real, cfg.real_subset, cfg.storage) if cfg.k is None else None
    k = resolve_k(cfg.k, cfg.k_multiple, real_rows or 0)
    scores, scores_uri = compute_scores(cfg)
    selection = select_top_k(scores, k, list(cfg.class_key), cfg.redistribute)
    output = cfg.output or selection_uri(cfg.synthetic, cfg.method, k)
    per_class = write_selection(selection, output, cfg.method, k, cfg.storage, extra={
        "k_multiple": cfg.k_multiple, "real_train_rows": real_rows, "class_key": list(cfg.class_key),
        "redistribute": cfg.redistribute, "synthetic": cfg.synthetic, "real": cfg.real, "scores": scores_uri,
        "config": dump_config(cfg)})
    chosen = int(selection["chosen"].sum())
    logger.info("%s: kept %d of %d synthetic rows (K=%d, %d classes) -> %s",
                cfg.method, chosen, len(selection), k, len(per_class), output)
    return SampleResult(output=output, method=cfg.method, k=k, chosen=chosen, scores_uri=scores_uri,
                        per_class=per_class, seconds=time.time() - t0)


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args

    p = subparsers.add_parser("sample", help="select synthetic rows (random, cl-sam, cr-sam top-K per class)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(SampleConfig, args.config, args.overrides)
    result = run_sample(cfg)
    print(f"{result.method}: kept {result.chosen} rows (K={result.k}) over {len(result.per_class)} classes "
          f"in {result.seconds:.1f} s -> {result.output}")
    return 0
