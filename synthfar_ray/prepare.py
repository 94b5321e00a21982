"""`synthfar prepare SRC OUT --size 256`: a training-resolution copy of a dataset.

Training decodes every image every pass; a 512 px JPEG costs ~1.7 ms per core to decode, so one GPU
would need ~10 cores of decode. The copy stores each image with its short side at `size` (aspect
kept; JPEG re-encoded at `quality`; images already that small keep their bytes), so each training
image costs a small decode. Everything else is kept: every other column (width/height updated;
`keypoints` and `keypoints_real` moved into the crop's frame under `--center-crop`),
the split and subset columns, the row order and the file order (one output part per source file,
`part-<i>.parquet` in the source's file order, so its seeded permuted order survives).

Crops: a `center_crop` of a training config is in stored pixels, and the prepared copy's pixels are
not the source's. So the crop belongs to this step (`--center-crop`, in source pixels, e.g. FairFace
300 of 448: the prepared images are then square crops), and training refuses a center_crop on a
prepared set (train_data.check_dataset).

Output: `_manifest.json` (stage "prepare", source, size, quality, center_crop, the source manifest's
fingerprint when it has one, and the source manifest itself) is written first with status
"running", then each part as one atomic write, then the manifest with status "complete". A re-run
with the same settings resumes (parts present are complete by construction); a folder holding a
different dataset (another fingerprint, or Parquet without a prepare manifest) is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import posixpath
import time
from typing import Any

from pydantic import Field

from synthfar_ray import storage
from synthfar_ray.config import StageConfig, dump_config, load_config
from synthfar_ray.errors import UserError
from synthfar_ray.paths import InputPath, OutputPath, display
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STAGE = "prepare"


class PrepareError(UserError, ValueError):
    """A prepare output that would mix two datasets, or a source it cannot read."""


class PrepareConfig(StageConfig):
    source: InputPath = Field(description="dataset folder to copy (generate / ingest output)")
    output: OutputPath = Field(description="folder for the training-resolution copy")
    size: int = Field(256, ge=8, description="short side of the stored images, in pixels (>= the training "
                                             "image_size; 256 for 196 px training)")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of re-encoded images")
    center_crop: int | None = Field(None, ge=8, description="centre square crop side in SOURCE pixels, applied "
                                                            "before resizing (FairFace 448 px: 300); training on "
                                                            "the copy then uses center_crop: null")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data resize task (one task per part)")
    overwrite: bool = Field(False, description="replace an output made with other settings or from another source")


def fingerprint(cfg: PrepareConfig, source_fingerprint: str | None) -> str:
    """Hash of what decides the copy's bytes: the source (and its own fingerprint) and the settings."""
    key = {"source": cfg.source, "source_fingerprint": source_fingerprint, "size": cfg.size,
           "quality": cfg.quality, "center_crop": cfg.center_crop}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(uri: str, opts: StorageOptions) -> dict[str, Any] | None:
    """A dataset folder's `_manifest.json`, or None when it has none (or it is not JSON)."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path, opts):
        return None
    try:
        return json.loads(storage.read_bytes(path, opts))
    except ValueError:
        return None


def _check_output(cfg: PrepareConfig, fp: str) -> set[str]:
    """Names of the parts already written by this same preparation; refuses another dataset's folder."""
    where = display(cfg.output)
    manifest = read_manifest(cfg.output, cfg.storage)
    parts = [p for p in storage.list_files(cfg.output, cfg.storage, suffix=".parquet") if p.startswith("part-")]
    others = [p for p in storage.list_files(cfg.output, cfg.storage) if p not in parts and p != MANIFEST
              and not storage.is_temp_name(p)]
    ours = manifest is not None and manifest.get("stage") == STAGE and manifest.get("fingerprint") == fp
    if ours:
        return set(parts)
    if not (manifest or parts or others):
        return set()
    if not cfg.overwrite:
        what = (f"a prepare output of {manifest.get('source')} (size {manifest.get('size')})"
                if manifest and manifest.get("stage") == STAGE else
                f"another dataset ({len(parts) + len(others)} files{', manifest stage ' + repr(manifest.get('stage')) if manifest else ''})")
        raise PrepareError(f"{where} holds {what}, not this preparation of {display(cfg.source)} "
                           f"(size {cfg.size}); choose another output or set overwrite=true")
    if others:
        raise PrepareError(f"{where} holds files that are not prepare output ({others[:5]}); "
                           "refusing to delete them even with overwrite=true")
    for p in parts + ([MANIFEST] if manifest else []):
        storage.delete(storage.join(cfg.output, p), cfg.storage)
    return set()


def _cropped_keypoints(values: list[float], data: bytes, crop: int, column: str = "keypoints") -> list[float]:
    """A row's `keypoints` or `keypoints_real` (keypoints.py) in the frame of its image's centre crop
    of side `crop`."""
    import numpy as np
    from PIL import Image

    from synthfar_ray.keypoints import cropped, to_column

    with Image.open(io.BytesIO(data)) as probe:
        w, h = probe.size
    return to_column(cropped(np.asarray(values, dtype=np.float64).reshape(-1, 2), w, h, crop), column)


