"""Stage 1: a synthetic face dataset generated on a Ray Data actor pool, written as Parquet.

Two generators make the images of the same rows (same ids, labels, prompts, poses):
- `diffusion` (default): Stable Diffusion + OpenPose ControlNet (diffusion.py);
- `procedural`: the ground-truth face renderer (faces.py), which draws each id's face from its
  labels, hair and head pose, in a `synthetic` or `photo` style, with optional label noise. Its rows
  also carry the rendered attributes (`render_age`, `render_gender`, `render_ethnicity`, and
  `render_race7` with `render.races7`): the truth
  of each picture, which training never reads and selection/quality evaluation use. Rendering is
  per image, so its bytes do not depend on compute.batch_size.
  With `prompts.races7` (diffusion only) each prompt asks for one of FairFace's 7 races, which its
  row records in `render_race7`: the race the picture was asked to show, as the procedural rows'
  column records the race it does show.

Data flow: shards of ids -> `map_batches(ShardGenerator, compute=ActorPoolStrategy)` where each
actor holds one diffusion pipeline, builds the prompt rows and poses of its shard (pure functions
of run seed and id), generates the images in micro-batches, and writes the shard as one Parquet
file `part-<shard>.parquet`.

Why shards own their files: a shard's file is written whole (atomic rename / single PUT) under a
name fixed by its ids, so a retried task (actor died mid-way) rewrites the same file, a re-run
skips complete shards, and the output always holds each id at most once.

What claims an output (`prepare_output` owns all of it): `_manifest.json`'s fingerprint ties the
folder to the settings that decide a row's bytes, compute.batch_size included (batched fp32
arithmetic changes the images slightly, so a dataset is extended or resumed only at the batch size
that made it). A manifest whose run wrote no part yet claims nothing, so a corrected config can
replace a run that failed before its first shard. Temp files that killed writers left in the
folder are removed at the start of a run. The manifest keeps totals (shards and images present)
and the history of the runs that made the folder.

Non-finite images are dropped, never written: an image whose diffusion output holds NaN/inf gets no
row; its id is listed in the part's Parquet metadata (`synthfar.dropped_ids`), counted in the shard's
result and totalled in the manifest (`images_dropped`, `dropped_ids`). A shard is complete when its
rows and dropped ids cover its range, so a re-run does not retry them (the same seed and batch size
give the same NaN); `overwrite=true` or another seed does.

Off the critical path: an actor runs two shards at once (Ray Data's `max_concurrent_calls_per_actor`,
threads of the actor): while one shard's rows are JPEG-encoded, packed into Parquet and written
(storage.write_bytes), the other is diffused; a lock gives the generator to one shard at a time. A
shard's call returns its report only after its own file is written, and a failed write raises in that
call, so Ray Data retries that shard or the job fails: no report ever claims a file that is not
there. At most two shards per actor are in memory (one diffusing or waiting for the generator, one
being written).

Timing is stamped where the work is done: each shard's result carries its actor's `time.time()` when
it got the generator and when its file was written (results reach the driver bunched), which
`GenerateResult.steady_images_per_second` uses.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from synthfar_ray import storage
from synthfar_ray.config import StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.diffusion import (FaceGenerator, ModelConfig, SamplerConfig, check_model_paths, model_content,
                                   model_label)
from synthfar_ray.errors import UserError
from synthfar_ray.faces import (HAIR_LENGTHS, POSE_FIELDS, FaceBatch, PoseBatch, RenderConfig, check_vocab, face_seeds,
                                render_faces, render_keypoints)
from synthfar_ray.images import encode_jpeg
from synthfar_ray.keypoints import skeleton_keypoints, to_column
from synthfar_ray.labels import CORE_FIELDS, FAIRFACE_RACES7, age_to_bin, ethnicity_index, gender_index
from synthfar_ray.paths import OutputPath, display
from synthfar_ray.poses import HeadPose, PoseConfig, PoseFolder, render_pose, sample_pose
from synthfar_ray.prompts import PromptConfig, load_vocab, render_prompt, sample_attributes
from synthfar_ray.raycluster import actor_pool, check_request, ensure_ray, task_error_cause

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PART_PREFIX = "part-"
DROPPED_KEY = b"synthfar.dropped_ids"  # Parquet metadata of a part: JSON list of ids not written
# Settings that decide the bytes of a row: see fingerprint().
CONTENT_FIELDS = ("seed", "shard_size", "val_fraction", "prompts", "poses")
GENERATOR_FIELDS = {"diffusion": ("jpeg_quality", "model", "sampler"), "procedural": ("generator", "render")}
# How diffusion encodes its prompts, in the fingerprint: 2 = the shared negative prompt encoded on its
# own and cached per actor. On CPU the text encoder's output depends slightly on what else is in its
# batch, so version 1 (negatives encoded beside the batch's prompts) moved some pixels by one level:
# a version-1 dataset is not resumed or extended by this code.
PROMPT_ENCODING = 2
# Shards an actor works on at once: one holds the generator while the other is written.
SHARDS_IN_FLIGHT_PER_ACTOR = 2
# Test-only fault injection: path of a marker file; the first actor to reach it dies hard once.
FAULT_ENV = "SYNTHFAR_FAULT_CRASH_ONCE"


class ManifestError(UserError, ValueError):
    """An output's `_manifest.json` that cannot be read."""


