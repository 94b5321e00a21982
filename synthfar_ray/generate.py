"""Stage 1: a synthetic face dataset generated on a Ray Data actor pool, written as Parquet.

Data flow: shards of ids -> `map_batches(ShardGenerator, compute=ActorPoolStrategy)` where each
actor holds one diffusion pipeline, builds the prompt rows and poses of its shard (pure functions
of run seed and id), generates the images in micro-batches, and writes the shard as one Parquet
file `part-<shard>.parquet`.

Why shards own their files: a shard's file is written whole (atomic rename / single PUT) under a
name fixed by its ids, so a retried task (actor died mid-way) rewrites the same file, a re-run
skips complete shards, and the output always holds each id exactly once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from synthfar_ray import storage
from synthfar_ray.config import StageConfig, StrictModel, dump_config, load_config
from synthfar_ray.diffusion import FaceGenerator, ModelConfig, SamplerConfig, model_label
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import CORE_FIELDS, age_to_bin, ethnicity_index, gender_index
from synthfar_ray.poses import HeadPose, PoseConfig, PoseFolder, render_pose, sample_pose
from synthfar_ray.prompts import PromptConfig, render_prompt, sample_attributes

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PART_PREFIX = "part-"
# Test-only fault injection: path of a marker file; the first actor to reach it dies hard once.
FAULT_ENV = "SYNTHFAR_FAULT_CRASH_ONCE"


class ComputeConfig(StrictModel):
    num_actors: int | None = Field(None, ge=1, description="pool size; default: one per GPU, or 1 on CPU")
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float = Field(0.5, gt=0, description="fractional so read tasks still get a core on small nodes")
    batch_size: int = Field(8, ge=1, description="images per diffusion call")


class GenerateConfig(StageConfig):
    output: str = Field(description="dataset folder URI (local path, file:// or s3://)")
    num_images: int = Field(gt=0)
    seed: int = 0
    shard_size: int = Field(64, ge=1, description="images per Parquet file: the unit of resume and retry")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of ids put in split 'val'")
    jpeg_quality: int = Field(95, ge=1, le=100)
    overwrite: bool = False
    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    prompts: PromptConfig = PromptConfig()
    poses: PoseConfig = PoseConfig()
    compute: ComputeConfig = ComputeConfig()


@dataclass
class GenerateResult:
    output: str
    num_images: int
    generated: int  # images made by this run (the rest were already there)
    shards_generated: int
    shards_skipped: int
    seconds: float
    images_per_second: float
    manifest: dict[str, Any] = field(default_factory=dict)
    shard_times: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, images) per shard


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
    """Hash of everything that decides the content of a row; num_images, compute and paths excluded
    so a run may grow the dataset or move to a bigger pool and still resume."""
    parts = {k: dump_config(cfg)[k] for k in ("seed", "shard_size", "val_fraction", "jpeg_quality",
                                               "model", "sampler", "prompts", "poses")}
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
]
SYNTHETIC_SCHEMA = pa.schema(CORE_FIELDS + EXTRA_FIELDS)


def prompt_rows(cfg: GenerateConfig, ids: range) -> list[dict[str, Any]]:
    """Label and prompt fields of each id (everything but the image)."""
    rows = []
    for i in ids:
        a = sample_attributes(cfg.seed, i, cfg.prompts)
        pose = sample_pose(cfg.seed, i, cfg.poses)
        rows.append({
            "id": i, "width": cfg.sampler.width, "height": cfg.sampler.height,
            "age": float(a.age), "age_bin": int(age_to_bin(a.age)),
            "gender": gender_index(a.gender), "ethnicity": ethnicity_index(a.ethnicity),
            "source": "synthetic", "split": split_for(cfg.seed, i, cfg.val_fraction),
            "prompt": render_prompt(a, cfg.prompts), "negative_prompt": cfg.prompts.negative_prompt,
            "seed": image_seed(cfg.seed, i), "country": a.country, "name": a.name,
            "hair_length": a.hair_length, "hair_style": a.hair_style, "hair_color": a.hair_color,
            "profession": a.profession, "descriptors": ", ".join(a.descriptors),
            **{f"pose_{k}": float(v) for k, v in asdict(pose).items()},
            "pose_file": None,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The actor.

class ShardGenerator:
    """One diffusion pipeline per actor; each call generates and writes whole shards."""

    def __init__(self, cfg: GenerateConfig, crash_marker: str | None = None):
        # The config object itself, not its JSON: a JSON dump masks the storage credentials (SecretStr).
        self.cfg = cfg
        self.generator = FaceGenerator(self.cfg.model, self.cfg.sampler)
        s = self.cfg.sampler
        self.pose_folder = (PoseFolder(self.cfg.poses.folder, self.cfg.storage, s.width, s.height)
                            if self.cfg.poses.folder else None)
        self.model_label = model_label(self.cfg.model)
        self.crash_marker = crash_marker
        self.encoder = ThreadPoolExecutor(max_workers=2)  # JPEG encoding overlaps the next diffusion call

    def _control_image(self, row: dict[str, Any]) -> np.ndarray:
        s = self.cfg.sampler
        if self.pose_folder is not None:
            name, image = self.pose_folder.pick(self.cfg.seed, row["id"])
            row["pose_file"] = name
            for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y"):
                row[f"pose_{k}"] = None  # the folder image decides the pose, not the parameters
            return image
        pose = HeadPose(**{k: row[f"pose_{k}"] for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")})
        return render_pose(pose, s.width, s.height)

    def _maybe_crash(self) -> None:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            logger.error("fault injection: actor exiting mid-shard (%s)", FAULT_ENV)
            os._exit(1)

    def generate_shard(self, shard: int, start: int, stop: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        rows = prompt_rows(self.cfg, range(start, stop))
        bs = self.cfg.compute.batch_size
        pending = []
        for b in range(0, len(rows), bs):
            chunk = rows[b:b + bs]
            images = self.generator([r["prompt"] for r in chunk], [r["negative_prompt"] for r in chunk],
                                    [self._control_image(r) for r in chunk], [r["seed"] for r in chunk])
            pending.extend(self.encoder.submit(encode_jpeg, img, self.cfg.jpeg_quality) for img in images)
            self._maybe_crash()
        for r, fut in zip(rows, pending):
            r["image"] = fut.result()
            r["model"] = self.model_label
        table = pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(storage.join(self.cfg.output, part_name(shard)), buf.getvalue(), self.cfg.storage)
        return len(rows), time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "rows": [], "seconds": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            n, secs = self.generate_shard(int(shard), int(start), int(stop))
            out["shard"].append(int(shard))
            out["rows"].append(n)
            out["seconds"].append(secs)
        return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The driver.

def read_manifest(cfg: GenerateConfig) -> dict[str, Any] | None:
    uri = storage.join(cfg.output, MANIFEST)
    if not storage.exists(uri, cfg.storage):
        return None
    try:
        return json.loads(storage.read_bytes(uri, cfg.storage))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri} is not valid JSON ({e}); remove it or run with overwrite=true") from e


def write_manifest(cfg: GenerateConfig, manifest: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2).encode(), cfg.storage)


def _part_rows(cfg: GenerateConfig, name: str) -> int:
    fs, path = storage.resolve(storage.join(cfg.output, name), cfg.storage)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception as e:  # a truncated/corrupt part is regenerated, not trusted
        logger.warning("unreadable part %s (%s): it will be regenerated", name, e)
        return -1


def prepare_output(cfg: GenerateConfig) -> tuple[list[tuple[int, int, int]], int]:
    """Check the output against this config; return the shards still to generate and the count
    of complete ones. Raises before any work if the output belongs to another config."""
    fp = fingerprint(cfg)
    manifest = read_manifest(cfg)
    parts = [p for p in storage.list_files(cfg.output, cfg.storage, suffix=".parquet") if p.startswith(PART_PREFIX)]
    if cfg.overwrite and (manifest or parts):
        logger.info("overwrite=true: removing %d existing parts in %s", len(parts), cfg.output)
        for p in parts + ([MANIFEST] if manifest else []):
            storage.delete(storage.join(cfg.output, p), cfg.storage)
        manifest, parts = None, []
    if manifest is None and parts:
        raise FileExistsError(f"{cfg.output} holds {len(parts)} Parquet parts but no {MANIFEST}: it was not "
                              "made by `synthfar generate`; choose another output or set overwrite=true")
    if manifest is not None and manifest.get("fingerprint") != fp:
        raise FileExistsError(
            f"{cfg.output} was generated with a different config (fingerprint {manifest.get('fingerprint')} "
            f"!= {fp}; seed/model/sampler/prompts/poses/shard_size differ). Use another output or overwrite=true")
    wanted = shard_ranges(cfg.num_images, cfg.shard_size)
    wanted_names = {part_name(s) for s, _, _ in wanted}
    extra = [p for p in parts if p not in wanted_names]
    if extra:
        raise FileExistsError(f"{cfg.output} holds shards beyond num_images={cfg.num_images} ({extra[0]} ...): "
                              "raise num_images or set overwrite=true")
    present = set(parts)
    todo = [r for r in wanted if part_name(r[0]) not in present or _part_rows(cfg, part_name(r[0])) != r[2] - r[1]]
    return todo, len(wanted) - len(todo)


def pool_shape(cfg: GenerateConfig) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) from the config and the cluster."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = cfg.compute.gpus_per_actor if cfg.compute.gpus_per_actor is not None else (1.0 if cluster_gpus else 0.0)
    if cfg.compute.num_actors is not None:
        actors = cfg.compute.num_actors
    elif gpus > 0:
        actors = max(1, int(cluster_gpus // gpus))
    else:
        actors = 1
    return actors, gpus, cfg.compute.cpus_per_actor


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    import ray

    t0 = time.time()
    storage.ensure_dir(cfg.output, cfg.storage)
    todo, done = prepare_output(cfg)
    total = len(shard_ranges(cfg.num_images, cfg.shard_size))
    manifest = {
        "stage": "generate", "fingerprint": fingerprint(cfg), "status": "running",
        "config": dump_config(cfg), "num_images": cfg.num_images, "num_shards": total,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
    }
    write_manifest(cfg, manifest)  # claims the output for this config before any work
    generated, shard_times = 0, []
    if todo:
        if not ray.is_initialized():
            ray.init()
        actors, gpus, cpus = pool_shape(cfg)
        actors = min(actors, len(todo))
        logger.info("generating %d shards (%d images) on %d actor(s) [%s GPU, %s CPU each]; %d shards already done",
                    len(todo), sum(b - a for _, a, b in todo), actors, gpus, cpus, done)
        items = [{"shard": s, "start": a, "stop": b} for s, a, b in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardGenerator,
            fn_constructor_kwargs={"cfg": cfg, "crash_marker": os.environ.get(FAULT_ENV)},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
            num_gpus=gpus,
            num_cpus=cpus,
        )
        target = sum(b - a for _, a, b in todo)
        for row in ds.iter_rows():
            generated += int(row["rows"])
            elapsed = time.time() - t0
            shard_times.append((elapsed, int(row["rows"])))
            rate = generated / elapsed if elapsed > 0 else 0.0
            eta = (target - generated) / rate if rate > 0 else float("nan")
            logger.info("shard %d written: %d/%d images (%.2f img/s, ETA %.0f s)",
                        int(row["shard"]), generated, target, rate, eta)
    seconds = time.time() - t0
    manifest.update({
        "status": "complete", "shards_generated": len(todo), "shards_skipped": done,
        "images_generated": generated, "seconds": round(seconds, 3),
        "images_per_second": round(generated / seconds, 4) if generated else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_manifest(cfg, manifest)
    result = GenerateResult(cfg.output, cfg.num_images, generated, len(todo), done, seconds,
                            generated / seconds if generated else 0.0, manifest, shard_times)
    logger.info("done: %d images in %s (%d generated now at %.2f img/s, %d shards were already there)",
                cfg.num_images, cfg.output, generated, result.images_per_second, done)
    return result


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(GenerateConfig, args.config, args.overrides)
    result = run_generate(cfg)
    print(f"generated {result.generated} new images ({result.num_images} in total) "
          f"at {result.images_per_second:.2f} img/s -> {result.output}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import add_config_args

    p = sub.add_parser("generate", help="generate a synthetic face dataset (Ray Data actor pool)")
    add_config_args(p)
    p.set_defaults(func=_cli)
