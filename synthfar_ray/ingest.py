"""`synthfar ingest utkface|fairface SRC OUT`: real face datasets into the shared Parquet schema.

SRC is the dataset as people download it (a folder, or a .tar.gz / .zip of it); OUT is any storage
URI. The driver lists the files and parses every label first; Ray Data then decodes and re-encodes
the images in parallel. Every bad item (a name or CSV row that does not parse, an unknown label, a
duplicated CSV row, a missing or unreadable image) is collected: strict mode reports them all in one
error before anything is written, `skip_bad` leaves them out and lists them in `_manifest.json`. The
Parquet is written next and the manifest (counts of exactly the rows written, skipped items) last;
it marks the output complete.

Landmarks (optional): a `landmarks.csv` in SRC's root folder gives a sparse landmark set per image
(keypoints.REAL_KEYPOINT_NAMES, e.g. what the stand-ins' "annotators" mark). Header `file` then
`<point>_x,<point>_y` for each point in that order; one row per image: its path as the dataset names it
(UTKFace: the file name; FairFace: `train/1.jpg`), then x, y in pixels of the image as stored
(continuous: the top-left corner of the image is 0,0 and pixel i covers [i, i+1)); both cells empty
for a point the annotator did not mark. The rows become the `keypoints_real` column (keypoints.py's
frame, NaN unmarked, null for an image without a row). A bad row (field count, a number, half a
point, a duplicate, a file that does not exist) is a bad item like a bad label, named by file and
CSV line; the image it names is skipped with it under skip_bad. Without the file, the output is as
before (no column).

Splits and percent subsets are fixed by the seed and the set of files alone (never by listing
order): files are sorted, then ranked by a seeded permutation. Subsets are nested by construction:
`split == "train" and subset <= P` selects the P % subset, and each is a superset of the smaller.
Rows are written in another seeded permutation, spread over several files: in file-name order
UTKFace would be sorted by age, which no training shuffle buffer undoes.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
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
from synthfar_ray.errors import UserError
from synthfar_ray.images import decode_image, encode_jpeg
from synthfar_ray.paths import absolute_location, absolute_output
from synthfar_ray.raycluster import check_request, ensure_ray
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
# Only where SRC has a landmark file (LANDMARKS_CSV): the sparse real keypoints, keypoints.py's layout.
KEYPOINTS_REAL_FIELD = pa.field("keypoints_real", pa.list_(pa.float32()))
LANDMARKS_CSV = "landmarks.csv"
_LANDMARKS_PX = "_landmarks_px"  # a block's landmark pixels, until decode knows the image size; never written
_ERROR_COLUMN = "_error"  # per-row read/decode failure; never written
# Rows per Parquet file: at most MAX_ROWS_PER_FILE, and at least MIN_FILES files where there are rows
# enough, so Ray Data's file-level shuffle has files to shuffle even for a small dataset.
MAX_ROWS_PER_FILE = 512
MIN_FILES = 8
MAX_LISTED_BAD = 20  # bad items a strict-mode error lists before "and N more"
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_([^_]+?)\.(?:jpg|jpeg|png)(?:\.chip\.jpg)?$", re.IGNORECASE)


class IngestError(UserError, ValueError):
    """Bad input (names, CSV rows, images, locations); the message names each file and row."""


@dataclass
class IngestResult:
    out: str
    counts: dict[str, int]  # rows written per split
    skipped: list[dict[str, Any]]  # [{file, row, reason}]; never a file that was written
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
    csv: str | None = None  # the CSV naming the file, FairFace only
    official_split: str | None = None  # FairFace: "train" or "val" CSV
    landmarks: list[float] | None = None  # landmarks.csv's x, y pixels (NaN unmarked), when it has a row
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


def write_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of `keys` in the order rows are written: a seeded permutation of the set of keys,
    independent of the splits' and subsets' permutations (another salt)."""
    return np.argsort(_ranked(keys, seed, salt=2), kind="stable").tolist()


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


def _bad_item(file: str, row: int | None, reason: str) -> dict[str, Any]:
    """One bad item as the manifest lists it: `file` is the image, or the CSV for a row naming none."""
    return {"file": file, "row": row, "reason": reason}