class ComputeConfig(StrictModel):
    num_actors: int | None = Field(None, ge=1, description="pool size; default: one per GPU, or 1 on CPU")
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float = Field(0.5, gt=0, description="fractional so read tasks still get a core on small nodes")
    batch_size: int = Field(8, ge=1, description="images per diffusion call; fixed per dataset (the bytes depend on it)")


class GenerateConfig(StageConfig):
    output: OutputPath = Field(description="dataset folder URI (local path, file:// or s3://)")
    num_images: int = Field(gt=0)
    seed: int = 0
    shard_size: int = Field(64, ge=1, description="images per Parquet file: the unit of resume and retry")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of ids put in split 'val'")
    jpeg_quality: int = Field(95, ge=1, le=100, description="diffusion only (procedural: render's style decides)")
    overwrite: bool = False
    generator: Literal["diffusion", "procedural"] = Field(
        "diffusion", description="diffusion: model + sampler; procedural: the ground-truth face renderer (render)")
    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    render: RenderConfig = RenderConfig()
    prompts: PromptConfig = PromptConfig()
    poses: PoseConfig = PoseConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _procedural_poses(self) -> GenerateConfig:
        if self.generator == "procedural" and self.poses.folder:
            raise ValueError("poses.folder: the procedural generator draws the sampled head pose; "
                             "a folder of OpenPose images applies to the diffusion generator only")
        if self.generator == "procedural" and self.prompts.races7:
            # Both would write render_race7; the renderer's is the race its face shows.
            raise ValueError("prompts.races7: the procedural generator draws the race it renders with "
                             "render.races7; prompts.races7 applies to the diffusion generator only")
        return self

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images this config makes."""
        if self.generator == "procedural":
            return self.render.size, self.render.size
        return self.sampler.width, self.sampler.height


@dataclass(frozen=True)
class ShardReport:
    """One shard as its actor made it; `start` (it got the generator) and `end` (its file was written)
    are the actor's time.time()."""

    shard: int
    actor: str  # host:pid of the actor process
    start: float
    end: float
    images: int  # ids diffused: rows written + dropped
    dropped_ids: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.images - len(self.dropped_ids)


@dataclass
class GenerateResult:
    output: str
    num_images: int
    generated: int  # rows written by this run (the rest were already there)
    shards_generated: int
    shards_skipped: int
    seconds: float
    images_per_second: float
    dropped: int = 0  # images of this run dropped for non-finite pixels
    manifest: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardReport] = field(default_factory=list)  # in arrival order

    def steady_images_per_second(self) -> float:
        """Throughput once the actors are warm, from actor-side clocks: per actor, the images of its
        shards after the first over the time from that second shard's start (it got the generator)
        to the last write's end (gaps between shards included), summed over actors since they run
        side by side. An actor that made one shard only counts that shard (warm-up included). NaN
        without shards."""
        by_actor: dict[str, list[ShardReport]] = {}
        for r in self.shards:
            by_actor.setdefault(r.actor, []).append(r)
        rate = 0.0
        for reports in by_actor.values():
            reports.sort(key=lambda r: r.start)
            warm = reports[1:] or reports
            span = max(r.end for r in warm) - warm[0].start  # writes overlap: the last to start may not end last
            rate += sum(r.images for r in warm) / span if span > 0 else 0.0
        return rate if by_actor else float("nan")


