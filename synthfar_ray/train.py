"""Stage 4: train the multi-task face-attribute net with PyTorch DDP under Ray Train (V2).

Data plans (the paper's experiments):
- `synthetic` / `real`: one dataset;
- `pretrain_finetune`: `pretrain_steps` on synthetic, then `finetune_steps` on real, whole model,
  with a fresh optimizer and warm-up/cosine schedule (and optionally its own lr / loss weights);
- `mix`: every batch draws its synthetic row count from Binomial(batch, mix_ratio) (seeded per
  rank and step), so the synthetic share is `mix_ratio` in expectation at any batch size.

The budget is in optimizer steps, not epochs: each dataset shard is cycled as often as needed.
`batch_size` is the global batch; each of the `num_workers` DDP workers takes batch_size/num_workers.

This module is the recipe: the config, `train_loop_per_worker` (set up, loop over phases, report)
and the driver (`run_train`). Data plumbing lives in `train_data.py`, what a run leaves on storage
(checkpoints, run_config.json, result.json, TensorBoard) and the rules for resuming in
`checkpoints.py`.

Hardware: `amp`, `channels_last` and `compile` resolve per device through precision.py (the rule
evaluate shares): on a GPU with native bf16, bf16 autocast without a GradScaler, NHWC, cuDNN autotuning.
The step never reads a value back to the host; losses are summed on the device and read every
`log_every` steps.

Executors (`executor`): several workers run as a Ray Train worker group (TorchTrainer); one worker
runs, by default, as a single Ray task that calls the same loop as rank 0 of 1 (LocalSession),
without the controller, worker and split-coordinator actors whose start-up costs a short run most of
its time. A one-worker Tune trial runs the loop in the trial's own process the same way (tune.py).

Fault tolerance: a checkpoint goes to `<storage_path>/<name>/checkpoint_<step>` every `checkpoint_every`
steps (reported to Ray Train, or uploaded by the task itself). A worker failure restarts the group
from the last checkpoint (FailureConfig(max_failures=failure_max)); a failed task is retried as often
and resumes the same way. Re-running with the same name + storage_path resumes too, provided the
config is the same in what shapes training (see checkpoints.claim_run). The data position is not
restored: a resumed run starts a new pass over (reshuffled) data.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal

from pydantic import Field, field_validator, model_validator

from synthfar_ray import checkpoints, storage
from synthfar_ray.adapt import AdaptConfig
from synthfar_ray.checkpoints import CHECKPOINT_PREFIX, load_model, resolve_checkpoint, save_model  # noqa: F401
from synthfar_ray.config import StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.errors import StageFailed, last_line
from synthfar_ray.losses import LossWeights
from synthfar_ray.paths import InputPath, OutputPath, WeightsLocation
from synthfar_ray.precision import AmpMode, Layout, Precision
from synthfar_ray.quality_config import QualityFilter, Relabel
from synthfar_ray.storage import StorageOptions
from synthfar_ray.synthetic_heads import SyntheticHead

logger = logging.getLogger(__name__)

Plan = Literal["synthetic", "real", "pretrain_finetune", "mix"]
AgeMode = Literal["regression", "bins", "both"]  # which age heads the net has (model.MultiTaskNet)
# Test hook (see tests/test_train.py): "STEP:MARKER_PATH" makes rank 0 raise once after STEP, the
# marker file recording that it fired. Forwarded from the driver's environment to the workers.
FAULT_ENV = "SYNTHFAR_FAULT_TRAIN_STEP"


RELABELLED_FILE = "relabelled.parquet"  # in a run folder: the labels relabelling replaced


class NetConfig(StrictModel):
    """The recogniser: backbone, its initial weights, and the age head(s)."""

    backbone: str = Field("resnet50", description="tiny, resnet18/34/50/101 or timm/<name>")
    pretrained: WeightsLocation = Field(None, description="backbone weights: a .pth/.safetensors file (path or URI), "
                                                     "or 'torchvision' for the local torch hub cache")
    age_mode: AgeMode = "both"
    # Left out of a dump when empty: run_config.json of runs started before the option still matches.
    synthetic_heads: tuple[SyntheticHead, ...] = Field(
        (), exclude_if=lambda v: not v,
        description="heads only synthetic rows label (masked on real rows): pose (yaw, pitch, roll in degrees, "
                    "from pose_*), hair (hair_length and hair_color classes) and/or keypoints (the `keypoints` "
                    "column's points, keypoints.KEYPOINT_NAMES); see synthetic_heads.py")

    transfer: tuple[Literal["logits", "features", "keypoints"], ...] = Field(
        (), exclude_if=lambda v: not v,
        description="label transfer, heads on DETACHED outputs that real labels train and nothing below them: "
                    "`logits` and/or `features` (the 5 ethnicity logits, the pooled features) -> FairFace's 7 "
                    "races (`race7_logits`, on the real rows' `ethnicity7`); `keypoints`: the dense keypoint "
                    "head's points -> the real set's sparse ones (`keypoints_real`, on its `keypoints_real` "
                    "column; needs keypoints in synthetic_heads)")

    @field_validator("synthetic_heads")
    @classmethod
    def _distinct_heads(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"synthetic_heads lists a head twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _transfer_needs_its_inputs(self) -> NetConfig:
        if "keypoints" in self.transfer and "keypoints" not in self.synthetic_heads:
            raise ValueError("model.transfer has keypoints: its head maps the dense keypoint head's points to the real "
                             "set's sparse ones, so add keypoints to model.synthetic_heads")
        return self

    @property
    def transfer_labels(self) -> tuple[str, ...]:
        """The real set's label columns the transfer heads train on."""
        return (("ethnicity7",) if {"logits", "features"} & set(self.transfer) else ()) + \
            (("keypoints_real",) if "keypoints" in self.transfer else ())