def _plan_utkface(root: str) -> tuple[list[_Item], list[dict], dict]:
    """(items, bad names, manifest extras) of a UTKFace folder."""
    files = _walk_files(root)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    ignored = sorted(set(files) - set(images) - {LANDMARKS_CSV})
    if ignored:
        logger.warning("ignoring %d non-image files under %s (e.g. %s)", len(ignored), root, ignored[0])
    # Order by file name first so that the same images nested under another folder keep ids and splits.
    images.sort(key=lambda f: (posixpath.basename(f), f))
    items, bad = [], []
    for i, rel in enumerate(images):
        try:
            age, gender, race = parse_utkface_name(posixpath.basename(rel))
        except ValueError as e:
            bad.append(_bad_item(rel, None, str(e)))
            continue
        items.append(_Item(file=rel, path=os.path.join(root, rel), age=float(age), age_bin=int(L.age_to_bin(age)),
                           gender=gender, ethnicity=race, id=i))
    if len({posixpath.basename(it.file) for it in items}) != len(items):
        logger.warning("UTKFace file names are not unique under %s; ids and splits follow full paths", root)
    return items, bad, {"ignored_files": len(ignored), "ignored_examples": ignored[:20]}


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


def _plan_fairface(root: str) -> tuple[list[_Item], list[dict], dict]:
    """(items, bad rows, manifest extras) of a FairFace folder.

    A file's first CSV row decides it (kept if good, skipped with that row's reason if bad); every
    later row naming the same file is a bad row of its own, listed under the CSV, so the manifest never
    lists an ingested file as skipped and never counts a file twice."""
    items: list[_Item] = []
    bad: list[dict] = []
    first_row: dict[str, tuple[str, int]] = {}  # file -> (CSV, line) of the row that decides it
    for official, csv_name in FAIRFACE_CSVS.items():
        for line, rec in _read_fairface_csv(root, csv_name):
            rel = (rec.get("file") or "").strip().replace("\\", "/")
            where = f"{csv_name} line {line}"
            if rel in first_row:
                first_csv, first_line = first_row[rel]
                at = f"line {first_line}" if first_csv == csv_name else f"{first_csv} line {first_line}"
                bad.append(_bad_item(csv_name, line, f"{where}: duplicate row for {rel} (first at {at})"))
                continue
            try:
                if not rel or rel.startswith("/") or ".." in rel.split("/"):
                    raise ValueError(f"bad file value {rec.get('file')!r}")
                first_row[rel] = (csv_name, line)
                age_bin, gender, eth, eth7 = _parse_fairface_row(rec)
                if not os.path.isfile(os.path.join(root, rel)):
                    raise ValueError("missing image file")
            except ValueError as e:
                bad.append(_bad_item(rel or csv_name, line, f"{where}: {e}"))
                continue
            items.append(_Item(file=rel, path=os.path.join(root, rel), age=None, age_bin=age_bin, gender=gender,
                               ethnicity=eth, ethnicity7=eth7, row=line, csv=csv_name, official_split=official))
    items.sort(key=lambda it: it.file)
    for i, it in enumerate(items):
        it.id = i
    unlabelled = [f for f in _walk_files(root) if f.lower().endswith(IMAGE_EXTENSIONS) and f not in first_row]
    if unlabelled:
        logger.warning("%d images under %s have no CSV row and are not ingested (e.g. %s)",
                       len(unlabelled), root, unlabelled[0])
    return items, bad, {"unlabelled_files": len(unlabelled), "unlabelled_examples": sorted(unlabelled)[:20]}


def _read_fairface_csv(root: str, csv_name: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, record) of one FairFace label CSV; a missing CSV or column stops the run."""
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
            yield reader.line_num, rec


def output_schema(landmarks: bool) -> pa.Schema:
    """The rows' schema: OUTPUT_SCHEMA, plus `keypoints_real` where SRC has a landmark file."""
    return OUTPUT_SCHEMA.append(KEYPOINTS_REAL_FIELD) if landmarks else OUTPUT_SCHEMA


def landmark_header() -> list[str]:
    """landmarks.csv's header: `file`, then x and y of each keypoints.REAL_KEYPOINT_NAMES point."""
    from synthfar_ray.keypoints import REAL_KEYPOINT_NAMES

    return ["file"] + [f"{name}_{axis}" for name in REAL_KEYPOINT_NAMES for axis in "xy"]