@dataclass(frozen=True)
class PartInfo:
    rows: int
    dropped_ids: tuple[int, ...] = ()


@dataclass
class OutputState:
    """What `prepare_output` found: shards still to make, complete parts, earlier runs' history."""

    todo: list[tuple[int, int, int]]
    complete: dict[int, PartInfo]
    history: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Per-id facts: pure functions of (run seed, id), so any id can be regenerated alone.

def image_seed(run_seed: int, image_id: int) -> int:
    """Seed of the diffusion noise for one image."""
    return int(np.random.SeedSequence([run_seed, image_id, 0x5EED]).generate_state(1)[0])


def split_for(run_seed: int, image_id: int, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "train"
    u = np.random.default_rng(np.random.SeedSequence([run_seed, image_id, 0x5917])).random()
    return "val" if u < val_fraction else "train"


def fingerprint(cfg: GenerateConfig) -> str:
    """Hash of everything that decides the bytes of a row: the content settings, the generator's
    own settings and, for diffusion, compute.batch_size (batched fp32 arithmetic is not
    bit-identical across batch sizes). num_images, the pool's shape and the output path are left
    out, so a run may grow the dataset or move to a bigger pool and still resume. A diffusion
    config also hashes how prompts are encoded (PROMPT_ENCODING)."""
    dump = dump_config(cfg)
    parts = {k: dump[k] for k in CONTENT_FIELDS + GENERATOR_FIELDS[cfg.generator]}
    if "model" in parts:
        parts["model"] = model_content(parts["model"])
    if cfg.generator == "diffusion":
        parts["batch_size"] = cfg.compute.batch_size
        parts["prompt_encoding"] = PROMPT_ENCODING
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int, int]]:
    """[(shard, first id, end id)] covering 0..num_images-1."""
    return [(s, s * shard_size, min((s + 1) * shard_size, num_images))
            for s in range(math.ceil(num_images / shard_size))]


def part_name(shard: int) -> str:
    return f"{PART_PREFIX}{shard:06d}.parquet"


EXTRA_FIELDS: list[pa.Field] = [
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("country", pa.string()),
    pa.field("name", pa.string()),
    pa.field("hair_length", pa.string()),
    pa.field("hair_style", pa.string()),
    pa.field("hair_color", pa.string()),
    pa.field("profession", pa.string()),
    pa.field("descriptors", pa.string()),
    pa.field("pose_yaw", pa.float32()),
    pa.field("pose_pitch", pa.float32()),
    pa.field("pose_roll", pa.float32()),
    pa.field("pose_scale", pa.float32()),
    pa.field("pose_offset_x", pa.float32()),
    pa.field("pose_offset_y", pa.float32()),
    pa.field("pose_file", pa.string()),
    pa.field("model", pa.string()),
    # Procedural generator only (null for diffusion): what the picture shows, the ground truth.
    pa.field("render_age", pa.float32()),
    pa.field("render_gender", pa.int8()),
    pa.field("render_ethnicity", pa.int8()),
    # Facial keypoints (keypoints.py): x0, y0, x1, y1, ... of keypoints.KEYPOINT_NAMES, NaN where the
    # row does not define the point; procedural: the renderer's exact points, diffusion: the pose
    # skeleton's; null when a pose folder image decided the pose.
    pa.field("keypoints", pa.list_(pa.float32())),
]
RENDER_COLUMNS: tuple[str, ...] = ("render_age", "render_gender", "render_ethnicity")
SYNTHETIC_SCHEMA = pa.schema(CORE_FIELDS + EXTRA_FIELDS)
# render.races7 (procedural: the FairFace race the face shows) or prompts.races7 (diffusion: the race
# the prompt asked for), an index into labels.FAIRFACE_RACES7. Only those parts add the column;
# without either option they are as before it existed.
RACE7_FIELD = pa.field("render_race7", pa.int8())


