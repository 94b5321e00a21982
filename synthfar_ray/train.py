"""Stage 4: train the multi-task face-attribute net with PyTorch DDP under Ray Train (V2).

Data plans (the paper's experiments):
- `synthetic` / `real`: one dataset;
- `pretrain_finetune`: `pretrain_steps` on synthetic, then `finetune_steps` on real, whole model,
  with a fresh optimizer and warm-up/cosine schedule (and optionally its own lr / loss weights);
- `mix`: every batch holds round(mix_ratio * B) synthetic rows and the rest real.

The budget is in optimizer steps, not epochs: each dataset shard is cycled as often as needed.
`batch_size` is the global batch; each of the `num_workers` DDP workers takes batch_size/num_workers.

Data flow: Parquet (local or s3://) -> Ray Data (filter split/subset/selection, decode + resize on
CPU tasks) -> `streaming_split` across workers (`ray.train.get_dataset_shard`) -> uint8 batches on
the device -> per-sample augmentation and normalisation on the device batch -> DDP step.
Validation runs on rank 0 over the whole val split every `val_every` steps.

Fault tolerance: a checkpoint (model.pt + meta.json + train_state.pt: optimizer, scheduler, scaler,
step, phase) is reported with `ray.train.report` every `checkpoint_every` steps to
`<storage_path>/<name>/`. A worker failure restarts the group from the last checkpoint
(FailureConfig(max_failures=failure_max)), and re-running with the same name + storage_path resumes
too (Ray Train V2 reloads the run's checkpoint list). The data position is not restored: a resumed
run starts a new pass over (reshuffled) data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from synthfar_ray import storage
from synthfar_ray.config import StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.losses import LossWeights
from synthfar_ray.model import AgeMode
from synthfar_ray.storage import StorageOptions
from synthfar_ray.transforms import LABEL_COLUMNS

logger = logging.getLogger(__name__)

Plan = Literal["synthetic", "real", "pretrain_finetune", "mix"]
# Test hook (see tests/test_train.py): "STEP:MARKER_PATH" makes rank 0 raise once after STEP, the
# marker file recording that it fired. Forwarded from the driver's environment to the workers.
FAULT_ENV = "SYNTHFAR_FAULT_TRAIN_STEP"
MODEL_FILE, META_FILE, STATE_FILE = "model.pt", "meta.json", "train_state.pt"
RESULT_FILE, TENSORBOARD_DIR = "result.json", "tensorboard"
CHECKPOINT_PREFIX = "checkpoint_"


class ModelConfig(StrictModel):
    backbone: str = Field("resnet50", description="tiny, resnet18/34/50/101 or timm/<name>")
    pretrained: str | None = Field(None, description="backbone weights: a .pth/.safetensors file (path or URI), "
                                                     "or 'torchvision' for the local torch hub cache")
    age_mode: AgeMode = "both"


class TrainConfig(StageConfig):
    name: str = Field(description="run name: the folder under storage_path; re-running a name resumes it")
    storage_path: str = Field(description="where runs live (local path, file:// or s3://)")
    plan: Plan = "synthetic"
    synthetic: str | None = Field(None, description="synthetic dataset folder URI")
    synthetic_selection: str | None = Field(None, description="Parquet (id, chosen) from the sampling stage: "
                                                              "train on chosen synthetic ids only")
    real: str | None = Field(None, description="real dataset folder URI (UTKFace / FairFace ingest output)")
    real_subset: Literal[25, 50, 75, 100] = Field(100, description="train on the P % subset of the real train split")
    mix_ratio: float = Field(0.5, ge=0, le=1, description="mix plan: synthetic share of every batch")
    steps: int = Field(100_000, ge=1, description="step budget (pretrain_finetune: pretrain + finetune)")
    pretrain_steps: int | None = Field(None, ge=0, description="pretrain_finetune: default steps // 2")
    finetune_steps: int | None = Field(None, ge=0, description="pretrain_finetune: default steps - pretrain_steps")
    batch_size: int = Field(16, ge=1, description="global batch, split evenly over the workers")
    lr: float = Field(1e-5, gt=0)
    finetune_lr: float | None = Field(None, gt=0, description="finetune phase lr (default lr)")
    weight_decay: float = Field(1e-7, ge=0)
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up, then cosine decay to 0, per phase")
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null disables")
    amp: Literal["auto", "fp16", "bf16", "none"] = Field(
        "auto", description="auto: fp16 on CUDA, none on CPU; fp16 on CPU falls back to bf16")
    seed: int = 42
    loss_weights: LossWeights = LossWeights()
    finetune_loss_weights: LossWeights | None = Field(None, description="finetune phase weights (default loss_weights)")
    model: ModelConfig = ModelConfig()
    image_size: int = Field(196, ge=8)
    center_crop: int | None = Field(None, ge=8, description="real images: centre square crop side in stored pixels "
                                                             "before resizing (FairFace 448 px: 300)")
    synthetic_center_crop: int | None = Field(None, ge=8, description="synthetic images: the same")
    augment: bool = True
    augment_on: Literal["device", "data"] = Field("device", description="per-sample augmentation on the device "
                                                                        "batch, or in the Ray Data CPU tasks "
                                                                        "(only with decode_on=data)")
    decode_on: Literal["data", "worker"] = Field("data", description="JPEG decode + resize in Ray Data tasks, or in "
                                                                     "the train worker (nvJPEG on GPU)")
    channels_last: bool = False
    shuffle_buffer: int = Field(1000, ge=0, description="rows in each worker's local shuffle buffer (0: none)")
    val_source: Literal["auto", "real", "synthetic", "none"] = Field("auto", description="val split to validate on "
                                                                     "(auto: real if given, else synthetic)")
    val_every: int = Field(1000, ge=1)
    val_batch_size: int = Field(64, ge=1)
    val_limit: int | None = Field(None, ge=1, description="validate on at most this many val rows")
    val_cache_mb: float = Field(2048, ge=0, description="keep the decoded val split in (device) memory up to this size")
    checkpoint_every: int | None = Field(None, ge=1, description="default val_every")
    keep_checkpoints: int | None = Field(2, ge=1, description="most recent checkpoints kept (null: all)")
    log_every: int = Field(100, ge=1)
    num_workers: int = Field(1, ge=1, description="Ray Train (DDP) workers")
    use_gpu: bool | None = Field(None, description="default: true when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data decode task")
    failure_max: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")

    @model_validator(mode="before")
    @classmethod
    def _phase_steps(cls, data: Any) -> Any:
        # pretrain_finetune: the budget is pretrain + finetune; fill in whichever is missing.
        if isinstance(data, dict) and data.get("plan") == "pretrain_finetune":
            pre, fine = data.get("pretrain_steps"), data.get("finetune_steps")
            if pre is not None and fine is not None:
                data = {**data, "steps": int(pre) + int(fine)}
            else:
                steps = int(data.get("steps", cls.model_fields["steps"].default))
                pre = steps // 2 if pre is None else int(pre)
                fine = steps - pre if fine is None else int(fine)
                data = {**data, "pretrain_steps": pre, "finetune_steps": fine, "steps": pre + fine}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        needs = {"synthetic": ("synthetic",), "real": ("real",), "pretrain_finetune": ("synthetic", "real"),
                 "mix": ("synthetic", "real")}[self.plan]
        for what in needs:
            if getattr(self, what) is None:
                raise ValueError(f"plan {self.plan!r} needs `{what}` (a dataset URI)")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        if self.plan == "pretrain_finetune" and (self.steps < 1 or min(self.pretrain_steps, self.finetune_steps) < 0):
            raise ValueError("pretrain_finetune needs pretrain_steps + finetune_steps >= 1")
        if self.val_source == "real" and self.real is None:
            raise ValueError("val_source 'real' needs `real`")
        if self.val_source == "synthetic" and self.synthetic is None:
            raise ValueError("val_source 'synthetic' needs `synthetic`")
        if "/" in self.name or not self.name.strip():
            raise ValueError(f"name {self.name!r} must be a plain folder name")
        return self

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    def worker_batch(self) -> int:
        return self.batch_size // self.num_workers

    def mix_counts(self) -> tuple[int, int]:
        """(synthetic, real) rows of one worker's batch in the mix plan."""
        b = self.worker_batch()
        n_syn = round(self.mix_ratio * b)
        return n_syn, b - n_syn


