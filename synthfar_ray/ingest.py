"""`synthfar ingest utkface|fairface SRC OUT`: real face datasets into the shared Parquet schema.

SRC is the dataset as people download it (a folder, or a .tar.gz / .zip of it); OUT is any storage
URI. The driver lists the files and parses every label first, so a bad name or CSV row stops the
run before any work starts. Ray Data then decodes and re-encodes the images in parallel and writes
Parquet; a `_manifest.json` (counts, fractions, skipped items) is written last and marks the output
complete.

Splits and percent subsets are fixed by the seed and the set of files alone (never by listing
order): files are sorted, then ranked by a seeded permutation. Subsets are nested by construction:
`split == "train" and subset <= P` selects the P % subset, and each is a superset of the smaller.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from synthfar_ray import labels as L
from synthfar_ray import storage
from synthfar_ray.images import decode_image, encode_jpeg
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
UTKFACE_FRACTIONS: dict[str, float] = {"train": 0.70, "val": 0.15, "test": 0.15}
SUBSET_PERCENTS: tuple[int, ...] = (25, 50, 75, 100)
MANIFEST_NAME = "_manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FAIRFACE_CSVS: dict[str, str] = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}
# FairFace writes its age bins as strings; "more than 70" is the last one.
FAIRFACE_AGE_BINS: dict[str, int] = {name: i for i, name in enumerate(L.AGE_BIN_NAMES)} | {"more than 70": 8}
FAIRFACE_GENDERS: dict[str, int] = {"Male": 0, "Female": 1}

# Rows written: the shared core schema plus ingest's own columns.
OUTPUT_SCHEMA = pa.schema(L.CORE_FIELDS + [
    pa.field("ethnicity7", pa.int8()),  # index into labels.FAIRFACE_RACES7; null for UTKFace
    pa.field("file", pa.string()),  # path relative to the dataset's root folder
    pa.field("subset", pa.int8()),  # smallest percent subset of train holding the row; null off train
])
_ERROR_COLUMN = "_error"  # per-row decode failure in --skip-bad mode; never written
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_([^_]+?)\.(?:jpg|jpeg|png)(?:\.chip\.jpg)?$", re.IGNORECASE)


class IngestError(ValueError):
    """Bad input (a name, a CSV row, an image); the message names the file and row."""


@dataclass
class IngestResult:
    out: str
    counts: dict[str, int]  # rows written per split
    skipped: list[dict[str, Any]]  # [{file, row, reason}]
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Item:
    """One image with its parsed labels, planned in the driver."""

    file: str  # relative to the dataset root, posix separators
    path: str  # absolute local path
    age: float | None
    age_bin: int
    gender: int
    ethnicity: int
    ethnicity7: int | None = None
    row: int | None = None  # CSV line number (header = 1), FairFace only
    official_split: str | None = None  # FairFace: "train" or "val" CSV
    id: int = -1
    split: str = ""
    subset: int | None = None


# ----------------------------------------------------------------------------------------------
# Splits and subsets (pure functions of the seed and the set of keys)


def _ranked(keys: Sequence[str], seed: int, salt: int) -> np.ndarray:
    """rank[i] = position of keys[i] in a seeded permutation of the sorted keys."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    perm = np.random.default_rng(np.random.SeedSequence([seed, salt])).permutation(len(keys))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = perm
    return rank


def _bucket(rank: np.ndarray, n: int, fractions: Sequence[float]) -> np.ndarray:
    """Bucket index per rank: bucket k holds ranks in [round(n*F_{k-1}), round(n*F_k))."""
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    return np.searchsorted(bounds, rank, side="right")


def assign_splits(keys: Sequence[str], fractions: dict[str, float], seed: int, salt: int = 0) -> list[str]:
    """A split name per key, with sizes round(n * fraction); depends only on the set of keys."""
    if len(set(keys)) != len(keys):
        raise ValueError("split keys must be unique")
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    names = list(fractions)
    idx = _bucket(_ranked(keys, seed, salt), len(keys), [fractions[k] for k in names])
    return [names[i] for i in idx]