def prompt_rows(cfg: GenerateConfig, ids: range) -> list[dict[str, Any]]:
    """Label and prompt fields of each id (everything but the image)."""
    rows = []
    width, height = cfg.image_size
    for i in ids:
        a = sample_attributes(cfg.seed, i, cfg.prompts)
        pose = sample_pose(cfg.seed, i, cfg.poses)
        rows.append({
            "id": i, "width": width, "height": height,
            "age": float(a.age), "age_bin": int(age_to_bin(a.age)),
            "gender": gender_index(a.gender), "ethnicity": ethnicity_index(a.ethnicity),
            "source": "synthetic", "split": split_for(cfg.seed, i, cfg.val_fraction),
            "prompt": render_prompt(a, cfg.prompts), "negative_prompt": cfg.prompts.negative_prompt,
            "seed": image_seed(cfg.seed, i), "country": a.country, "name": a.name,
            "hair_length": a.hair_length, "hair_style": a.hair_style, "hair_color": a.hair_color,
            "profession": a.profession, "descriptors": ", ".join(a.descriptors),
            **{f"pose_{k}": float(v) for k, v in asdict(pose).items()},
            "pose_file": None,
            **({RACE7_FIELD.name: FAIRFACE_RACES7.index(a.race7)} if a.race7 is not None else {}),
        })
    return rows