@dataclass
class Phase:
    name: str  # "train", "pretrain" or "finetune"
    datasets: tuple[str, ...]
    start: int  # global step where it begins
    end: int
    lr: float
    weights: LossWeights


def phases_of(cfg: TrainConfig) -> list[Phase]:
    if cfg.plan == "pretrain_finetune":
        pre = int(cfg.pretrain_steps or 0)
        return [Phase("pretrain", ("synthetic",), 0, pre, cfg.lr, cfg.loss_weights),
                Phase("finetune", ("real",), pre, cfg.steps, cfg.finetune_lr or cfg.lr,
                      cfg.finetune_loss_weights or cfg.loss_weights)]
    names = {"synthetic": ("synthetic",), "real": ("real",), "mix": ("synthetic", "real")}[cfg.plan]
    if cfg.plan == "mix":  # a 0 % or 100 % mix reads only one set
        n_syn, n_real = cfg.mix_counts()
        names = tuple(n for n, k in (("synthetic", n_syn), ("real", n_real)) if k > 0)
    return [Phase("train", names, 0, cfg.steps, cfg.lr, cfg.loss_weights)]


@dataclass
class TrainResult:
    checkpoint: str | None  # URI of the last checkpoint
    metrics: dict[str, Any]  # last report: loss, val_* metrics, step, phase
    steps: int  # global step reached
    seconds: float
    images_per_second: float = 0.0
    start_step: int = 0  # step this run (its last attempt) resumed from
    steps_run: int = 0  # optimizer steps this run's last attempt did
    run_uri: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Datasets (driver side)