class TrainConfig(StageConfig):
    name: str = Field(description="run name: the folder under storage_path; re-running a name resumes it")
    storage_path: OutputPath = Field(description="where runs live (local path, file:// or s3://)")
    plan: Plan = "synthetic"
    synthetic: InputPath | None = Field(None, description="synthetic dataset folder URI")
    synthetic_selection: InputPath | None = Field(None, description="selection folder (or its selection.parquet) "
                                                                    "from the sampling stage: train on chosen ids only")
    quality: QualityFilter | None = Field(None, description="train on the synthetic rows that pass a "
                                          "`synthfar quality` folder's thresholds (and the selection, if any)")
    relabel: Relabel | None = Field(None, description="synthetic rows: the quality classifier's label where it is "
                                    "confident and disagrees (recorded in <run>/relabelled.parquet)")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="domain adaptation to the real set while "
                               "training on synthetic rows: dann, daln, aux_bn (synthfar_ray/adapt.py)")
    real: InputPath | None = Field(None, description="real dataset folder URI (UTKFace / FairFace ingest output)")
    real_subset: Literal[25, 50, 75, 100] = Field(100, description="train on the P % subset of the real train split")
    mix_ratio: float = Field(0.5, ge=0, le=1, description="mix plan: synthetic share of every batch (in "
                                                          "expectation: per-step counts are seeded binomial draws)")
    steps: int = Field(100_000, ge=1, description="step budget (pretrain_finetune: pretrain + finetune)")
    pretrain_steps: int | None = Field(None, ge=0, description="pretrain_finetune: default steps // 2")
    finetune_steps: int | None = Field(None, ge=0, description="pretrain_finetune: default steps - pretrain_steps")
    batch_size: int = Field(16, ge=1, description="global batch, split evenly over the workers")
    lr: float = Field(1e-5, gt=0)
    finetune_lr: float | None = Field(None, gt=0, description="finetune phase lr (default lr)")
    weight_decay: float = Field(1e-7, ge=0)
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up, then cosine decay to 0, per phase")
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null disables")
    amp: AmpMode = Field("auto", description="autocast: auto = bf16 without GradScaler on GPUs with native bf16, "
                                             "fp16 + GradScaler on older GPUs, none (fp32) on CPU (precision.py)")
    seed: int = 42
    loss_weights: LossWeights = LossWeights()
    finetune_loss_weights: LossWeights | None = Field(None, description="finetune phase weights (default loss_weights)")
    model: NetConfig = NetConfig()
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
    channels_last: Layout = Field("auto", description="NHWC memory layout for the net and its input (auto: on CUDA)")
    compile: bool = Field(False, description="torch.compile the net for training (first steps pay the compile)")
    preserve_order: bool = Field(True, description="Ray Data hands the workers their rows in read order (the "
                                 "seeded file order), so a seeded run sees the same rows in the same order every "
                                 "time; false: in whatever order reads finish (not reproducible, a little faster "
                                 "when reads are uneven)")
    shuffle_buffer: int = Field(1000, ge=0, description="rows in each worker's shuffle buffer, kept as decoded "
                                "(device) tensors: each batch swaps out random rows (0: none)")
    train_cache_mb: float = Field(1024, ge=0, description="keep a worker's decoded train shard in (device) memory "
                                  "after its first pass when it fits in this many MiB; later passes are seeded "
                                  "permutations of it instead of new Ray Data reads (0: always stream)")
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
    executor: Literal["auto", "trainer", "task"] = Field(
        "auto", description="how the run's workers start. trainer: a Ray Train TorchTrainer (a controller, the "
        "worker group and a split coordinator per train set, all actors; the dashboard's Train tab). task: one Ray "
        "task with the worker's resources runs the same loop as rank 0 of 1 and writes its checkpoints itself (one "
        "worker only; none of those actors to start; in a Tune trial the trial's own process runs it). auto: task "
        "for one worker, else trainer")
    use_gpu: bool | None = Field(None, description="default: true when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="GPU share of each worker when it trains on GPU: "
                                   "0.25-0.5 packs 2-4 small runs (batch 16) on one GPU (pipeline parallel_runs)")
    data_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data decode task")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="DDP collectives (auto: NCCL on GPU "
                                                          "workers, gloo on CPU); gloo on GPU workers trains on CPU "
                                                          "where no CUDA device is visible")
    failure_max: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    overwrite: bool = Field(False, description="delete an existing run of this name and start over")
    resume: Literal["auto", "force"] = Field("auto", description="force: resume a run of this name even if its "
                                                                  "config differs in what shapes training")

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
        if self.executor == "task" and self.num_workers != 1:
            raise ValueError(f"executor 'task' runs one worker, not num_workers={self.num_workers}: use trainer or auto")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        if self.plan == "pretrain_finetune" and (self.steps < 1 or min(self.pretrain_steps, self.finetune_steps) < 0):
            raise ValueError("pretrain_finetune needs pretrain_steps + finetune_steps >= 1")
        if self.adapt.enabled and (self.real is None or self.plan == "real"):
            raise ValueError(f"adapt ({self.adapt.method}{', aux_bn' if self.adapt.aux_bn else ''}) adapts synthetic "
                             "training to the real set: it needs `real` (its train rows, labels unused, are the "
                             "target) and a plan that trains on synthetic rows")
        if self.model.synthetic_heads and self.plan == "real":
            raise ValueError(f"model.synthetic_heads {list(self.model.synthetic_heads)} are trained by synthetic rows "
                             "only (real sets have no pose, hair or keypoint labels): use a plan with `synthetic`")
        if "keypoints" in self.model.synthetic_heads:
            # The stored points are in the frame of the image's centre square: a crop, or the
            # data-side augmentation's shift-scale-rotate, would move the pixels but not the labels.
            if self.augment and self.augment_on == "data" and self.decode_on == "data":
                raise ValueError("model.synthetic_heads has keypoints: augment_on: data (torchvision, on the CPU) "
                                 "moves the face but not its keypoint labels; use augment_on: device, which moves "
                                 "both, or augment: false")
            if self.synthetic_center_crop is not None:
                raise ValueError(f"model.synthetic_heads has keypoints: synthetic_center_crop "
                                 f"{self.synthetic_center_crop} would move the faces but not their keypoints "
                                 "(stored in the frame of the image's centre square); set it to null")
        if self.model.transfer and (self.real is None or (self.plan == "synthetic" and not self.adapt.enabled)):
            raise ValueError(f"model.transfer {list(self.model.transfer)} trains on the real set's labels "
                             f"({', '.join(self.model.transfer_labels)}): give `real` and a plan whose steps see real "
                             "rows (mix, pretrain_finetune, real, or synthetic with `adapt`, whose target rows then "
                             "keep those labels)")
        if "keypoints" in self.model.transfer and self.center_crop is not None:
            raise ValueError(f"model.transfer has keypoints: center_crop {self.center_crop} would move the real faces "
                             "but not their keypoints_real (stored in the frame of the image's centre square); crop "
                             "with `synthfar prepare --center-crop` (it moves the points) and set center_crop: null")
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