def control_image(cfg: GenerateConfig, row: dict[str, Any], pose_folder: PoseFolder | None = None) -> np.ndarray:
    """The OpenPose image of a prompt row: the folder's pick for its id (the row's pose parameters
    are then replaced by the file name, and its keypoints are unknown), or the row's head pose
    rendered (its skeleton's face points become the row's keypoints)."""
    s = cfg.sampler
    if pose_folder is not None:
        name, image = pose_folder.pick(cfg.seed, row["id"])
        row["pose_file"] = name
        for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y"):
            row[f"pose_{k}"] = None  # the folder image decides the pose, not the parameters
        row["keypoints"] = None
        return image
    pose = HeadPose(**{k: row[f"pose_{k}"] for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")})
    row["keypoints"] = to_column(skeleton_keypoints(pose, s.width, s.height))
    return render_pose(pose, s.width, s.height)


def face_inputs(run_seed: int, rows: list[dict[str, Any]]) -> tuple[FaceBatch, PoseBatch, np.ndarray]:
    """The renderer's inputs of prompt rows (or of the rows a procedural set stored, which hold the
    same fields): what render_faces and the keypoint functions take, so they can be recomputed."""
    attrs = FaceBatch(
        age=np.array([r["age"] for r in rows], dtype=np.float64),
        gender=np.array([r["gender"] for r in rows], dtype=np.int64),
        ethnicity=np.array([r["ethnicity"] for r in rows], dtype=np.int64),
        hair_length=np.array([HAIR_LENGTHS.index(r["hair_length"]) for r in rows], dtype=np.int64),
        hair_color=[r["hair_color"] for r in rows], hair_style=[r["hair_style"] for r in rows])
    poses = PoseBatch(**{k: np.array([r[f"pose_{k}"] for r in rows], dtype=np.float64) for k in POSE_FIELDS})
    return attrs, poses, face_seeds(run_seed, [r["id"] for r in rows])


def render_rows(cfg: GenerateConfig, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """The procedural images of prompt rows (uint8 HWC); adds each row's render_* truth and
    keypoints (faces.render_keypoints) and puts the render seed in its `seed` column."""
    attrs, poses, seeds = face_inputs(cfg.seed, rows)
    images, truth = render_faces(attrs, poses, cfg.render, seeds)
    keypoints = render_keypoints(attrs, poses, cfg.render, seeds)
    for j, r in enumerate(rows):
        r["seed"] = int(seeds[j])
        r["keypoints"] = to_column(keypoints[j])
        r.update({k: truth[k][j].item() for k in (*RENDER_COLUMNS, RACE7_FIELD.name) if k in truth})
    return list(images)


def part_bytes(rows: list[dict[str, Any]], dropped_ids: list[int]) -> bytes:
    """A part file: the rows, plus the ids dropped for non-finite pixels in its metadata."""
    races7 = bool(rows) and RACE7_FIELD.name in rows[0]
    table = pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA.append(RACE7_FIELD) if races7 else SYNTHETIC_SCHEMA)
    if dropped_ids:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), DROPPED_KEY: json.dumps(dropped_ids)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The actor.

def generator_label(cfg: GenerateConfig) -> str:
    """The `model` column: the diffusion model, or procedural/<style>."""
    return f"procedural/{cfg.render.style}" if cfg.generator == "procedural" else model_label(cfg.model)


class ShardGenerator:
    """One generator per actor (a diffusion pipeline, or the face renderer); each call generates
    and writes whole shards. Calls run in two threads of the actor (SHARDS_IN_FLIGHT_PER_ACTOR): the
    generator lock lets one shard diffuse while the other's file is encoded and written."""

    def __init__(self, cfg: GenerateConfig, crash_marker: str | None = None):
        # The config object itself, not its JSON: a JSON dump masks the storage credentials (SecretStr).
        self.cfg = cfg
        procedural = cfg.generator == "procedural"
        self.generator = (None if procedural else
                          FaceGenerator(self.cfg.model, self.cfg.sampler, batch_size=cfg.compute.batch_size))
        s = self.cfg.sampler
        self.pose_folder = (PoseFolder(self.cfg.poses.folder, self.cfg.storage, s.width, s.height)
                            if self.cfg.poses.folder else None)
        self.model_label = generator_label(cfg)
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.crash_marker = crash_marker
        self.encoder = ThreadPoolExecutor(max_workers=2)  # JPEG encoding overlaps the next diffusion call
        self._generating = threading.Lock()  # one shard at a time on the generator (the GPU)
        self._preparing = threading.Lock()  # the pose folder's LRU cache is not thread-safe

    def _maybe_crash(self) -> None:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            logger.error("fault injection: actor exiting mid-shard (%s)", FAULT_ENV)
            os._exit(1)

    def _render_shard(self, rows: list[dict[str, Any]], _controls: list[np.ndarray]
                      ) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
        """Procedural: every row gets an image (the renderer's pixels are finite by construction)."""
        images = render_rows(self.cfg, rows)
        self._maybe_crash()
        q = self.cfg.render.jpeg_quality
        return rows, [self.encoder.submit(encode_jpeg, image, q) for image in images], []

    def _diffuse_shard(self, rows: list[dict[str, Any]], controls: list[np.ndarray]
                       ) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
        bs = self.cfg.compute.batch_size
        kept, pending, dropped = [], [], []
        for b in range(0, len(rows), bs):
            chunk = rows[b:b + bs]
            images, finite = self.generator.generate(
                [r["prompt"] for r in chunk], [r["negative_prompt"] for r in chunk], controls[b:b + bs],
                [r["seed"] for r in chunk])
            for r, image, ok in zip(chunk, images, finite):
                if ok:
                    kept.append(r)
                    pending.append(self.encoder.submit(encode_jpeg, image, self.cfg.jpeg_quality))
                else:
                    dropped.append(r["id"])
            self._maybe_crash()
        return kept, pending, dropped

    def generate_shard(self, shard: int, start: int, stop: int) -> ShardReport:
        with self._preparing:  # pure per id, so it runs while the other shard holds the generator
            rows = prompt_rows(self.cfg, range(start, stop))
            controls = ([control_image(self.cfg, r, self.pose_folder) for r in rows]
                        if self.generator is not None else [])
        make = self._diffuse_shard if self.generator is not None else self._render_shard
        with self._generating:
            began = time.time()
            kept, pending, dropped = make(rows, controls)
        # The generator is free: the other shard diffuses while this one is encoded and written.
        for r, fut in zip(kept, pending):
            r["image"] = fut.result()
            r["model"] = self.model_label
        uri = storage.join(self.cfg.output, part_name(shard))
        if dropped:
            logger.warning("%s: %d image(s) with non-finite pixels dropped (ids %s)", uri, len(dropped), dropped)
        storage.write_bytes(uri, part_bytes(kept, dropped), self.cfg.storage)
        return ShardReport(shard, self.actor, began, time.time(), len(rows), tuple(dropped))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reports = [self.generate_shard(int(shard), int(start), int(stop))
                   for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"])]
        return {
            "shard": np.asarray([r.shard for r in reports]),
            "actor": np.asarray([r.actor for r in reports]),
            "start": np.asarray([r.start for r in reports]),
            "end": np.asarray([r.end for r in reports]),
            "images": np.asarray([r.images for r in reports]),
            "dropped_ids": np.asarray([json.dumps(list(r.dropped_ids)) for r in reports]),
        }


def _report_from_row(row: dict[str, Any]) -> ShardReport:
    return ShardReport(int(row["shard"]), str(row["actor"]), float(row["start"]), float(row["end"]),
                       int(row["images"]), tuple(json.loads(str(row["dropped_ids"]))))


# ---------------------------------------------------------------------------------------------
# The driver.

def read_manifest(cfg: GenerateConfig) -> dict[str, Any] | None:
    uri = storage.join(cfg.output, MANIFEST)
    if not storage.exists(uri, cfg.storage):
        return None
    try:
        return json.loads(storage.read_bytes(uri, cfg.storage))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{display(uri)} is not valid JSON ({e}); remove it or run with overwrite=true") from e


def write_manifest(cfg: GenerateConfig, manifest: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2).encode(), cfg.storage)


def _part_info(cfg: GenerateConfig, name: str) -> PartInfo | None:
    """Rows and dropped ids of a part; None when it cannot be read (it is then regenerated)."""
    uri = storage.join(cfg.output, name)
    fs, path = storage.resolve(uri, cfg.storage)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        dropped = json.loads((meta.metadata or {}).get(DROPPED_KEY, b"[]"))
    except Exception as e:  # a truncated/corrupt part is regenerated, not trusted
        logger.warning("unreadable part %s (%s): it will be regenerated", display(uri), e)
        return None
    return PartInfo(meta.num_rows, tuple(int(i) for i in dropped))


def _with_batch_size(cfg: GenerateConfig, batch_size: int) -> GenerateConfig:
    return cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"batch_size": batch_size})})