def _read(uri: str, opts: StorageOptions, splits: tuple[str, ...], subset: int | None = None,
          chosen_ids: list[int] | None = None, limit: int | None = None, shuffle_seed: int | None = None):
    import ray
    from ray.data.expressions import col

    fs, path = storage.resolve(uri, opts)
    # Reads *.parquet only: _manifest.json is skipped. Train sets read their files in a new order
    # each pass (streaming, unlike randomize_block_order, which waits for every read to finish);
    # rows are mixed further by each worker's local shuffle buffer.
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(path, filesystem=fs, shuffle=shuffle)
    pred = col("split").is_in(list(splits))
    if subset is not None and subset < 100:
        if "subset" not in ds.columns():
            raise ValueError(f"real_subset={subset} but {uri} has no `subset` column")
        pred = pred & (col("subset") <= subset)
    if chosen_ids is not None:
        pred = pred & col("id").is_in(chosen_ids)
    ds = ds.filter(expr=pred).select_columns(["id", "image", *LABEL_COLUMNS])
    return ds.limit(limit) if limit else ds


def read_selection(uri: str, opts: StorageOptions) -> list[int]:
    """Chosen ids of a selection Parquet (file or folder) with columns id, chosen."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri, opts)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "chosen"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read selection {uri} (needs columns id, chosen): {e}") from e
    ids = table.filter(pc.equal(table["chosen"], True))["id"].to_pylist()
    if not ids:
        raise ValueError(f"selection {uri} chooses no id")
    return ids


def _decode_map(ds, cfg: TrainConfig, crop: int | None, augment: bool, is_synthetic: int | None):
    from synthfar_ray.transforms import decode_batch

    if cfg.decode_on == "worker":  # the worker decodes; just tag the rows
        def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch["is_synthetic"] = np.full(len(batch["id"]), is_synthetic or 0, dtype=np.int8)
            return batch
        return ds.map_batches(tag, batch_format="numpy", num_cpus=0.25)
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=64, num_cpus=cfg.data_cpus,
                          fn_kwargs={"size": cfg.image_size, "center_crop": crop, "augment": augment,
                                     "is_synthetic": is_synthetic})


def val_source_of(cfg: TrainConfig) -> str:
    return cfg.val_source if cfg.val_source != "auto" else ("real" if cfg.real else "synthetic")


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Datasets: "synthetic" / "real" train rows (as the plan needs) and "val" (unsplit)."""
    needed = {n for p in phases_of(cfg) for n in p.datasets}
    data_aug = cfg.augment and cfg.augment_on == "data"
    out: dict[str, Any] = {}
    if "synthetic" in needed:
        chosen = read_selection(cfg.synthetic_selection, cfg.storage) if cfg.synthetic_selection else None
        ds = _read(cfg.synthetic, cfg.storage, ("train",), chosen_ids=chosen, shuffle_seed=cfg.seed)
        out["synthetic"] = _decode_map(ds, cfg, cfg.synthetic_center_crop, data_aug, 1)
    if "real" in needed:
        ds = _read(cfg.real, cfg.storage, ("train",), subset=cfg.real_subset, shuffle_seed=cfg.seed)
        out["real"] = _decode_map(ds, cfg, cfg.center_crop, data_aug, 0)
    source = val_source_of(cfg)
    if source != "none":
        uri, crop = (cfg.real, cfg.center_crop) if source == "real" else (cfg.synthetic, cfg.synthetic_center_crop)
        val = _read(uri, cfg.storage, ("val",), limit=cfg.val_limit)
        out["val"] = _decode_map(val, cfg, crop, False, int(source == "synthetic"))
    return out