@dataclass
class Phase:
    name: str  # "train", "pretrain" or "finetune"
    datasets: tuple[str, ...]
    start: int  # global step where it begins
    end: int
    lr: float
    weights: LossWeights

    def adapts(self, cfg: TrainConfig) -> bool:
        """Domain adaptation runs in phases that train on synthetic rows (the target stream joins them)."""
        return cfg.adapt.enabled and "synthetic" in self.datasets


def phases_of(cfg: TrainConfig) -> list[Phase]:
    if cfg.plan == "pretrain_finetune":
        pre = int(cfg.pretrain_steps or 0)
        return [Phase("pretrain", ("synthetic",), 0, pre, cfg.lr, cfg.loss_weights),
                Phase("finetune", ("real",), pre, cfg.steps, cfg.finetune_lr or cfg.lr,
                      cfg.finetune_loss_weights or cfg.loss_weights)]
    names = {"synthetic": ("synthetic",), "real": ("real",), "mix": ("synthetic", "real")}[cfg.plan]
    if cfg.plan == "mix":  # a 0 % or 100 % mix reads only one set
        names = tuple(n for n, share in (("synthetic", cfg.mix_ratio), ("real", 1 - cfg.mix_ratio)) if share > 0)
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
    synthetic_fraction: float | None = None  # share of synthetic rows in the batches of this run's last attempt




# ---------------------------------------------------------------------------------------------
# The recipe: one Train worker


@dataclass
class WorkerState:
    """What the loop carries from step to step on one worker."""

    cfg: TrainConfig
    rank: int
    world: int
    device: Any
    precision: Precision
    model: Any  # the DDP-wrapped (and maybe compiled) net the steps run
    raw_model: Any  # the net itself (checkpoints, validation)
    restored: dict[str, Any] | None  # training state of the checkpoint resumed from
    adaptive: Any = None  # adapt_modules.AdaptiveNet around raw_model when cfg.adapt is on
    step: int = 0
    start_step: int = 0
    steps_run: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    syn_rows: Any = None  # a device tensor: counting it costs no host sync per step
    all_rows: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    val: Any = None  # train_data.ValSet on rank 0
    writer: Any = None  # TensorBoard SummaryWriter on rank 0
    session: Any = None  # TrainSession / LocalSession: what runs the loop
    checkpoint_uri: str | None = None  # the last checkpoint this loop uploaded itself

    @property
    def synthetic_fraction(self) -> float | None:
        return int(self.syn_rows) / self.all_rows if self.all_rows else None