def assign_subsets(keys: Sequence[str], seed: int) -> list[int]:
    """Smallest percent in SUBSET_PERCENTS whose subset holds each (train) key; nested by rank."""
    if not keys:
        return []
    step = 1.0 / len(SUBSET_PERCENTS)
    idx = _bucket(_ranked(keys, seed, salt=1), len(keys), [step] * len(SUBSET_PERCENTS))
    return [SUBSET_PERCENTS[i] for i in idx]


# ----------------------------------------------------------------------------------------------
# Source layouts


def utkface_file_name(age: int, gender: int, race: int, stamp: str) -> str:
    """UTKFace's file name for the labels: `age_gender_race_stamp.jpg.chip.jpg`."""
    _check_utk_labels(age, gender, race)
    if not stamp or "_" in stamp or "/" in stamp:
        raise ValueError(f"UTKFace date stamp must be non-empty without '_' or '/': {stamp!r}")
    return f"{age}_{gender}_{race}_{stamp}.jpg.chip.jpg"


def _check_utk_labels(age: int, gender: int, race: int) -> None:
    if not 0 <= age <= L.AGE_CLIP[1]:
        raise ValueError(f"age {age} outside 0..{int(L.AGE_CLIP[1])}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} not in {{0 male, 1 female}}")
    if not 0 <= race < len(L.ETHNICITIES):
        raise ValueError(f"race {race} not in 0..{len(L.ETHNICITIES) - 1}")


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """`age_gender_race_date.jpg[.chip.jpg]` -> (age, gender, race); ValueError if it does not parse."""
    m = _UTK_NAME.match(name)
    if not m:
        raise ValueError("file name does not match age_gender_race_date.jpg[.chip.jpg]")
    age, gender, race = (int(m.group(i)) for i in (1, 2, 3))
    _check_utk_labels(age, gender, race)
    return age, gender, race