def parse_landmark_row(fields: list[str]) -> list[float]:
    """A landmark row's cells after `file` -> x, y pixels per point (NaN for a point left empty);
    ValueError naming the bad cell."""
    header = landmark_header()[1:]
    if len(fields) != len(header):
        raise ValueError(f"{len(fields) + 1} fields, expected {len(header) + 1} ({', '.join(landmark_header())})")
    values: list[float] = []
    for i in range(0, len(fields), 2):
        x, y = fields[i].strip(), fields[i + 1].strip()
        if not x and not y:
            values += [math.nan, math.nan]  # the annotator did not mark this point
            continue
        if not x or not y:
            raise ValueError(f"{header[i][:-2]} has only one coordinate (x {x!r}, y {y!r}); give both or neither")
        for name, text in ((header[i], x), (header[i + 1], y)):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name} {text!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{name} {text!r} is not a finite number")
            values.append(value)
    return values


def _attach_landmarks(root: str, items: list[_Item], bad: list[dict]) -> tuple[list[_Item], dict]:
    """Read SRC's landmark file, if any, into the items it names. Returns (the items, without those
    a bad landmark row names, manifest extras); bad rows go to `bad`. Without the file: unchanged."""
    path = os.path.join(root, LANDMARKS_CSV)
    if not os.path.isfile(path):
        return items, {}
    by_file = {it.file: it for it in items}
    first_line: dict[str, int] = {}
    rejected: set[str] = set()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if header != landmark_header():
            raise IngestError(f"{LANDMARKS_CSV}: header {header} is not {landmark_header()} (pixels of "
                              "keypoints.REAL_KEYPOINT_NAMES; see `synthfar ingest --help`)")
        for fields in reader:
            rel = (fields[0] if fields else "").strip().replace("\\", "/")
            where = f"{LANDMARKS_CSV} line {reader.line_num}"
            try:
                if rel in first_line:
                    raise ValueError(f"duplicate row for {rel} (first at line {first_line[rel]})")
                first_line[rel] = reader.line_num
                if not rel or rel.startswith("/") or ".." in rel.split("/"):
                    raise ValueError(f"bad file value {rel!r}")
                values = parse_landmark_row(fields[1:])
                if rel not in by_file and not os.path.isfile(os.path.join(root, rel)):
                    raise ValueError(f"no image {rel!r} in the dataset")
            except ValueError as e:
                bad.append(_bad_item(rel or LANDMARKS_CSV, reader.line_num, f"{where}: {e}"))
                if rel in by_file and first_line.get(rel) == reader.line_num:
                    rejected.add(rel)  # its own (first) row is bad: skipped like an image with a bad label
                continue
            if rel in by_file:  # else an image that is itself a bad item (name or label)
                by_file[rel].landmarks = values
    kept = [it for it in items if it.file not in rejected]
    marked = sum(it.landmarks is not None for it in kept)
    if marked < len(kept):
        logger.warning("%s: %d of %d images have no landmark row (keypoints_real null)", LANDMARKS_CSV,
                       len(kept) - marked, len(kept))
    return kept, {"landmarks": {"file": LANDMARKS_CSV, "rows": marked}}


def _describe(bad: dict[str, Any]) -> str:
    """`FILE: reason`, without repeating the file where the reason starts with it (a CSV row)."""
    reason = bad["reason"]
    return reason if reason.startswith(bad["file"] + " ") else f"{bad['file']}: {reason}"


def _first_bad(bad: list[dict]) -> str:
    return f" ({len(bad)} bad items, e.g. {_describe(bad[0])})" if bad else ""


def _bad_items_error(bad: list[dict], src: str) -> IngestError:
    """One error listing every bad item (up to MAX_LISTED_BAD), so one run finds them all."""
    lines = [_describe(b) for b in bad[:MAX_LISTED_BAD]]
    if len(bad) > MAX_LISTED_BAD:
        lines.append(f"and {len(bad) - MAX_LISTED_BAD} more")
    return IngestError(f"{len(bad)} bad item(s) in {src}; nothing was written (use --skip-bad to skip them "
                       "and list them in the manifest):\n  " + "\n  ".join(lines))


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


def _decode_batch(batch: pa.Table, schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Raw file bytes -> re-encoded JPEG + size (and landmark pixels -> `keypoints_real`). A failure
    goes into `_error` instead of raising, so one run finds every bad image (strict mode then reports
    them all at once)."""
    images, widths, heights, errors = [], [], [], []
    for raw, error in zip(batch.column("raw").to_pylist(), batch.column(_ERROR_COLUMN).to_pylist()):
        image, height, width = b"", 0, 0
        if error is None:  # not already failed when the driver read the file
            try:
                arr = decode_image(raw)
                image, height, width = encode_jpeg(arr, quality=JPEG_QUALITY), arr.shape[0], arr.shape[1]
            except ValueError as e:
                error = f"unreadable image: {e}"
        images.append(image)
        heights.append(height)
        widths.append(width)
        errors.append(error)
    cols = {name: batch.column(name) for name in schema.names if name in batch.column_names}
    cols["image"] = pa.array(images, pa.binary())
    cols["width"] = pa.array(widths, pa.int32())
    cols["height"] = pa.array(heights, pa.int32())
    if KEYPOINTS_REAL_FIELD.name in schema.names:
        pixels = batch.column(_LANDMARKS_PX).to_pylist()
        cols[KEYPOINTS_REAL_FIELD.name] = pa.array(
            [_landmark_frame(px, w, h) for px, w, h in zip(pixels, widths, heights)], KEYPOINTS_REAL_FIELD.type)
    out = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    return out.append_column(_ERROR_COLUMN, pa.array(errors, pa.string()))


def _landmark_frame(pixels: list[float] | None, width: int, height: int) -> list[float] | None:
    """A landmark row's pixels -> keypoints.py's frame (fractions of the centre square's side)."""
    from synthfar_ray.keypoints import square_frame, to_column

    if pixels is None or not width:  # no row, or an image that failed (its row is dropped)
        return None
    return to_column(square_frame(np.asarray(pixels, dtype=np.float64).reshape(-1, 2), width, height), "keypoints_real")


def _keep_good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column(_ERROR_COLUMN))).drop_columns([_ERROR_COLUMN])


def _keep_bad(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch.column(_ERROR_COLUMN))).select(["id", _ERROR_COLUMN])