def _refusal(cfg: GenerateConfig, manifest: dict[str, Any], fp: str) -> FileExistsError:
    """The error for an output made by another config; names compute.batch_size when only it differs."""
    where = display(cfg.output)
    old_bs = manifest.get("config", {}).get("compute", {}).get("batch_size")
    if (isinstance(old_bs, int) and old_bs != cfg.compute.batch_size
            and fingerprint(_with_batch_size(cfg, old_bs)) == manifest.get("fingerprint")):
        return FileExistsError(
            f"{where} was generated with compute.batch_size={old_bs}, this run has compute.batch_size="
            f"{cfg.compute.batch_size}: image bytes depend on the batch size, so a dataset is resumed or "
            f"extended only at the one that made it. Set compute.batch_size={old_bs}, use another output, "
            "or overwrite=true")
    return FileExistsError(
        f"{where} was generated with a different config (fingerprint {manifest.get('fingerprint')} != {fp}; "
        "seed/generator/model/sampler/render/prompts/poses/shard_size/val_fraction/jpeg_quality/"
        "compute.batch_size differ). "
        "Use another output or overwrite=true")


def remove_temp_files(cfg: GenerateConfig) -> list[str]:
    """Delete the temp files killed writers left in the output folder (storage.temp_name)."""
    names = [n for n in storage.list_files(cfg.output, cfg.storage) if storage.is_temp_name(n)]
    for n in names:
        storage.delete(storage.join(cfg.output, n), cfg.storage)
    if names:
        logger.info("removed %d leftover temp file(s) from %s", len(names), display(cfg.output))
    return names