def prepare_part(row: dict[str, Any], cfg: PrepareConfig) -> dict[str, Any]:
    """Ray Data task: one source file -> one output part (one atomic write). Returns its counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthfar_ray.images import encode_jpeg
    from synthfar_ray.transforms import resize_short_side

    fs, _ = storage.resolve(cfg.source, cfg.storage)
    table = pq.read_table(row["src"], filesystem=fs)
    images, widths, heights, resized = [], [], [], 0
    # Keypoints live in the frame of the image's centre square: a crop changes that frame.
    points = {c: table.column(c).to_pylist() for c in ("keypoints", "keypoints_real")
              if cfg.center_crop is not None and c in table.column_names}
    for i, data in enumerate(table.column("image").to_pylist()):
        try:
            img = resize_short_side(data, cfg.size, cfg.center_crop)
        except ValueError as e:
            raise PrepareError(f"{row['src']} row {i} (column `image`): {e}") from None
        for column, values in points.items():
            if values[i] is not None:
                try:
                    values[i] = _cropped_keypoints(values[i], data, cfg.center_crop, column)
                except ValueError as e:
                    raise PrepareError(f"{row['src']} row {i} (column `{column}`): {e}") from None
        if img is None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        else:
            data, (w, h) = encode_jpeg(img, quality=cfg.quality), img.size
            resized += 1
        images.append(data)
        widths.append(w)
        heights.append(h)
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"),
                             pa.array(images, table.schema.field("image").type))
    for column, values in points.items():
        idx = table.schema.get_field_index(column)
        table = table.set_column(idx, table.schema.field(idx), pa.array(values, table.schema.field(idx).type))
    for name, values in (("width", widths), ("height", heights)):
        if name in table.column_names:
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, table.schema.field(name),
                                     pa.array(np.asarray(values), table.schema.field(name).type))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(cfg.output, row["name"]), buf.getvalue().to_pybytes(), cfg.storage)
    return {"name": row["name"], "rows": table.num_rows, "resized": resized}


def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write (or finish) the training-resolution copy; returns its manifest."""
    import ray

    from synthfar_ray.raycluster import ensure_ray

    t0 = time.monotonic()
    try:
        _, files, base = storage.parquet_files(cfg.source, cfg.storage)
    except storage.StorageError as e:
        raise PrepareError(f"source: {e}") from None
    source_manifest = read_manifest(cfg.source, cfg.storage)
    if source_manifest and source_manifest.get("stage") == STAGE and cfg.center_crop:
        raise PrepareError(f"{display(cfg.source)} is itself a prepared copy: crop its source instead")
    source_fp = (source_manifest or {}).get("fingerprint")
    fp = fingerprint(cfg, source_fp)
    done = _check_output(cfg, fp)
    names = [f"part-{i:06d}.parquet" for i in range(len(files))]
    manifest: dict[str, Any] = {
        "stage": STAGE, "fingerprint": fp, "status": "running", "source": cfg.source,
        "source_fingerprint": source_fp, "size": cfg.size, "quality": cfg.quality, "center_crop": cfg.center_crop,
        "images": f"short side {cfg.size} px, aspect kept" if cfg.center_crop is None else
                  f"centre {cfg.center_crop} px square of the source, resized to {cfg.size} px",
        "parts": {n: posixpath.relpath(f, base) for n, f in zip(names, files)},
        "config": dump_config(cfg), "source_manifest": source_manifest,
    }
    storage.write_bytes(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2).encode(), cfg.storage)
    todo = [{"src": f, "name": n} for f, n in zip(files, names) if n not in done]
    logger.info("prepare %s -> %s: %d parts (%d already written), short side %d px",
                display(cfg.source), display(cfg.output), len(files), len(files) - len(todo), cfg.size)
    results: list[dict[str, Any]] = []
    if todo:
        ensure_ray()
        results = ray.data.from_items(todo).map(prepare_part, fn_kwargs={"cfg": cfg}, num_cpus=cfg.num_cpus).take_all()
    fs, _ = storage.resolve(cfg.output, cfg.storage)
    rows = sum(pq_rows(fs, storage.resolve(storage.join(cfg.output, n), cfg.storage)[1]) for n in names)
    manifest.update(status="complete", num_rows=rows, parts_written_now=len(results),
                    images_resized_now=sum(r["resized"] for r in results), seconds=round(time.monotonic() - t0, 3))
    storage.write_bytes(storage.join(cfg.output, MANIFEST), json.dumps(manifest, indent=2).encode(), cfg.storage)
    logger.info("prepared %d rows in %s (%.1f s)", rows, display(cfg.output), manifest["seconds"])
    return manifest


def pq_rows(fs, path: str) -> int:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def prepared_manifest(uri: str, opts: StorageOptions) -> dict[str, Any] | None:
    """The manifest of a dataset folder when `synthfar prepare` made it, else None."""
    manifest = read_manifest(uri, opts)
    return manifest if manifest and manifest.get("stage") == STAGE else None


def _cli(args: argparse.Namespace) -> int:
    overrides = [f"source={args.source}", f"output={args.output}", *args.overrides]
    for flag in ("size", "quality", "center_crop"):
        if getattr(args, flag) is not None:
            overrides.append(f"{flag}={getattr(args, flag)}")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_config(PrepareConfig, args.config, overrides)
    m = run_prepare(cfg)
    print(f"prepared {m['num_rows']} rows of {cfg.source} at short side {cfg.size} px -> {cfg.output} "
          f"({m['parts_written_now']} parts written now, {m['seconds']:.1f} s)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import stage_parser

    p = stage_parser(sub, "prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="dataset folder (local path, file:// or s3://)")
    p.add_argument("output", help="output folder")
    p.add_argument("--size", type=int, help="short side in pixels (default 256)")
    p.add_argument("--quality", type=int, help="JPEG quality (default 90)")
    p.add_argument("--center-crop", dest="center_crop", type=int, help="centre square crop in source pixels first")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--config", help="a PrepareConfig YAML (the arguments override it)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (storage.endpoint_url=...)")
    p.set_defaults(func=_cli)