# ---------------------------------------------------------------------------------------------
# The per-worker training loop

def _setup_worker_logging() -> None:
    pkg = logging.getLogger("synthfar_ray")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


def _amp(cfg: TrainConfig, device_type: str):
    """(autocast dtype or None, use GradScaler)."""
    import torch

    mode = cfg.amp
    if mode == "auto":
        mode = "fp16" if device_type == "cuda" else "none"
    if mode == "fp16" and device_type != "cuda":
        logger.warning("amp=fp16 needs CUDA; using bf16 on %s", device_type)
        mode = "bf16"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[mode]
    return dtype, mode == "fp16"


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _local_weights(uri: str | None, opts: StorageOptions) -> str | None:
    """A pretrained-weights setting with any URI made a local path (s3:// objects are copied to a temp file)."""
    if uri is None or uri == "torchvision":
        return uri
    if storage.is_local(uri):
        return storage.resolve(uri, opts)[1]
    local = os.path.join(tempfile.mkdtemp(prefix="synthfar-weights-"), posixpath.basename(uri))
    with open(local, "wb") as f:
        f.write(storage.read_bytes(uri, opts))
    return local


def _infinite_batches(shard, batch_size: int, cfg: TrainConfig, rank: int, device) -> Iterator[dict]:
    """Cycle a dataset shard forever, one reshuffled pass after another."""
    epoch = 0
    while True:
        n = 0
        kwargs = dict(batch_size=batch_size, drop_last=True,
                      local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                      local_shuffle_seed=(cfg.seed + 1009 * epoch + rank) if cfg.shuffle_buffer else None,
                      prefetch_batches=2)
        if cfg.decode_on == "worker":
            it = shard.iter_batches(batch_format="numpy", **kwargs)
        else:
            it = shard.iter_torch_batches(device=device, **kwargs)
        for batch in it:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"a worker's data shard holds fewer than one batch ({batch_size} rows): "
                               "use a smaller batch_size or fewer workers, or more data")
        epoch += 1


def _first_batches(streams: dict[str, Iterator[dict]]) -> dict[str, dict]:
    """First batch of each stream, fetched in parallel threads: each Ray Data pipeline pays its
    start-up (listing files, first read and decode tasks) concurrently with the others."""
    if len(streams) < 2:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(streams)) as pool:
        futures = {name: pool.submit(next, it) for name, it in streams.items()}
        return {name: f.result() for name, f in futures.items()}