def rows_per_file(n: int) -> int:
    """Rows per Parquet file for n rows: MAX_ROWS_PER_FILE, or fewer to make at least MIN_FILES files."""
    return max(1, min(MAX_ROWS_PER_FILE, math.ceil(n / MIN_FILES)))


def _read_raw(path: str) -> tuple[bytes, str | None]:
    """(bytes, None), or (b"", reason) for a file that cannot be read: reported with the decode failures."""
    try:
        with open(path, "rb") as fh:
            return fh.read(), None
    except OSError as e:
        return b"", f"cannot read image file: {e}"


def _input_blocks(items: list[_Item], source: str, block_rows: int, landmarks: bool = False) -> Iterator[pa.Table]:
    """Tables of (labels, raw bytes, read error) in `items` order, `block_rows` rows each: one block
    becomes one Parquet file. The driver reads the files: SRC is local to this machine, so workers on
    other nodes could not open the paths."""
    started = time.monotonic()
    for start in range(0, len(items), block_rows):
        chunk = items[start:start + block_rows]
        raws, errors = zip(*(_read_raw(it.path) for it in chunk))
        extra = {_LANDMARKS_PX: pa.array([it.landmarks for it in chunk], pa.list_(pa.float64()))} if landmarks else {}
        yield pa.table({
            "id": pa.array([it.id for it in chunk], pa.int64()),
            "file": pa.array([it.file for it in chunk], pa.string()),
            "raw": pa.array(raws, pa.binary()),
            "age": pa.array([it.age for it in chunk], pa.float32()),
            "age_bin": pa.array([it.age_bin for it in chunk], pa.int8()),
            "gender": pa.array([it.gender for it in chunk], pa.int8()),
            "ethnicity": pa.array([it.ethnicity for it in chunk], pa.int8()),
            "ethnicity7": pa.array([it.ethnicity7 for it in chunk], pa.int8()),
            "source": pa.array([source] * len(chunk), pa.string()),
            "split": pa.array([it.split for it in chunk], pa.string()),
            "subset": pa.array([it.subset for it in chunk], pa.int8()),
            **extra,
            _ERROR_COLUMN: pa.array(errors, pa.string()),
        })
        done = start + len(chunk)
        if done % (block_rows * 20) == 0 or done == len(items):
            rate = done / max(time.monotonic() - started, 1e-9)
            logger.info("read %d/%d files (%.0f files/s)", done, len(items), rate)