class TrainSession:
    """What the loop asks of whatever runs it; this one is Ray Train's worker group (TorchTrainer)."""

    uploads = False  # Ray Train persists the checkpoints reported to it

    def context(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare_model(self, net, device):
        import ray.train.torch

        return ray.train.torch.prepare_model(net, move_to_device=device)

    def report(self, metrics: dict[str, Any], directory: str | None, name: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)


class LocalSession(TrainSession):
    """The loop alone in this process, outside Ray Train: the task executor's task, or a Tune trial
    (where Ray Train's API refuses to run, even in its local mode). Rank 0 of 1, the datasets as
    given; the loop uploads its checkpoints itself, and each report goes to `on_report` (a trial's
    forwarder to Tune)."""

    uploads = True

    def __init__(self, datasets: dict[str, Any], on_report: Callable[[dict[str, Any]], None] | None = None):
        self.datasets, self.on_report = datasets, on_report

    def context(self) -> tuple[int, int]:
        return 0, 1

    def device(self):
        import torch

        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this task or trial.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def checkpoint(self):
        return None  # resuming goes through the run folder's newest checkpoint (`resume`)

    def dataset(self, name: str):
        return self.datasets[name]

    def prepare_model(self, net, device):
        return net.to(device)

    def report(self, metrics: dict[str, Any], directory: str | None, name: str | None) -> None:
        if self.on_report is not None:
            self.on_report(dict(metrics))


def session_of(config: dict[str, Any]) -> TrainSession:
    """The session a loop's config brings (LocalSession), else Ray Train's."""
    return config.get("session") or TrainSession()


def _setup_worker_logging() -> None:
    pkg = logging.getLogger("synthfar_ray")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


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


def worker_device(cfg: TrainConfig, device, gpu_ids: list, cuda: bool, rank: int = 0):
    """The device to train on. A worker that holds GPUs while no CUDA device is visible (a node
    without a working driver) fails, rather than crawl on CPU, unless dist_backend is gloo (the
    fake clusters' opt-in: CPU with a warning). A Train worker group reports such a worker's device
    as cuda, a LocalSession (task or trial) as cpu: both end here the same way."""
    import torch

    if not gpu_ids or cuda:
        return device
    if cfg.dist_backend != "gloo":
        raise RuntimeError(f"train {cfg.name}: this worker holds GPU {list(gpu_ids)} but no CUDA device is visible "
                           "(driver or CUDA_VISIBLE_DEVICES?); dist_backend: gloo trains on CPU instead")
    if rank == 0:
        logger.warning("dist_backend=gloo and no CUDA device is visible on this GPU worker: training on CPU")
    return torch.device("cpu")


def setup_worker(cfg: TrainConfig, resume: str | None = None, session: TrainSession | None = None) -> WorkerState:
    """Device, precision, the net (from the checkpoint being resumed, or fresh), val set, TensorBoard.
    The checkpoint resumed is Ray Train's (a restarted worker group, or its record of this run name),
    else `resume`: the run folder's newest complete checkpoint, found before the loop started."""
    import ray
    import ray.train
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from synthfar_ray.model import MultiTaskNet
    from synthfar_ray.precision import device_precision
    from synthfar_ray.train_data import ValSet, val_source_of

    session = session or TrainSession()
    rank, world = session.context()
    device = worker_device(cfg, session.device(), ray.get_gpu_ids(), torch.cuda.is_available(), rank)
    precision = device_precision(cfg.amp, cfg.channels_last, device)
    if rank == 0:
        logger.info("precision on %s: amp %s%s, channels_last %s, compile %s", device, precision.amp,
                    " + GradScaler" if precision.scaler else "", precision.channels_last, cfg.compile)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    checkpoint = session.checkpoint()
    if checkpoint is None and resume is not None:
        fs, path = storage.resolve_retrying(resume, cfg.storage)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    pretrained = None if checkpoint else _local_weights(cfg.model.pretrained, cfg.storage)  # resuming: no need
    net = MultiTaskNet(cfg.model.backbone, pretrained, cfg.model.age_mode, cfg.model.synthetic_heads, cfg.model.transfer)
    adaptive = None
    if cfg.adapt.enabled:
        from synthfar_ray.adapt_modules import AdaptiveNet

        adaptive = AdaptiveNet(net, cfg.adapt)  # converts the BatchNorms (aux_bn) before any weights load
    restored = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            restored = checkpoints.load_training_state(d, net, adaptive.discriminator if adaptive else None)
        if rank == 0:
            logger.info("resuming %s from step %d (phase %s)", cfg.name, restored["step"], restored["phase"])
    model, trained = prepare_net(adaptive or net, device, precision, cfg.compile, session)
    net = trained.net if adaptive is not None else trained
    state = WorkerState(cfg, rank, world, device, precision, model, net, restored,
                        adaptive=trained if adaptive is not None else None, session=session)
    if restored is not None:
        state.step = state.start_step = int(restored["step"])
        state.last_metrics = dict(restored.get("metrics") or {})
    torch.manual_seed(cfg.seed + 1 + rank + 7919 * state.start_step)  # augmentation stream per rank and resume point
    state.syn_rows = torch.zeros((), dtype=torch.long, device=device)

    source = val_source_of(cfg)
    if source != "none" and rank == 0:
        crop = cfg.center_crop if source == "real" else cfg.synthetic_center_crop
        state.val = ValSet(session.dataset("val"), cfg, device, crop)
        if state.step < cfg.steps:
            state.val.prefetch()
    if rank == 0:
        state.writer = SummaryWriter(tempfile.mkdtemp(prefix="synthfar-tb-"))
    return state


def prepare_net(net, device, precision: Precision, compile: bool = False,
                session: TrainSession | None = None) -> tuple[Any, Any]:
    """(the module the steps run: on `device` in the precision's layout, DDP-wrapped when there are
    several workers, compiled on request; the plain net, for checkpoints and validation)."""
    import torch

    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = (session or TrainSession()).prepare_model(net, device)
    net = model.module if hasattr(model, "module") else model
    if compile:
        # Compiling the DDP module lets DDP's bucketing split the graph; the plain net keeps
        # clean state_dict keys (a compiled module prefixes them with `_orig_mod.`).
        model = torch.compile(model)
    return model, net


def optimizer_for(w: WorkerState, phase: Phase, index: int):
    """A fresh AdamW + warm-up/cosine schedule + scaler per phase, restored when resuming inside it."""
    import torch

    opt = torch.optim.AdamW(w.model.parameters(), lr=phase.lr, weight_decay=w.cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(w.cfg.warmup_steps, phase.end - phase.start))
    scaler = torch.amp.GradScaler(w.device.type, enabled=w.precision.scaler)
    if w.restored is not None and int(w.restored["phase_index"]) == index:
        opt.load_state_dict(w.restored["optimizer"])
        sched.load_state_dict(w.restored["scheduler"])
        scaler.load_state_dict(w.restored["scaler"])
    return opt, sched, scaler


def _streams(w: WorkerState, phase: Phase) -> dict[str, Any]:
    from synthfar_ray.train_data import BatchStream, prefetch_all

    crops = {"synthetic": w.cfg.synthetic_center_crop, "real": w.cfg.center_crop, "target": w.cfg.center_crop}
    names = phase.datasets + (("target",) if phase.adapts(w.cfg) else ())
    streams = {name: BatchStream(w.session.dataset(name), w.cfg.worker_batch(), w.cfg, w.rank, w.device,
                                 crops[name]) for name in names}
    prefetch_all(streams)  # start every pipeline at once, not one after the other
    return streams


def train_step(w: WorkerState, batch: tuple, augment, opt, sched, scaler, weights: LossWeights,
               n_source: int = 0, coefficient: float = 0.0):
    """One optimizer step on a device batch; returns the (device) loss and its per-head parts.
    With adaptation, rows [0, n_source) are synthetic and the rest real (unlabelled target rows
    included), and `coefficient` is the gradient reversal's.
    Nothing here reads a value back to the host (without a GradScaler): the CPU queues step after step."""
    import torch

    from synthfar_ray.keypoints import KEYPOINT_LAYOUTS
    from synthfar_ray.losses import multitask_loss
    from synthfar_ray.transforms import to_model_input, to_model_input_with_points

    images, labels, _ = batch
    p = w.precision
    points = [c for c in KEYPOINT_LAYOUTS if c in labels]
    if augment is not None and points:  # the shift-scale-rotate moves the keypoints too (each column's)
        x, moved = to_model_input_with_points(images, torch.cat([labels[c] for c in points], dim=1), augment,
                                              channels_last=p.channels_last, nhwc=False)
        labels = {**labels, **dict(zip(points, moved.split([labels[c].shape[1] for c in points], dim=1)))}
    else:
        x = to_model_input(images, augment, channels_last=p.channels_last, nhwc=False)
    with torch.autocast(device_type=w.device.type, dtype=p.autocast_dtype or torch.float32, enabled=p.amp != "none"):
        if w.adaptive is not None:
            outputs, adapt_loss = w.model(x, n_source, coefficient)
        else:
            outputs = w.model(x)
    loss, parts = multitask_loss(outputs, labels, weights)
    if w.adaptive is not None and w.cfg.adapt.method != "none":
        loss = loss + w.cfg.adapt.weight * adapt_loss.float()
        parts = {**parts, "adapt": adapt_loss.float()}
    scaler.scale(loss).backward()
    if w.cfg.grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), w.cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), {k: v.detach() for k, v in parts.items()}