def prepare_output(cfg: GenerateConfig) -> OutputState:
    """Check the output against this config; return the shards still to generate, the complete
    parts and the history of the runs that made them. Raises before any work if the output belongs
    to another config; a manifest whose run wrote no part does not count as a claim."""
    fp = fingerprint(cfg)
    where = display(cfg.output)
    manifest = read_manifest(cfg)
    parts = [p for p in storage.list_files(cfg.output, cfg.storage, suffix=".parquet") if p.startswith(PART_PREFIX)]
    if cfg.overwrite and (manifest or parts):
        logger.info("overwrite=true: removing %d existing parts in %s", len(parts), where)
        for p in parts + ([MANIFEST] if manifest else []):
            storage.delete(storage.join(cfg.output, p), cfg.storage)
        manifest, parts = None, []
    if manifest is None and parts:
        raise FileExistsError(f"{where} holds {len(parts)} Parquet parts but no {MANIFEST}: it was not "
                              "made by `synthfar generate`; choose another output or set overwrite=true")
    if manifest is not None and manifest.get("fingerprint") != fp:
        if parts:
            raise _refusal(cfg, manifest, fp)
        logger.warning("%s: replacing the manifest of an earlier run (fingerprint %s, status %s) that wrote no part",
                       where, manifest.get("fingerprint"), manifest.get("status"))
        manifest = None
    wanted = shard_ranges(cfg.num_images, cfg.shard_size)
    wanted_names = {part_name(s) for s, _, _ in wanted}
    extra = [p for p in parts if p not in wanted_names]
    if extra:
        raise FileExistsError(f"{where} holds shards beyond num_images={cfg.num_images} ({extra[0]} ...): "
                              "raise num_images or set overwrite=true")
    remove_temp_files(cfg)  # the folder is ours from here on
    present, todo, complete = set(parts), [], {}
    for s, a, b in wanted:
        info = _part_info(cfg, part_name(s)) if part_name(s) in present else None
        if info is not None and info.rows + len(info.dropped_ids) == b - a:
            complete[s] = info
        else:
            todo.append((s, a, b))
    if todo and complete:
        _check_same_columns(cfg, part_name(min(complete)))
    return OutputState(todo, complete, list(manifest.get("runs", [])) if manifest else [])