def _walk_files(root: str) -> list[str]:
    """Relative posix paths of every file under root, skipping hidden files and macOS metadata."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in filenames:
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return found


def _plan_utkface(root: str, skip_bad: bool, skipped: list[dict]) -> tuple[list[_Item], dict]:
    files = _walk_files(root)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    ignored = sorted(set(files) - set(images))
    if ignored:
        logger.warning("ignoring %d non-image files under %s (e.g. %s)", len(ignored), root, ignored[0])
    # Order by file name first so that the same images nested under another folder keep ids and splits.
    images.sort(key=lambda f: (posixpath.basename(f), f))
    items = []
    for i, rel in enumerate(images):
        try:
            age, gender, race = parse_utkface_name(posixpath.basename(rel))
        except ValueError as e:
            _bad(skip_bad, skipped, rel, None, str(e))
            continue
        items.append(_Item(file=rel, path=os.path.join(root, rel), age=float(age), age_bin=int(L.age_to_bin(age)),
                           gender=gender, ethnicity=race, id=i))
    if len({posixpath.basename(it.file) for it in items}) != len(items):
        logger.warning("UTKFace file names are not unique under %s; ids and splits follow full paths", root)
    return items, {"ignored_files": len(ignored), "ignored_examples": ignored[:20]}


def _parse_fairface_row(rec: dict[str, str]) -> tuple[int, int, int, int]:
    """CSV record -> (age_bin, gender, ethnicity, ethnicity7); ValueError naming the bad field."""
    age = (rec.get("age") or "").strip()
    gender = (rec.get("gender") or "").strip()
    race = (rec.get("race") or "").strip()
    if age not in FAIRFACE_AGE_BINS:
        raise ValueError(f"unknown age bin {age!r} (expected one of {sorted(FAIRFACE_AGE_BINS)})")
    if gender not in FAIRFACE_GENDERS:
        raise ValueError(f"unknown gender {gender!r} (expected Male or Female)")
    if race not in L.FAIRFACE_RACE_TO_ETHNICITY:
        raise ValueError(f"unknown race {race!r} (expected one of {list(L.FAIRFACE_RACES7)})")
    eth = L.ethnicity_index(L.FAIRFACE_RACE_TO_ETHNICITY[race])
    return FAIRFACE_AGE_BINS[age], FAIRFACE_GENDERS[gender], eth, L.FAIRFACE_RACES7.index(race)


def _plan_fairface(root: str, skip_bad: bool, skipped: list[dict]) -> tuple[list[_Item], dict]:
    import csv

    items: list[_Item] = []
    seen: set[str] = set()
    for official, csv_name in FAIRFACE_CSVS.items():
        csv_path = os.path.join(root, csv_name)
        if not os.path.isfile(csv_path):
            raise IngestError(f"{csv_name} not found in {root}: expected FairFace's layout "
                              f"(train/, val/, {', '.join(FAIRFACE_CSVS.values())})")
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"file", "age", "gender", "race"} - set(reader.fieldnames or ())
            if missing:
                raise IngestError(f"{csv_name}: missing columns {sorted(missing)} (has {reader.fieldnames})")
            for rec in reader:
                line = reader.line_num
                rel = (rec.get("file") or "").strip().replace("\\", "/")
                where = rel or csv_name
                try:
                    if not rel or rel.startswith("/") or ".." in rel.split("/"):
                        raise ValueError(f"bad file value {rec.get('file')!r}")
                    if rel in seen:
                        raise ValueError("file listed more than once")
                    age_bin, gender, eth, eth7 = _parse_fairface_row(rec)
                    if not os.path.isfile(os.path.join(root, rel)):
                        raise ValueError("missing image file")
                except ValueError as e:
                    _bad(skip_bad, skipped, where, line, f"{csv_name} line {line}: {e}")
                    continue
                seen.add(rel)
                items.append(_Item(file=rel, path=os.path.join(root, rel), age=None, age_bin=age_bin, gender=gender,
                                   ethnicity=eth, ethnicity7=eth7, row=line, official_split=official))
    items.sort(key=lambda it: it.file)
    for i, it in enumerate(items):
        it.id = i
    unlabelled = [f for f in _walk_files(root) if f.lower().endswith(IMAGE_EXTENSIONS) and f not in seen]
    if unlabelled:
        logger.warning("%d images under %s have no CSV row and are not ingested (e.g. %s)",
                       len(unlabelled), root, unlabelled[0])
    return items, {"unlabelled_files": len(unlabelled), "unlabelled_examples": sorted(unlabelled)[:20]}


def _bad(skip_bad: bool, skipped: list[dict], file: str, row: int | None, reason: str) -> None:
    if not skip_bad:
        raise IngestError(f"{file}: {reason} (use --skip-bad to skip bad items)")
    logger.warning("skipping %s: %s", file, reason)
    skipped.append({"file": file, "row": row, "reason": reason})


# ----------------------------------------------------------------------------------------------
# Archives


def _open_source(src: str) -> tuple[str, str | None]:
    """SRC folder or archive -> (root folder, temp dir to remove or None)."""
    if os.path.isdir(src):
        return os.path.abspath(src), None
    if not os.path.isfile(src):
        raise FileNotFoundError(f"dataset source not found: {src}")
    lower = src.lower()
    tmp = tempfile.mkdtemp(prefix="synthfar-ingest-")
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(src) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and '..' itself
        elif lower.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
            with tarfile.open(src) as tf:
                tf.extractall(tmp, filter="data")  # refuses links/paths that escape tmp
        else:
            raise IngestError(f"{src}: not a folder or a .zip/.tar.gz archive")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IngestError(f"{src}: cannot extract archive: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("extracted %s to %s", src, tmp)
    return _unwrap_single_dir(tmp), tmp


def _unwrap_single_dir(root: str) -> str:
    """An archive of `UTKFace/` holds one folder: use it as the root, so names match the folder form."""
    while True:
        entries = [e for e in os.listdir(root) if not e.startswith(".") and e != "__MACOSX"]
        if len(entries) == 1 and os.path.isdir(os.path.join(root, entries[0])):
            root = os.path.join(root, entries[0])
        else:
            return root


# ----------------------------------------------------------------------------------------------
# Ray Data: decode + re-encode + write


def _decode_batch(batch: pa.Table, skip_bad: bool) -> pa.Table:
    """Raw file bytes -> re-encoded JPEG + size. Strict mode raises IngestError naming the file."""
    images, widths, heights, errors = [], [], [], []
    for file, raw in zip(batch.column("file").to_pylist(), batch.column("raw").to_pylist()):
        try:
            arr = decode_image(raw)
            images.append(encode_jpeg(arr, quality=JPEG_QUALITY))
            heights.append(arr.shape[0])
            widths.append(arr.shape[1])
            errors.append(None)
        except ValueError as e:
            if not skip_bad:
                raise IngestError(f"{file}: unreadable image: {e} (use --skip-bad to skip bad items)") from e
            images.append(b"")
            widths.append(0)
            heights.append(0)
            errors.append(f"unreadable image: {e}")
    cols = {name: batch.column(name) for name in OUTPUT_SCHEMA.names if name in batch.column_names}
    cols["image"] = pa.array(images, pa.binary())
    cols["width"] = pa.array(widths, pa.int32())
    cols["height"] = pa.array(heights, pa.int32())
    out = pa.Table.from_arrays([cols[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    if skip_bad:
        out = out.append_column(_ERROR_COLUMN, pa.array(errors, pa.string()))
    return out


def _keep_good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column(_ERROR_COLUMN))).drop_columns([_ERROR_COLUMN])


def _keep_bad(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column(_ERROR_COLUMN))).select(["file", _ERROR_COLUMN])


def _input_blocks(items: list[_Item], source: str, skip_bad: bool, skipped: list[dict],
                  chunk_rows: int) -> Iterator[pa.Table]:
    """Tables of (labels, raw bytes). The driver reads the files: SRC is local to this machine,
    so workers on other nodes could not open the paths."""
    started, done = time.monotonic(), 0
    for start in range(0, len(items), chunk_rows):
        rows: dict[str, list] = {k: [] for k in ("id", "file", "raw", "age", "age_bin", "gender", "ethnicity",
                                                 "ethnicity7", "split", "subset")}
        for it in items[start:start + chunk_rows]:
            try:
                with open(it.path, "rb") as fh:
                    raw = fh.read()
            except OSError as e:
                _bad(skip_bad, skipped, it.file, it.row, f"cannot read image file: {e}")
                continue
            for k in rows:
                rows[k].append(raw if k == "raw" else getattr(it, k))
        done += min(chunk_rows, len(items) - start)
        n = len(rows["id"])
        yield pa.table({
            "id": pa.array(rows["id"], pa.int64()),
            "file": pa.array(rows["file"], pa.string()),
            "raw": pa.array(rows["raw"], pa.binary()),
            "age": pa.array(rows["age"], pa.float32()),
            "age_bin": pa.array(rows["age_bin"], pa.int8()),
            "gender": pa.array(rows["gender"], pa.int8()),
            "ethnicity": pa.array(rows["ethnicity"], pa.int8()),
            "ethnicity7": pa.array(rows["ethnicity7"], pa.int8()),
            "source": pa.array([source] * n, pa.string()),
            "split": pa.array(rows["split"], pa.string()),
            "subset": pa.array(rows["subset"], pa.int8()),
        })
        if done % (chunk_rows * 20) == 0 or done == len(items):
            logger.info("read %d/%d files (%.0f files/s)", done, len(items), done / max(time.monotonic() - started, 1e-9))


_RAY_INGEST_ERROR = re.compile(r"(?:^|\n)(?:[\w.]+\.)?IngestError: ([^\n]*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run_ray(items: list[_Item], source: str, out_fs: pafs.FileSystem, out_path: str, skip_bad: bool,
             skipped: list[dict], chunk_rows: int = 512) -> dict[str, str]:
    """Decode/re-encode/write on Ray Data; returns {file: reason} of images that failed to decode."""
    import ray

    refs = [ray.put(t) for t in _input_blocks(items, source, skip_bad, skipped, chunk_rows) if t.num_rows]
    if not refs:
        raise IngestError("no readable images to ingest")
    ds = ray.data.from_arrow_refs(refs).map_batches(
        _decode_batch, batch_format="pyarrow", batch_size=64, fn_kwargs={"skip_bad": skip_bad})
    failed: dict[str, str] = {}
    try:
        if skip_bad:
            ds = ds.materialize()  # decode once, then read the failures and the good rows from it
            for row in ds.map_batches(_keep_bad, batch_format="pyarrow").take_all():
                failed[row["file"]] = row[_ERROR_COLUMN]
            ds = ds.map_batches(_keep_good, batch_format="pyarrow")
        ds.write_parquet(out_path, filesystem=out_fs)
    except IngestError:
        raise
    except Exception as e:
        # Ray wraps the UDF's exception in its own type; re-raise the clean message naming the file.
        m = _RAY_INGEST_ERROR.search(_ANSI.sub("", str(e)))
        if m:
            raise IngestError(m.group(1)) from e
        raise
    return failed


# ----------------------------------------------------------------------------------------------
# Output folder and manifest


def _check_out(out: str, opts: StorageOptions | None, overwrite: bool) -> tuple[pafs.FileSystem, str, list[str]]:
    """Refuse a non-empty OUT unless overwrite; returns (fs, path, old files to delete before writing)."""
    fs, path = storage.resolve(out, opts)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise FileExistsError(f"{out} is a file, not a folder")
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    if not entries:
        return fs, path, []
    if not overwrite:
        raise FileExistsError(f"{out} is not empty ({len(entries)} entries); pass --overwrite to replace it")
    ours = [e for e in entries if e.type == pafs.FileType.File
            and (e.base_name.endswith(".parquet") or e.base_name == MANIFEST_NAME)]
    others = sorted(e.base_name for e in entries if e not in ours)
    if others:
        raise FileExistsError(f"{out} holds entries that are not ingest output ({others[:5]}); "
                              "refusing to delete them even with --overwrite")
    return fs, path, [e.path for e in ours]


def _class_counts(items: list[_Item], dataset: str) -> dict[str, dict[str, dict[str, int]]]:
    """{split: {"gender"|"ethnicity"|"age_bin"[|"ethnicity7"]: {class name: n}}}, zeros included."""
    vocab = {"gender": L.GENDERS, "ethnicity": L.ETHNICITIES, "age_bin": L.AGE_BIN_NAMES}
    if dataset == "fairface":
        vocab["ethnicity7"] = L.FAIRFACE_RACES7
    result: dict[str, dict[str, dict[str, int]]] = {}
    for split in ("all",) + L.SPLITS:
        rows = [it for it in items if split in ("all", it.split)]
        result[split] = {}
        for column, names in vocab.items():
            c = Counter(getattr(it, column) for it in rows)
            result[split][column] = {name: c.get(i, 0) for i, name in enumerate(names)}
    return result


def _ingest(dataset: str, src: str, out: str, *, seed: int, val_fraction: float, skip_bad: bool,
            overwrite: bool, opts: StorageOptions | None) -> IngestResult:
    t0 = time.monotonic()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_fs, out_path, old_files = _check_out(out, opts, overwrite)
    root, tmp = _open_source(src)
    try:
        skipped: list[dict] = []
        fractions: dict[str, Any]
        if dataset == "utkface":
            items, extra = _plan_utkface(root, skip_bad, skipped)
            fractions = dict(UTKFACE_FRACTIONS)
            for it, split in zip(items, assign_splits([it.file for it in items], fractions, seed)):
                it.split = split
        else:
            items, extra = _plan_fairface(root, skip_bad, skipped)
            fractions = {"train": 1.0 - val_fraction, "val": val_fraction, "test": "official val"}
            official_train = [it for it in items if it.official_split == "train"]
            splits = assign_splits([it.file for it in official_train],
                                   {"train": 1.0 - val_fraction, "val": val_fraction}, seed)
            for it, split in zip(official_train, splits):
                it.split = split
            for it in items:
                it.split = it.split or "test"
        if not items:
            raise IngestError(f"no usable images found in {src}")
        train = [it for it in items if it.split == "train"]
        for it, subset in zip(train, assign_subsets([it.file for it in train], seed)):
            it.subset = subset
        logger.info("%s: planned %d images (%s), %d skipped so far",
                    dataset, len(items), ", ".join(f"{s} {sum(it.split == s for it in items)}" for s in L.SPLITS),
                    len(skipped))

        _ensure_ray()
        for path in old_files:  # only now that the new input has parsed
            out_fs.delete_file(path)
        if old_files:
            logger.info("--overwrite: deleted %d old files in %s", len(old_files), out)
        t_ray = time.monotonic()
        try:
            failed = _run_ray(items, dataset, out_fs, out_path, skip_bad, skipped)
        except BaseException:
            _remove_partial(out_fs, out_path)
            raise
        by_file = {it.file: it for it in items}
        for file, reason in sorted(failed.items()):
            logger.warning("skipping %s: %s", file, reason)
            skipped.append({"file": file, "row": by_file[file].row, "reason": reason})
        dropped = {s["file"] for s in skipped}
        written = [it for it in items if it.file not in dropped]
        ray_s = time.monotonic() - t_ray
        logger.info("wrote %d images to %s in %.1f s (%.1f images/s)", len(written), out, ray_s,
                    len(written) / max(ray_s, 1e-9))

        counts = {s: sum(it.split == s for it in written) for s in L.SPLITS}
        subset_counts = {str(p): sum(it.split == "train" and it.subset <= p for it in written) for p in SUBSET_PERCENTS}
        seconds = time.monotonic() - t0
        manifest = {
            "dataset": dataset,
            "source": os.path.abspath(src),
            "out": out,
            "seed": seed,
            "fractions": fractions,
            "subset_percents": list(SUBSET_PERCENTS),
            "num_rows": len(written),
            "counts": counts,
            "subset_counts": subset_counts,  # rows with split == "train" and subset <= P
            "class_counts": _class_counts(written, dataset),
            "skipped": skipped,
            **extra,
            "columns": OUTPUT_SCHEMA.names,
            "jpeg_quality": JPEG_QUALITY,
            "seconds": round(seconds, 3),
        }
        storage.write_bytes(storage.join(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode(), opts)
        return IngestResult(out=out, counts=counts, skipped=skipped, seconds=seconds, manifest=manifest)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_partial(fs: pafs.FileSystem, path: str) -> None:
    """A failed run leaves no half-written Parquet behind (OUT was empty when it started)."""
    try:
        for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
            if e.type == pafs.FileType.File:
                fs.delete_file(e.path)
    except OSError as e:  # best effort: the original error matters more
        logger.warning("could not clean up %s: %s", path, e)


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def ingest_utkface(src: str, out: str, *, seed: int = 42, skip_bad: bool = False, overwrite: bool = False,
                   storage: StorageOptions | None = None) -> IngestResult:
    """UTKFace folder/archive -> Parquet at `out`, split 70/15/15 (train/val/test) by `seed`."""
    return _ingest("utkface", src, out, seed=seed, val_fraction=0.0, skip_bad=skip_bad, overwrite=overwrite,
                   opts=storage)


def ingest_fairface(src: str, out: str, *, seed: int = 42, val_fraction: float = 0.1, skip_bad: bool = False,
                    overwrite: bool = False, storage: StorageOptions | None = None) -> IngestResult:
    """FairFace folder/zip -> Parquet at `out`: official val = test, official train split train/val."""
    return _ingest("fairface", src, out, seed=seed, val_fraction=val_fraction, skip_bad=skip_bad,
                   overwrite=overwrite, opts=storage)


# ----------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="real datasets (UTKFace, FairFace) into Parquet with fixed splits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=("utkface", "fairface"))
    p.add_argument("src", help="the dataset folder as downloaded, or its .tar.gz / .zip")
    p.add_argument("out", help="output folder URI (local path, file:// or s3://bucket/prefix)")
    p.add_argument("--seed", type=int, default=42, help="split and subset seed (default 42)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="FairFace: part of the official train split held out as val (default 0.1)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad names/rows/images and list them in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ingest output at OUT")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (MinIO, R2, ...)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    opts = StorageOptions(endpoint_url=args.s3_endpoint) if args.s3_endpoint else None
    common = {"seed": args.seed, "skip_bad": args.skip_bad, "overwrite": args.overwrite, "storage": opts}
    if args.dataset == "utkface":
        result = ingest_utkface(args.src, args.out, **common)
    else:
        result = ingest_fairface(args.src, args.out, val_fraction=args.val_fraction, **common)
    per_split = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    print(f"ingested {args.dataset}: {sum(result.counts.values())} rows ({per_split}) into {result.out} "
          f"in {result.seconds:.1f} s; skipped {len(result.skipped)}"
          + (f" (see {storage.join(result.out, MANIFEST_NAME)})" if result.skipped else ""))
    return 0