class LossWindow:
    """Running sums of the loss between two log lines, kept on the device (no host sync per step)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        import torch

        self.loss = torch.zeros((), device=self.device)
        self.parts: dict[str, Any] = {}
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss, parts: dict[str, Any], images: int) -> None:
        self.loss += loss
        for k, v in parts.items():
            self.parts[k] = self.parts[k] + v if k in self.parts else v.clone()
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        n = max(1, self.steps)
        return {"loss": float(self.loss) / n, **{f"loss_{k}": float(v) / n for k, v in self.parts.items()}}


def log_window(w: WorkerState, window: LossWindow, phase: Phase, lr: float) -> None:
    elapsed = time.perf_counter() - window.t0
    ips = window.images * w.world / elapsed if elapsed > 0 else 0.0
    means = window.means()
    if w.rank == 0:
        logger.info("step %d/%d [%s] %s lr %.2e %.1f img/s", w.step, w.cfg.steps, phase.name,
                    " ".join(f"{k} {v:.4f}" for k, v in means.items()), lr, ips)
        for k, v in means.items():
            w.writer.add_scalar(f"train/{k}", v, w.step)
        w.writer.add_scalar("train/lr", lr, w.step)
        w.writer.add_scalar("train/images_per_second", ips, w.step)
    w.last_metrics.update(means)
    window.reset()


def report(w: WorkerState, phase: Phase, index: int, opt, sched, scaler, validate_now: bool, checkpoint_now: bool) -> None:
    """Validate (rank 0), write TensorBoard, and report metrics (+ a checkpoint) to the session."""
    from synthfar_ray.train_data import validate

    metrics: dict[str, Any] = {**w.last_metrics, "step": w.step, "phase": phase.name,
                               "synthetic_fraction": w.synthetic_fraction}
    if validate_now and w.rank == 0:
        metrics.update(validate(w.raw_model, w.val, w.precision, w.cfg.model.age_mode))
        for k, v in metrics.items():
            if k.startswith("val_") and isinstance(v, float) and not math.isnan(v):
                w.writer.add_scalar(f"val/{k[4:]}", v, w.step)
    w.last_metrics = metrics
    if w.rank == 0:
        w.history.append(dict(metrics))
        w.writer.flush()
        checkpoints.upload_tensorboard(w.writer.log_dir, w.cfg)
    name = f"{CHECKPOINT_PREFIX}{w.step:09d}"
    with tempfile.TemporaryDirectory(prefix="synthfar-ckpt-") as d:
        reported = None
        if checkpoint_now and w.rank == 0:
            checkpoints.save_training_state(d, w.raw_model, w.cfg, opt, sched, scaler, w.step, phase.name, index,
                                            metrics, channels_last=w.precision.channels_last,
                                            discriminator=getattr(w.adaptive, "discriminator", None))
            if w.session.uploads:
                w.checkpoint_uri = storage.join(w.cfg.run_uri, name)
                checkpoints.upload_checkpoint(d, w.checkpoint_uri, w.cfg.storage)
                checkpoints.prune_checkpoints(w.cfg.run_uri, w.cfg.keep_checkpoints, w.cfg.storage)
            else:
                reported = d
        w.session.report(metrics, reported, name)


def run_phase(w: WorkerState, index: int, phase: Phase) -> None:
    """Train one phase from the current step to its end, logging, validating and checkpointing."""
    import torch

    from synthfar_ray.adapt import reversal_coefficient
    from synthfar_ray.train_data import MixSchedule, concat_batches, unlabelled, val_source_of
    from synthfar_ray.transforms import BatchAugment

    cfg = w.cfg
    opt, sched, scaler = optimizer_for(w, phase, index)
    streams = _streams(w, phase)
    mix = MixSchedule(phase.datasets, cfg.worker_batch(), cfg.mix_ratio if cfg.plan == "mix" else None, cfg.seed, w.rank)
    # Rows decoded here can only be augmented here.
    augment = BatchAugment() if cfg.augment and (cfg.augment_on == "device" or cfg.decode_on == "worker") else None
    has_val = val_source_of(cfg) != "none"  # the same on every rank: all of them report together
    ckpt_every = cfg.checkpoint_every or cfg.val_every
    if w.rank == 0:
        logger.info("phase %s: steps %d..%d on %s (lr %g, %d workers x %d images)", phase.name,
                    max(w.step, phase.start), phase.end, "+".join(phase.datasets), phase.lr, w.world, cfg.worker_batch())
    window = LossWindow(w.device)
    mark = time.perf_counter()  # training time excludes validation and checkpointing
    adapts = phase.adapts(cfg)
    while w.step < phase.end:
        counts = mix.counts(w.step)
        batch = concat_batches([streams[n].take(counts[n]) for n in phase.datasets])  # synthetic rows first
        syn = batch[2]
        n = int(batch[0].shape[0])
        n_source, coefficient = counts.get("synthetic", 0), 0.0
        if adapts:  # the real target rows (labels unused) join the batch after the labelled rows
            # Their labels are unused, but the transfer heads' (they read detached inputs).
            keep = cfg.model.transfer_labels
            batch = concat_batches([batch, unlabelled(streams["target"].take(cfg.worker_batch()), keep)])
            coefficient = reversal_coefficient(w.step, cfg.adapt.warmup_steps)
        loss, parts = train_step(w, batch, augment, opt, sched, scaler, phase.weights, n_source, coefficient)
        w.step += 1
        w.steps_run += 1
        w.syn_rows += syn.sum()
        w.all_rows += n
        w.images_seen += n
        window.add(loss, parts, n)
        if w.step % cfg.log_every == 0 or w.step == phase.end:
            log_window(w, window, phase, sched.get_last_lr()[0])
        at_end = w.step == phase.end
        validate_now = has_val and (w.step % cfg.val_every == 0 or at_end)
        checkpoint_now = w.step % ckpt_every == 0 or at_end
        if validate_now or checkpoint_now:
            if w.device.type == "cuda":
                torch.cuda.synchronize()  # the queued steps belong to training time
            w.train_seconds += time.perf_counter() - mark
            report(w, phase, index, opt, sched, scaler, validate_now, checkpoint_now)
            mark = time.perf_counter()
        _maybe_inject_failure(w.step, w.rank)


def _maybe_inject_failure(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(step))
        raise RuntimeError(f"injected training failure after step {step} ({FAULT_ENV})")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: set up, train each phase not yet done, return the summary."""
    _setup_worker_logging()
    cfg: TrainConfig = config["cfg"]  # the object, not JSON: JSON would mask the storage secrets
    w = setup_worker(cfg, config.get("resume"), session_of(config))
    for index, phase in enumerate(phases_of(cfg)):
        if phase.end > w.step:
            run_phase(w, index, phase)
    if w.writer is not None:
        w.writer.close()
        checkpoints.upload_tensorboard(w.writer.log_dir, cfg)
    return {"metrics": w.last_metrics, "step": w.step, "start_step": w.start_step, "steps_run": w.steps_run,
            "images_per_second": w.images_seen * w.world / w.train_seconds if w.train_seconds > 0 else 0.0,
            "synthetic_fraction": w.synthetic_fraction, "history": w.history, "checkpoint": w.checkpoint_uri}