def _decode_on_ray(items: list[_Item], source: str, schema: pa.Schema = OUTPUT_SCHEMA) -> tuple[Any, dict[int, str]]:
    """Decode/re-encode every item on Ray Data, in `items` order and blocks of `rows_per_file` rows.
    Returns (the materialized dataset, {id: reason} of the items that could not be read or decoded);
    materialized so the failures and the good rows come from one decode."""
    import ray

    check_request("ingest: each decode task", {"CPU": 1})  # map_batches' default
    landmarks = KEYPOINTS_REAL_FIELD.name in schema.names
    refs = [ray.put(t) for t in _input_blocks(items, source, rows_per_file(len(items)), landmarks)]
    # batch_size=None: one batch per block, so the blocks (and the files they become) stay as made here.
    decoded = ray.data.from_arrow_refs(refs).map_batches(_decode_batch, batch_format="pyarrow", batch_size=None,
                                                         fn_kwargs={"schema": schema}).materialize()
    failed = decoded.map_batches(_keep_bad, batch_format="pyarrow", batch_size=None).take_all()
    return decoded, {row["id"]: row[_ERROR_COLUMN] for row in failed}


def _image_failures(items: list[_Item], failed: dict[int, str]) -> list[dict]:
    """Bad-item records of the images that failed, in file order, with the CSV line for FairFace."""
    bad = []
    for it in sorted((it for it in items if it.id in failed), key=lambda it: it.file):
        reason = failed[it.id] if it.csv is None else f"{it.csv} line {it.row}: {failed[it.id]}"
        bad.append(_bad_item(it.file, it.row, reason))
    return bad


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


def _plan(dataset: str, root: str, seed: int, val_fraction: float) -> tuple[list[_Item], list[dict], dict, dict]:
    """(items with splits and subsets, bad items, split fractions, manifest extras) of a dataset folder."""
    fractions: dict[str, Any]
    items, bad, extra = (_plan_utkface if dataset == "utkface" else _plan_fairface)(root)
    items, landmarks = _attach_landmarks(root, items, bad)  # before splits: a rejected image takes no place
    extra.update(landmarks)
    if dataset == "utkface":
        fractions = dict(UTKFACE_FRACTIONS)
        for it, split in zip(items, assign_splits([it.file for it in items], fractions, seed)):
            it.split = split
    else:
        fractions = {"train": 1.0 - val_fraction, "val": val_fraction, "test": "official val"}
        official_train = [it for it in items if it.official_split == "train"]
        splits = assign_splits([it.file for it in official_train],
                               {"train": 1.0 - val_fraction, "val": val_fraction}, seed)
        for it, split in zip(official_train, splits):
            it.split = split
        for it in items:
            it.split = it.split or "test"
    train = [it for it in items if it.split == "train"]
    for it, subset in zip(train, assign_subsets([it.file for it in train], seed)):
        it.subset = subset
    return items, bad, fractions, extra