def _check_same_columns(cfg: GenerateConfig, name: str) -> None:
    """Refuse to add parts to a dataset whose parts lack a column new parts have (one made before
    the `keypoints` column): Parquet readers take the first file's schema, and then drop the new
    column or fail on the parts that have it."""
    uri = storage.join(cfg.output, name)
    fs, path = storage.resolve(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        have = set(pq.ParquetFile(f).schema_arrow.names)
    missing = [c for c in SYNTHETIC_SCHEMA.names if c not in have]
    if missing:
        raise FileExistsError(f"{display(cfg.output)} was written without the column(s) {missing} that new parts "
                              f"have ({name}); adding parts would mix schemas, which readers cannot combine: "
                              "set overwrite=true to regenerate it, or choose another output")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _totals(complete: dict[int, PartInfo], runs: list[dict[str, Any]]) -> dict[str, Any]:
    dropped = sorted(i for p in complete.values() for i in p.dropped_ids)
    return {
        "shards_present": len(complete), "images_present": sum(p.rows for p in complete.values()),
        "images_dropped": len(dropped), "dropped_ids": dropped,
        "images_generated": sum(r.get("images_generated", 0) for r in runs),  # all runs; a redone shard counts again
    }


def manifest_for(cfg: GenerateConfig, complete: dict[int, PartInfo], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest: config, totals of the parts present, and every run's record (the last is this one)."""
    num_shards = len(shard_ranges(cfg.num_images, cfg.shard_size))
    return {
        "stage": "generate", "fingerprint": fingerprint(cfg), "status": runs[-1]["status"],
        "config": dump_config(cfg), "num_images": cfg.num_images, "num_shards": num_shards,
        **_totals(complete, runs), "runs": runs,
    }


def _run_record(started: float, status: str, reports: list[ShardReport], skipped: int,
                error: str | None = None) -> dict[str, Any]:
    seconds = time.time() - started
    rows = sum(r.rows for r in reports)
    record = {
        "started_at": _utc(started), "finished_at": _utc(time.time()), "status": status,
        "shards_generated": len(reports), "shards_skipped": skipped, "images_generated": rows,
        "images_dropped": sum(len(r.dropped_ids) for r in reports), "seconds": round(seconds, 3),
        "images_per_second": round(rows / seconds, 4) if rows else None,
    }
    return record | ({"error": error} if error else {})


def _generate_shards(cfg: GenerateConfig, todo: list[tuple[int, int, int]]) -> Iterator[ShardReport]:
    """Run the shards on a Ray Data actor pool; yield each shard's report as it arrives."""
    import ray

    ensure_ray()
    actors, gpus = actor_pool(cfg.compute.num_actors, cfg.compute.gpus_per_actor)
    actors = min(actors, len(todo))
    check_request("generate: each diffusion actor", {"CPU": cfg.compute.cpus_per_actor, "GPU": gpus})
    logger.info("generating %d shards (%d images) into %s on %d actor(s) [%s GPU, %s CPU each]", len(todo),
                sum(b - a for _, a, b in todo), display(cfg.output), actors, gpus, cfg.compute.cpus_per_actor)
    items = [{"shard": s, "start": a, "stop": b} for s, a, b in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardGenerator,
        fn_constructor_kwargs={"cfg": cfg, "crash_marker": os.environ.get(FAULT_ENV)},
        batch_size=1,
        # Two calls at once per actor, in threads (ShardGenerator serialises the generator itself).
        compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors,
                                           max_concurrent_calls_per_actor=SHARDS_IN_FLIGHT_PER_ACTOR,
                                           enable_true_multi_threading=True),
        num_gpus=gpus,
        num_cpus=cfg.compute.cpus_per_actor,
    )
    ds.context.raise_original_map_exception = True  # a shard's StorageError reaches the driver as itself
    try:
        for row in ds.iter_rows():
            yield _report_from_row(row)
    except ray.exceptions.RayTaskError as e:
        cause = task_error_cause(e)
        if isinstance(cause, UserError):  # a shard's own error (e.g. StorageError), as one line
            raise cause from None
        raise


def _log_shard(report: ShardReport, reports: list[ShardReport], target: int, started: float) -> None:
    done = sum(r.images for r in reports)
    elapsed = time.time() - started
    eta = (target - done) * elapsed / done if done else float("nan")
    logger.info("shard %d written: %d/%d images (%.2f img/s, ETA %.0f s)", report.shard, done, target,
                done / elapsed, eta)


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    """Generate the shards the output still lacks (all of them for a new output) and record the run
    in the manifest; refuses, before Ray starts, a missing local model or an output of another config."""
    started = time.time()
    if cfg.generator == "diffusion":
        check_model_paths(cfg.model)  # a missing local model fails here, before Ray starts
    elif cfg.prompts.vocab is None or storage.is_local(cfg.prompts.vocab):
        check_vocab(load_vocab(cfg.prompts.vocab))  # hair the renderer cannot draw fails here
    storage.ensure_dir(cfg.output, cfg.storage)
    state = prepare_output(cfg)
    skipped, target = len(state.complete), sum(b - a for _, a, b in state.todo)
    if skipped:
        logger.info("%d shards already complete in %s", skipped, display(cfg.output))
    runs = state.history + [{"started_at": _utc(started), "status": "running"}]
    write_manifest(cfg, manifest_for(cfg, state.complete, runs))  # claims the output for this config
    reports: list[ShardReport] = []
    try:
        for report in _generate_shards(cfg, state.todo) if state.todo else ():
            reports.append(report)
            state.complete[report.shard] = PartInfo(report.rows, report.dropped_ids)
            _log_shard(report, reports, target, started)
    except BaseException as e:
        runs[-1] = _run_record(started, "failed", reports, skipped, f"{type(e).__name__}: {e}"[:2000])
        try:
            write_manifest(cfg, manifest_for(cfg, state.complete, runs))
        except Exception:  # the run's own error is the one to raise
            logger.exception("could not record the failed run in %s", display(storage.join(cfg.output, MANIFEST)))
        raise
    runs[-1] = record = _run_record(started, "complete", reports, skipped)
    manifest = manifest_for(cfg, state.complete, runs)
    write_manifest(cfg, manifest)
    logger.info("done: %d images in %s (%d generated now at %.2f img/s, %d dropped for non-finite pixels, "
                "%d shards were already there); manifest %s", manifest["images_present"], display(cfg.output),
                record["images_generated"], record["images_per_second"] or 0.0, record["images_dropped"], skipped,
                display(storage.join(cfg.output, MANIFEST)))
    return GenerateResult(cfg.output, cfg.num_images, record["images_generated"], len(reports), skipped,
                          record["seconds"], record["images_per_second"] or 0.0, record["images_dropped"],
                          manifest, reports)


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(GenerateConfig, args.config, args.overrides)
    result = run_generate(cfg)
    m = result.manifest
    dropped = f", {m['images_dropped']} dropped for non-finite pixels" if m["images_dropped"] else ""
    print(f"generated {result.generated} new images ({m['images_present']} in the dataset{dropped}) "
          f"at {result.images_per_second:.2f} img/s -> {display(result.output)}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args, stage_parser

    p = stage_parser(sub, "generate")
    add_config_args(p)
    p.set_defaults(func=_cli)