# ---------------------------------------------------------------------------------------------
# Driver


def _scaling(cfg: TrainConfig):
    from ray.train import ScalingConfig

    from synthfar_ray.raycluster import use_gpu

    gpu = use_gpu(cfg.use_gpu)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if gpu else {})}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu, resources_per_worker=resources)


def run_request(cfg: TrainConfig, gpu: bool) -> dict[str, float]:
    """What one run holds at once: its workers' CPUs (and GPUs when it trains on GPU), and a CPU
    share per Ray Data pipeline it reads (each train set of its largest phase, plus the val split)."""
    from synthfar_ray.train_data import val_source_of

    pipelines = max(len(p.datasets) + int(p.adapts(cfg)) for p in phases_of(cfg)) + int(val_source_of(cfg) != "none")
    request = {"CPU": cfg.num_workers * cfg.cpus_per_worker + pipelines * cfg.data_cpus}
    if gpu:
        request["GPU"] = cfg.num_workers * cfg.gpus_per_worker
    return request


def ingest_options(cfg: TrainConfig):
    """Ray Data's execution options for the run's datasets, on either executor: ingest defaults, with
    the row order fixed when `preserve_order` says so (without it the blocks reach the worker in
    whatever order the read tasks finish, and two runs with the same seed trained on differently
    ordered data: the demo's scores moved by up to 0.03 between reruns)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = cfg.preserve_order
    return options


def data_config(cfg: TrainConfig, datasets: Iterable[str]):
    """How Ray Train's worker group gets the datasets (the trainer executor and bench/train.py): the
    val split whole to every worker (rank 0 validates); train sets split between the workers, each by
    a SplitCoordinator actor, even for one worker (the task executor splits them the same way)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[n for n in datasets if n != "val"], execution_options=ingest_options(cfg))