def _ingest(dataset: str, src: str, out: str, *, seed: int, val_fraction: float, skip_bad: bool,
            overwrite: bool, opts: StorageOptions | None) -> IngestResult:
    t0 = time.monotonic()
    if not 0.0 <= val_fraction < 1.0:
        raise IngestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_fs, out_path, old_files = _check_out(out, opts, overwrite)
    logger.info("ingest %s: %s -> %s", dataset, src, out)
    root, tmp = _open_source(src)
    try:
        items, bad, fractions, extra = _plan(dataset, root, seed, val_fraction)
        if not items:
            if bad and not skip_bad:
                raise _bad_items_error(bad, src)
            raise IngestError(f"no usable images found in {src}{_first_bad(bad)}")
        logger.info("%s: planned %d images (%s), %d bad so far",
                    dataset, len(items), ", ".join(f"{s} {sum(it.split == s for it in items)}" for s in L.SPLITS),
                    len(bad))

        ensure_ray()
        t_ray = time.monotonic()
        schema = output_schema("landmarks" in extra)
        decoded, failed = _decode_on_ray([items[i] for i in write_order([it.file for it in items], seed)], dataset,
                                         schema)
        bad += _image_failures(items, failed)
        if bad and not skip_bad:
            raise _bad_items_error(bad, src)  # before anything is deleted or written
        for b in bad:
            logger.warning("skipping %s", _describe(b))
        written = [it for it in items if it.id not in failed]
        if not written:
            raise IngestError(f"no readable images in {src}{_first_bad(bad)}")

        _replace_output(decoded, out_fs, out_path, old_files)
        ray_s = time.monotonic() - t_ray
        logger.info("wrote %d images to %s in %.1f s (%.1f images/s)", len(written), out, ray_s,
                    len(written) / max(ray_s, 1e-9))

        manifest = _manifest(dataset, src, out, seed, fractions, written, bad, extra, time.monotonic() - t0)
        storage.write_bytes(storage.join(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode(), opts)
        return IngestResult(out=out, counts=manifest["counts"], skipped=bad, seconds=manifest["seconds"],
                            manifest=manifest)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _manifest(dataset: str, src: str, out: str, seed: int, fractions: dict[str, Any], written: list[_Item],
              skipped: list[dict], extra: dict, seconds: float) -> dict[str, Any]:
    """The manifest: every count is of `written`, exactly the rows in the Parquet."""
    return {
        "dataset": dataset,
        "source": src,
        "out": out,
        "seed": seed,
        "fractions": fractions,
        "subset_percents": list(SUBSET_PERCENTS),
        "num_rows": len(written),
        "counts": {s: sum(it.split == s for it in written) for s in L.SPLITS},
        # rows with split == "train" and subset <= P
        "subset_counts": {str(p): sum(it.split == "train" and it.subset <= p for it in written)
                          for p in SUBSET_PERCENTS},
        "class_counts": _class_counts(written, dataset),
        "row_order": "seeded permutation of the files (ingest.write_order), not file-name order",
        "skipped": skipped,
        **extra,
        "columns": output_schema("landmarks" in extra).names,
        "jpeg_quality": JPEG_QUALITY,
        "seconds": round(seconds, 3),
    }


def _replace_output(decoded: Any, fs: pafs.FileSystem, path: str, old_files: list[str]) -> None:
    """Delete the old ingest output (--overwrite) and write the decoded dataset's good rows, one file
    per block. Runs only once the whole input has been read, so a bad input never costs the old output."""
    for old in old_files:
        fs.delete_file(old)
    if old_files:
        logger.info("--overwrite: deleted %d old files in %s", len(old_files), path)
    try:
        decoded.map_batches(_keep_good, batch_format="pyarrow", batch_size=None).write_parquet(path, filesystem=fs)
    except BaseException:
        _remove_partial(fs, path)
        raise


def _remove_partial(fs: pafs.FileSystem, path: str) -> None:
    """A failed write leaves no half-written Parquet behind (OUT was empty, or emptied, before it)."""
    try:
        for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
            if e.type == pafs.FileType.File:
                fs.delete_file(e.path)
    except OSError as e:  # best effort: the original error matters more
        logger.warning("could not clean up %s: %s", path, e)


def _absolute(src: str, out: str) -> tuple[str, str]:
    """SRC and OUT made absolute on the driver, before anything is shipped to Ray tasks (whose working
    directory is not the driver's); a relative OUT inside a `ray job submit` job is refused."""
    try:
        return absolute_location(src), absolute_output(out)
    except ValueError as e:
        raise IngestError(str(e)) from e


def ingest_utkface(src: str, out: str, *, seed: int = 42, skip_bad: bool = False, overwrite: bool = False,
                   storage: StorageOptions | None = None) -> IngestResult:
    """UTKFace folder/archive -> Parquet at `out`, split 70/15/15 (train/val/test) by `seed`."""
    return _ingest("utkface", *_absolute(src, out), seed=seed, val_fraction=0.0, skip_bad=skip_bad,
                   overwrite=overwrite, opts=storage)


def ingest_fairface(src: str, out: str, *, seed: int = 42, val_fraction: float = 0.1, skip_bad: bool = False,
                    overwrite: bool = False, storage: StorageOptions | None = None) -> IngestResult:
    """FairFace folder/zip -> Parquet at `out`: official val = test, official train split train/val."""
    return _ingest("fairface", *_absolute(src, out), seed=seed, val_fraction=val_fraction, skip_bad=skip_bad,
                   overwrite=overwrite, opts=storage)


# ----------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import stage_parser

    p = stage_parser(subparsers, "ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