def _to_device_batch(batch: dict, cfg: TrainConfig, device, crop: int | None):
    """A batch from either decode path -> (uint8 images NCHW on device, label tensors, is_synthetic)."""
    import torch

    from synthfar_ray.transforms import decode_to_tensor, labels_to_numpy

    if cfg.decode_on == "worker":
        images = decode_to_tensor(list(batch["image"]), cfg.image_size, crop, device=device)
        labels = {k: torch.from_numpy(v).to(device) for k, v in labels_to_numpy(batch).items()}
        syn = torch.from_numpy(np.array(batch["is_synthetic"], dtype=np.int8)).to(device)
        return images, labels, syn
    images = batch["image"].permute(0, 3, 1, 2)  # NHWC uint8 from the data tasks
    return images, {k: batch[k] for k in LABEL_COLUMNS}, batch["is_synthetic"]


def _concat(parts: list[tuple]):
    import torch

    if len(parts) == 1:
        return parts[0]
    images = torch.cat([p[0] for p in parts])
    labels = {k: torch.cat([p[1][k] for p in parts]) for k in LABEL_COLUMNS}
    syn = torch.cat([p[2] for p in parts])
    return images, labels, syn


class ValSet:
    """Rank 0's view of the val split: read through Ray Data once, then kept decoded in memory (on the
    device) when it fits in `val_cache_mb`, so later validations cost only the forward passes."""

    def __init__(self, shard, cfg: TrainConfig, device, crop: int | None):
        self.shard, self.cfg, self.device, self.crop = shard, cfg, device, crop
        self.cached: list[tuple] | None = None
        self._thread = None
        self._error: Exception | None = None

    def prefetch(self) -> None:
        """Make the first pass (and fill the cache) in a background thread while training starts."""
        import threading

        def run() -> None:
            try:
                for _ in self.batches():
                    pass
            except Exception as e:  # re-raised by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="val-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError(f"reading the val split failed: {self._error}") from self._error

    def batches(self) -> Iterator[tuple]:
        if self.cached is not None:
            yield from self.cached
            return
        cfg = self.cfg
        if cfg.decode_on == "worker":
            it = self.shard.iter_batches(batch_format="numpy", batch_size=cfg.val_batch_size)
        else:
            it = self.shard.iter_torch_batches(batch_size=cfg.val_batch_size, device=self.device)
        kept: list[tuple] | None = []
        size = 0
        for batch in it:
            item = _to_device_batch(batch, cfg, self.device, self.crop)
            if kept is not None:
                size += item[0].numel()
                if size <= cfg.val_cache_mb * 2**20:
                    kept.append(item)
                else:
                    kept = None
            yield item
        self.cached = kept


def _validate(model, val: ValSet, amp_dtype, age_mode: str, channels_last: bool) -> dict[str, float]:
    from synthfar_ray.metrics import compute_metrics
    from synthfar_ray.model import predict

    outs: dict[str, list[np.ndarray]] = {}
    labs: dict[str, list[np.ndarray]] = {k: [] for k in LABEL_COLUMNS}
    val.wait()
    for images, labels, _ in val.batches():
        for k, v in predict(model, images, amp_dtype, channels_last, nhwc=False).items():
            outs.setdefault(k, []).append(v.cpu().numpy())
        for k in LABEL_COLUMNS:
            labs[k].append(labels[k].cpu().numpy())
    if not labs["gender"]:
        return {}
    metrics = compute_metrics({k: np.concatenate(v) for k, v in outs.items()},
                              {k: np.concatenate(v) for k, v in labs.items()},
                              age_bins_from="regression" if age_mode == "regression" else "logits")
    return {f"val_{k}": float(v) for k, v in metrics.items()}


def _maybe_inject_failure(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(step))
        raise RuntimeError(f"injected training failure after step {step} ({FAULT_ENV})")


def save_model(directory: str, model, meta: dict[str, Any]) -> None:
    """The loadable part of a checkpoint: model.pt (state_dict) + meta.json (how to rebuild the net)."""
    import torch

    os.makedirs(directory, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _save_checkpoint_dir(directory: str, model, cfg: TrainConfig, opt, sched, scaler, step: int,
                         phase: Phase, phase_index: int, metrics: dict[str, Any]) -> None:
    import torch

    save_model(directory, model, checkpoint_meta(cfg) | {"step": step, "phase": phase.name})
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "phase": phase.name, "phase_index": phase_index, "metrics": metrics},
               os.path.join(directory, STATE_FILE))