def executor_of(cfg: TrainConfig, callbacks: list | None = None,
                in_trial: bool = False) -> Literal["trainer", "task", "trial"]:
    """What runs `cfg`: Train callbacks need a TorchTrainer; a one-worker run (`auto` or `task`) is a
    Ray task of its own or, inside a Tune trial that holds the worker's resources, that trial's process."""
    if callbacks or cfg.executor == "trainer" or (cfg.executor == "auto" and cfg.num_workers > 1):
        return "trainer"
    return "trial" if in_trial else "task"


def run_here(cfg: TrainConfig, datasets: dict[str, Any], on_report: Callable[[dict[str, Any]], None] | None = None,
             loop: Callable | None = None, loop_config: dict | None = None) -> Any:
    """Run `loop` in this process as rank 0 of 1 (a LocalSession; the task executor's task, or a Tune
    trial). The default loop is the training loop, resuming from the run folder's newest complete
    checkpoint (looked up here, so a retry continues from what its last attempt uploaded) and
    uploading its checkpoints itself."""
    for ds in datasets.values():
        ds.context.execution_options = ingest_options(cfg)
    if loop is None:
        loop, loop_config = train_loop_per_worker, {
            "cfg": cfg, "resume": checkpoints.latest_training_checkpoint(cfg.run_uri, cfg.storage)}
    # The train sets through a split coordinator each, as Ray Train hands them to its workers: Ray
    # Data's streaming executor then runs in that actor instead of beside the step in this process
    # (bench/train.py, 2026-12-07: data path median ~900 img/s against ~850 unsplit, start-up the
    # same), and the rows come in the trainer's order. Made here, each attempt gets its own.
    shards = {n: ds if n == "val" else ds.streaming_split(1, equal=True)[0] for n, ds in datasets.items()}
    return loop({**(loop_config or {}), "session": LocalSession(shards, on_report)})


def fit_in_task(cfg: TrainConfig, datasets: dict[str, Any], gpu: bool, env: dict[str, str] | None = None,
                loop: Callable | None = None, loop_config: dict | None = None) -> Any:
    """Run the training loop as one Ray task holding the worker's resources: Ray retries it
    (failure_max times, a lost node included) and each attempt resumes from the newest uploaded
    checkpoint. Another `loop` (bench/train.py's) runs the same way, once."""
    import ray

    task = ray.remote(run_here).options(
        name=f"train:{cfg.name}", num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker if gpu else 0,
        max_retries=cfg.failure_max if loop is None else 0, retry_exceptions=loop is None,
        runtime_env={"env_vars": env} if env else None)
    ref = task.remote(cfg, datasets, None, loop, loop_config)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    except ray.exceptions.RayError as e:
        raise StageFailed(f"training run {cfg.run_uri} failed: {last_line(e)}") from e


def fit_in_trial(cfg: TrainConfig, datasets: dict[str, Any], on_report: Callable[[dict[str, Any]], None]) -> Any:
    """Run the training loop in this process, a Tune trial holding the worker's resources, retrying a
    failed attempt failure_max times from the newest uploaded checkpoint, as a task would be. (A lost
    node takes the trial with it: Tune's trial_max_failures restarts it, and it resumes the same way.)"""
    for attempt in range(cfg.failure_max + 1):
        try:
            return run_here(cfg, datasets, on_report)
        except Exception as e:
            if attempt == cfg.failure_max:
                raise StageFailed(f"training run {cfg.run_uri} failed: {last_line(e)}") from e
            logger.warning("training run %s failed (%s): attempt %d of %d resumes from its newest checkpoint",
                           cfg.run_uri, last_line(e), attempt + 2, cfg.failure_max + 1)


def _dist_backend(cfg: TrainConfig, gpu: bool) -> str:
    return ("nccl" if gpu else "gloo") if cfg.dist_backend == "auto" else cfg.dist_backend


def check_resources(cfg: TrainConfig, scaling) -> None:
    """Fail now, in one line, if the cluster can never hold the run's worker group or its data tasks."""
    from synthfar_ray.raycluster import check_request, node_shapes

    shapes = node_shapes()
    check_request(f"train {cfg.name}: each Train worker", scaling.resources_per_worker, cfg.num_workers,
                  together=True, shapes=shapes)
    check_request(f"train {cfg.name}: each Ray Data decode task", {"CPU": cfg.data_cpus}, shapes=shapes)


def needed_datasets(cfg: TrainConfig) -> set[str]:
    """The train sets the phases read ("target": the real train rows as adaptation's unlabelled target)."""
    phases = phases_of(cfg)
    return {n for p in phases for n in p.datasets} | ({"target"} if any(p.adapts(cfg) for p in phases) else set())


def check_inputs(cfg: TrainConfig) -> None:
    """Every input the run will read exists: checked on the driver before Ray starts."""
    from synthfar_ray.train_data import check_dataset, synthetic_ids, val_source_of

    needed = needed_datasets(cfg) | ({val_source_of(cfg)} - {"none"})
    if "target" in needed:
        needed.add("real")
    crops = {"synthetic": ("synthetic_center_crop", cfg.synthetic_center_crop), "real": ("center_crop", cfg.center_crop)}
    for name in ("synthetic", "real"):
        if name in needed:
            check_dataset(getattr(cfg, name), name, cfg.storage, crops[name][1], crops[name][0])
    if "synthetic" in needed:
        synthetic_ids(cfg)


def _stored_result(cfg: TrainConfig, stored: dict[str, Any]) -> TrainResult:
    names = {f for f in TrainResult.__dataclass_fields__}
    return TrainResult(**{k: v for k, v in stored.items() if k in names})


def _fit_with_trainer(cfg: TrainConfig, datasets: dict[str, Any], scaling, env: dict[str, str],
                      callbacks: list | None) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """Run the loop on a Ray Train worker group: (the loop's summary, last checkpoint URI, metrics).
    Ray Train resumes from its own record of the run; `resume` covers a folder it has no record of
    (checkpoints the task executor wrote)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from synthfar_ray.raycluster import restoring_sigint_handler

    fs, path = storage.resolve_retrying(cfg.storage_path, cfg.storage)
    fs.create_dir(path, recursive=True)
    run_config = RunConfig(
        name=cfg.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.failure_max),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=list(callbacks or []),
    )
    resume = checkpoints.latest_training_checkpoint(cfg.run_uri, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "resume": resume},
        scaling_config=scaling,
        torch_config=TorchConfig(backend=_dist_backend(cfg, scaling.use_gpu)),
        run_config=run_config,
        datasets=datasets,
        dataset_config=data_config(cfg, datasets),
    )
    with restoring_sigint_handler():
        result = trainer.fit()
    if result.error is not None:
        raise StageFailed(f"training run {cfg.run_uri} failed: {last_line(result.error)}") from result.error
    out = result.return_value or {}
    ckpt_uri = (storage.join(cfg.run_uri, posixpath.basename(result.checkpoint.path.rstrip("/")))
                if result.checkpoint is not None else None)
    return out, ckpt_uri, dict(out.get("metrics") or result.metrics or {})


def run_train(cfg: TrainConfig, callbacks: list | None = None,
              on_report: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train as `cfg` says (resuming `<storage_path>/<name>` if it holds the same config).
    `callbacks` are Ray Train UserCallbacks added to the RunConfig (Tune's reporting from a
    multi-worker trial); `on_report`: the caller is a Tune trial holding one worker's resources and
    takes each report, so a one-worker run trains in its process (executor_of(..., in_trial=True))."""
    from synthfar_ray.raycluster import ensure_ray
    from synthfar_ray.train_data import build_datasets

    t0 = time.time()
    check_inputs(cfg)
    finished = checkpoints.claim_run(cfg)
    if finished is not None:
        logger.info("run %s already finished %d steps with this config; nothing to do", cfg.run_uri, finished["steps"])
        return _stored_result(cfg, finished)
    ensure_ray()
    scaling = _scaling(cfg)
    check_resources(cfg, scaling)
    relabelled = None
    if cfg.relabel is not None and "synthetic" in needed_datasets(cfg):
        from synthfar_ray.quality import relabel_changes
        from synthfar_ray.selection import write_parquet

        relabelled = relabel_changes(cfg.relabel, cfg.storage)
        write_parquet(relabelled, storage.join(cfg.run_uri, RELABELLED_FILE), cfg.storage)
    datasets = build_datasets(cfg, needed_datasets(cfg), relabelled)
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    executor = executor_of(cfg, callbacks, in_trial=on_report is not None)
    if on_report is not None and executor != "trial":
        raise ValueError(f"train {cfg.name}: on_report needs a one-worker run with executor auto or task")
    logger.info("training %s (%s plan, %d steps, %d workers, %s executor) -> %s", cfg.name, cfg.plan, cfg.steps,
                cfg.num_workers, executor, cfg.run_uri)
    if executor in ("task", "trial"):
        out = fit_in_task(cfg, datasets, scaling.use_gpu, env) if executor == "task" else \
            fit_in_trial(cfg, datasets, on_report)
        ckpt_uri = out.get("checkpoint") or checkpoints.latest_training_checkpoint(cfg.run_uri, cfg.storage)
        metrics = out.get("metrics") or {}
    else:
        out, ckpt_uri, metrics = _fit_with_trainer(cfg, datasets, scaling, env, callbacks)
    seconds = time.time() - t0
    train_result = TrainResult(
        checkpoint=ckpt_uri, metrics=dict(metrics), steps=int(out.get("step", 0)),
        seconds=seconds, images_per_second=float(out.get("images_per_second") or 0.0),
        start_step=int(out.get("start_step", 0)), steps_run=int(out.get("steps_run", 0)),
        run_uri=cfg.run_uri, history=list(out.get("history") or []), synthetic_fraction=out.get("synthetic_fraction"))
    summary = asdict(train_result) | {"name": cfg.name, "plan": cfg.plan, "finished": train_result.steps >= cfg.steps,
                                      "mix_ratio": cfg.mix_ratio if cfg.plan == "mix" else None,
                                      "config": dump_config(cfg)}
    checkpoints.write_json(storage.join(cfg.run_uri, checkpoints.RESULT_FILE), summary, cfg.storage)
    logger.info("done: %s step %d in %.1f s (%.1f img/s); checkpoint %s", cfg.name, train_result.steps, seconds,
                train_result.images_per_second, ckpt_uri)
    return train_result


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
    from synthfar_ray.cli import add_config_args, stage_parser

    p = stage_parser(sub, "train")
    add_config_args(p)
    p.set_defaults(func=_cli)