def checkpoint_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What evaluate and the sampling stage need to rebuild the net from a checkpoint alone."""
    return {"format": 1, "backbone": cfg.model.backbone, "age_mode": cfg.model.age_mode, "image_size": cfg.image_size,
            "center_crop": cfg.center_crop, "synthetic_center_crop": cfg.synthetic_center_crop,
            "channels_last": cfg.channels_last, "run": cfg.name, "plan": cfg.plan}


def _upload_tensorboard(local_dir: str, cfg: TrainConfig) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(cfg.run_uri, TENSORBOARD_DIR), cfg.storage)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from synthfar_ray.losses import multitask_loss
    from synthfar_ray.model import MultiTaskNet
    from synthfar_ray.transforms import BatchAugment, to_model_input

    _setup_worker_logging()
    # Prefer the object ("cfg"): JSON masks the storage secrets. "cfg_json" is kept for callers that
    # build their own TorchTrainer around this loop.
    cfg: TrainConfig = config["cfg"] if "cfg" in config else TrainConfig.model_validate_json(config["cfg_json"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype, use_scaler = _amp(cfg, device.type)
    phases = phases_of(cfg)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    checkpoint = ray.train.get_checkpoint()
    pretrained = None if checkpoint else _local_weights(cfg.model.pretrained, cfg.storage)  # resuming: no need
    net = MultiTaskNet(cfg.model.backbone, pretrained, cfg.model.age_mode)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)

    start_step, restored_phase, restored, last_metrics = 0, -1, None, {}
    if checkpoint:
        with checkpoint.as_directory() as d:
            net.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True))
            restored = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        start_step, restored_phase = int(restored["step"]), int(restored["phase_index"])
        last_metrics = dict(restored.get("metrics") or {})
        if rank == 0:
            logger.info("resuming %s from step %d (phase %s)", cfg.name, start_step, restored["phase"])
    model = ray.train.torch.prepare_model(net)
    raw_model = model.module if hasattr(model, "module") else model
    torch.manual_seed(cfg.seed + 1 + rank + 7919 * start_step)  # augmentation stream per rank and resume point

    # Rows decoded here can only be augmented here.
    augment = BatchAugment() if cfg.augment and (cfg.augment_on == "device" or cfg.decode_on == "worker") else None
    ckpt_every = cfg.checkpoint_every or cfg.val_every
    wb = cfg.worker_batch()
    counts = dict(zip(("synthetic", "real"), cfg.mix_counts())) if cfg.plan == "mix" else {}
    crops = {"synthetic": cfg.synthetic_center_crop, "real": cfg.center_crop}
    source = val_source_of(cfg)
    val = ValSet(ray.train.get_dataset_shard("val"), cfg, device, crops[source]) \
        if source != "none" and rank == 0 else None
    if val is not None and start_step < cfg.steps:
        val.prefetch()

    writer = SummaryWriter(tempfile.mkdtemp(prefix="synthfar-tb-")) if rank == 0 else None
    history: list[dict[str, Any]] = []
    step, steps_run, images_seen, train_seconds = start_step, 0, 0, 0.0
    syn_rows, all_rows = torch.zeros((), dtype=torch.long, device=device), 0  # a tensor: no host sync per step
    for index, phase in enumerate(phases):
        if phase.end <= step:
            continue
        opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, phase.end - phase.start))
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        if restored is not None and restored_phase == index:
            opt.load_state_dict(restored["optimizer"])
            sched.load_state_dict(restored["scheduler"])
            scaler.load_state_dict(restored["scaler"])
        streams = {name: _infinite_batches(ray.train.get_dataset_shard(name), counts.get(name, wb), cfg, rank, device)
                   for name in phase.datasets}
        pending = _first_batches(streams)  # start every pipeline at once, not one after the other
        if rank == 0:
            logger.info("phase %s: steps %d..%d on %s (lr %g, %d workers x %d images)",
                        phase.name, max(step, phase.start), phase.end, "+".join(phase.datasets), phase.lr, world, wb)
        loss_sum = torch.zeros((), device=device)
        part_sums: dict[str, torch.Tensor] = {}
        window_t, window_images, window_steps = time.perf_counter(), 0, 0
        mark = time.perf_counter()  # training time excludes validation and checkpointing
        while step < phase.end:
            images, labels, syn = _concat([_to_device_batch(pending.pop(n) if n in pending else next(streams[n]),
                                                            cfg, device, crops[n]) for n in phase.datasets])
            x = to_model_input(images, augment, channels_last=cfg.channels_last, nhwc=False)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(x)
            loss, parts = multitask_loss(outputs, labels, phase.weights)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_run += 1
            loss_sum += loss.detach()
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, torch.zeros((), device=device)) + v.detach()
            syn_rows += syn.sum()
            all_rows += int(syn.shape[0])
            images_seen += int(images.shape[0])
            window_images += int(images.shape[0])
            window_steps += 1

            if step % cfg.log_every == 0 or step == phase.end:
                elapsed = time.perf_counter() - window_t
                ips = window_images * world / elapsed if elapsed > 0 else 0.0
                mean_loss = float(loss_sum) / window_steps
                if rank == 0:
                    logger.info("step %d/%d [%s] loss %.4f %s lr %.2e %.1f img/s", step, cfg.steps, phase.name,
                                mean_loss, " ".join(f"{k} {float(v) / window_steps:.3f}" for k, v in part_sums.items()),
                                sched.get_last_lr()[0], ips)
                    writer.add_scalar("train/loss", mean_loss, step)
                    for k, v in part_sums.items():
                        writer.add_scalar(f"train/loss_{k}", float(v) / window_steps, step)
                    writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                    writer.add_scalar("train/images_per_second", ips, step)
                last_metrics.update({"loss": mean_loss, **{f"loss_{k}": float(v) / window_steps for k, v in part_sums.items()}})
                loss_sum.zero_()
                part_sums.clear()
                window_t, window_images, window_steps = time.perf_counter(), 0, 0

            at_end = step == phase.end
            do_val = source != "none" and (step % cfg.val_every == 0 or at_end)
            do_ckpt = step % ckpt_every == 0 or at_end
            if do_val or do_ckpt:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the queued steps belong to training time
                train_seconds += time.perf_counter() - mark
                metrics: dict[str, Any] = {**last_metrics, "step": step, "phase": phase.name,
                                           "synthetic_fraction": int(syn_rows) / max(1, all_rows)}
                if do_val and rank == 0:
                    metrics.update(_validate(raw_model, val, amp_dtype, cfg.model.age_mode, cfg.channels_last))
                    for k, v in metrics.items():
                        if k.startswith("val_") and isinstance(v, float) and not math.isnan(v):
                            writer.add_scalar(f"val/{k[4:]}", v, step)
                last_metrics = metrics
                if rank == 0:
                    history.append(dict(metrics))
                    writer.flush()
                    _upload_tensorboard(writer.log_dir, cfg)
                with tempfile.TemporaryDirectory(prefix="synthfar-ckpt-") as d:
                    ckpt = None
                    if do_ckpt and rank == 0:
                        _save_checkpoint_dir(d, raw_model, cfg, opt, sched, scaler, step, phase, index, metrics)
                        ckpt = ray.train.Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt,
                                     checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:09d}" if ckpt else None)
                mark = time.perf_counter()
            _maybe_inject_failure(step, rank)

    if writer is not None:
        writer.close()
        _upload_tensorboard(writer.log_dir, cfg)
    return {"metrics": last_metrics, "step": step, "start_step": start_step, "steps_run": steps_run,
            "images_per_second": images_seen * world / train_seconds if train_seconds > 0 else 0.0,
            "synthetic_fraction": int(syn_rows) / all_rows if all_rows else None, "history": history}


# ---------------------------------------------------------------------------------------------
# Driver

def _scaling(cfg: TrainConfig):
    import ray
    from ray.train import ScalingConfig

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train as `cfg` says (resuming `<storage_path>/<name>` if it exists); `callbacks` are Ray Train
    UserCallbacks added to the RunConfig (e.g. Tune's reporting)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    t0 = time.time()
    datasets = build_datasets(cfg)
    fs, path = storage.resolve(cfg.storage_path, cfg.storage)
    fs.create_dir(path, recursive=True)
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    run_config = RunConfig(
        name=cfg.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.failure_max),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=list(callbacks or []),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The model object itself, not JSON: JSON would mask the storage credentials (SecretStr).
        train_loop_config={"cfg": cfg},
        scaling_config=_scaling(cfg),
        run_config=run_config,
        datasets=datasets,
        # The val split goes whole to every worker (rank 0 validates); train sets are sharded.
        dataset_config=DataConfig(datasets_to_split=[n for n in datasets if n != "val"]),
    )
    logger.info("training %s (%s plan, %d steps, %d workers) -> %s", cfg.name, cfg.plan, cfg.steps, cfg.num_workers,
                cfg.run_uri)
    result = trainer.fit()
    seconds = time.time() - t0
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    ckpt_uri = (storage.join(cfg.run_uri, posixpath.basename(result.checkpoint.path.rstrip("/")))
                if result.checkpoint is not None else None)
    train_result = TrainResult(
        checkpoint=ckpt_uri, metrics=dict(out.get("metrics") or result.metrics or {}), steps=int(out.get("step", 0)),
        seconds=seconds, images_per_second=float(out.get("images_per_second") or 0.0),
        start_step=int(out.get("start_step", 0)), steps_run=int(out.get("steps_run", 0)),
        run_uri=cfg.run_uri, history=list(out.get("history") or []))
    summary = asdict(train_result) | {"name": cfg.name, "plan": cfg.plan, "synthetic_fraction": out.get("synthetic_fraction"),
                                      "config": dump_config(cfg)}
    storage.write_bytes(storage.join(cfg.run_uri, RESULT_FILE),
                        json.dumps(_json_safe(summary), indent=2).encode(), cfg.storage)
    logger.info("done: %s step %d in %.1f s (%.1f img/s); checkpoint %s", cfg.name, train_result.steps, seconds,
                train_result.images_per_second, ckpt_uri)
    return train_result


# ---------------------------------------------------------------------------------------------
# Loading a trained net (evaluate, sampling)

def resolve_checkpoint(uri: str, opts: StorageOptions | None = None) -> str:
    """A checkpoint folder URI, or a run folder (-> its latest checkpoint_* folder)."""
    import pyarrow.fs as pafs

    if storage.exists(storage.join(uri, META_FILE), opts):
        return uri
    fs, path = storage.resolve(uri, opts)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    ckpts = sorted(posixpath.basename(i.path) for i in infos
                   if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(CHECKPOINT_PREFIX))
    ckpts = [c for c in ckpts if storage.exists(storage.join(uri, c, META_FILE), opts)]
    if not ckpts:
        raise FileNotFoundError(f"{uri} is neither a checkpoint (no {META_FILE}) nor a run folder with checkpoints")
    return storage.join(uri, ckpts[-1])


def load_model(checkpoint_uri: str, storage_opts: StorageOptions | None = None):
    """(MultiTaskNet in eval mode on CPU, meta dict) from a checkpoint folder or run folder URI."""
    import io

    import torch

    from synthfar_ray.model import MultiTaskNet

    uri = resolve_checkpoint(checkpoint_uri, storage_opts)
    meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE), storage_opts))
    net = MultiTaskNet(meta["backbone"], None, meta["age_mode"])
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, MODEL_FILE), storage_opts)),
                       map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    meta["checkpoint"] = uri
    return net.eval(), meta


# ---------------------------------------------------------------------------------------------
# CLI

def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = run_train(cfg)
    val = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("val_") and isinstance(v, float)}
    print(f"trained {cfg.name}: step {result.steps} ({result.steps_run} this run) in {result.seconds:.1f} s, "
          f"{result.images_per_second:.1f} img/s; val {val}; checkpoint {result.checkpoint}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args

    p = sub.add_parser("train", help="train the face-attribute net (Ray Train, DDP)")
    add_config_args(p)
    p.set_defaults(func=_cli)
