"""Procedural stand-ins for the real datasets, written in UTKFace's and FairFace's file layouts.

The demo (and the tests) have no real faces: `synthfar pipeline` renders a "real" set with the
procedural face renderer (faces.py) in `style: photo` WITHOUT label noise, and writes it as the
files the real datasets ship as, so the real `synthfar ingest` reads them:
- UTKFace: `age_gender_race_stamp.jpg.chip.jpg` files in one folder;
- FairFace: `train/`, `val/` folders and `fairface_label_{train,val}.csv` with FairFace's label
  strings (age bins such as "20-29", Male/Female, the 7 races). Rendered with `races7`
  (pipeline `standin.races7: true`), the race written is the one the face shows (render_race7);
  without it the 5-class face carries no 7-race cue and the id picks one of the class's races.

The rendered set is split between the layouts written by id (id % number of layouts: with both,
even ids UTKFace and odd ids FairFace), so two stand-ins never share an image: training on one and
testing on the other does not leak.
Every folder holds a README.txt that says these are procedural stand-ins, not faces.

With `landmarks` (pipeline `standin.landmarks: true`) each layout also gets a `landmarks.csv`
(ingest.py's format): the real set's sparse points (keypoints.REAL_KEYPOINT_NAMES) where the
renderer drew the features they are defined on (faces.render_real_keypoints), in pixels: a sparse
set annotated by another convention than the synthetic rows' dense keypoints.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow.parquet as pq

from synthfar_ray import labels as L
from synthfar_ray import storage

if TYPE_CHECKING:
    from synthfar_ray.generate import GenerateConfig

Layout = Literal["utkface", "fairface"]
LAYOUTS: tuple[str, ...] = ("utkface", "fairface")
FAIRFACE_VAL_SHARE = 0.125  # FairFace ships about 1/8 of its images as the official val set
NOTICE = ("STAND-IN, NOT REAL FACES: procedural faces (synthfar_ray/faces.py, style photo, no label noise)\n"
          "written in {layout}'s file layout by `synthfar pipeline`, so the demo can run the real ingest,\n"
          "training and evaluation offline. Their labels are exact: they are what the renderer drew.\n")


def layout_of(image_id: int, layouts: list[str]) -> str:
    """Which of the layouts written (in LAYOUTS order) an id of the rendered set goes to."""
    return layouts[image_id % len(layouts)]


def fairface_labels(row: dict[str, Any], salt: int = 0) -> tuple[str, str, str]:
    """(age bin, gender, race) as FairFace writes them, for a row with age/gender/ethnicity: the
    rendered race where the row has one (`render_race7`, not null), else, where two races fold into
    the row's class, `salt` (any per-image integer) picks one."""
    age_bin = int(L.age_to_bin(row["age"]))
    age = "more than 70" if age_bin == L.NUM_AGE_BINS - 1 else L.AGE_BIN_NAMES[age_bin]
    races = L.RACES7_OF_ETHNICITY[row["ethnicity"]]
    race = races[salt % len(races)] if row.get("render_race7") is None else row["render_race7"]
    if race not in races:
        raise ValueError(f"row id {row.get('id')}: render_race7 {L.FAIRFACE_RACES7[race]!r} does not fold into its "
                         f"ethnicity {L.ETHNICITIES[row['ethnicity']]!r} (a stand-in is rendered without label noise)")
    race = L.FAIRFACE_RACES7[race]
    return age, ("Male", "Female")[row["gender"]], race


def fairface_split(image_id: int) -> str:
    """Official split of a FairFace stand-in image: a seeded 1/8 goes to val (ingest's test)."""
    u = np.random.default_rng(np.random.SeedSequence([image_id, 0xFA1F])).random()
    return "val" if u < FAIRFACE_VAL_SHARE else "train"


# What the renderer needs to place the landmarks again (generate.face_inputs).
_RENDER_INPUTS = ("hair_length", "hair_style", "hair_color", "pose_yaw", "pose_pitch", "pose_roll", "pose_scale",
                  "pose_offset_x", "pose_offset_y")


def _rows(parquet_uri: str, opts: storage.StorageOptions, landmarks: GenerateConfig | None) -> Iterator[dict[str, Any]]:
    """The rendered rows; with `landmarks` (the config that rendered them) each gets its sparse
    points in pixels under "landmarks"."""
    for name in storage.list_files(parquet_uri, opts, suffix=".parquet"):
        fs, path = storage.resolve(storage.join(parquet_uri, name), opts)
        with fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
            table = pq.read_table(f, columns=["id", "image", "age", "gender", "ethnicity",
                                              *(["render_race7"] if "render_race7" in names else []),
                                              *(_RENDER_INPUTS if landmarks is not None else ())])
        rows = table.to_pylist()
        if landmarks is not None and rows:
            for row, points in zip(rows, real_landmarks(landmarks, rows)):
                row["landmarks"] = points
        yield from rows


def real_landmarks(cfg: GenerateConfig, rows: list[dict[str, Any]]) -> np.ndarray:
    """(N, R, 2) pixels of the real layout's points on rows a procedural set stored (NaN: hidden)."""
    from synthfar_ray.faces import render_real_keypoints
    from synthfar_ray.generate import face_inputs

    attrs, poses, seeds = face_inputs(cfg.seed, rows)
    return render_real_keypoints(attrs, poses, cfg.render, seeds)


def _landmark_cells(points: np.ndarray) -> list[str]:
    """x, y cells of one image's points (empty for a hidden one), 3 decimals of a pixel."""
    return [("" if np.isnan(v) else f"{v:.3f}") for v in np.asarray(points, dtype=np.float64).reshape(-1)]


def write_layouts(parquet_uri: str, folders: dict[str, str], opts: storage.StorageOptions,
                  landmarks: GenerateConfig | None = None) -> dict[str, int]:
    """Write a generated set's rows as stand-in files: `folders` maps a layout to its local folder
    (only the layouts named are written). With `landmarks` (the procedural config that rendered the
    set), each layout also gets a landmarks.csv of the real sparse points. Returns the number of
    images per layout."""
    from synthfar_ray.ingest import FAIRFACE_CSVS, LANDMARKS_CSV, landmark_header, utkface_file_name

    unknown = sorted(set(folders) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown stand-in layout {unknown[0]!r} (known: {', '.join(LAYOUTS)})")
    counts = dict.fromkeys(folders, 0)
    csv_rows: dict[str, list[list[str]]] = {"train": [], "val": []}
    landmark_rows: dict[str, list[list[str]]] = {layout: [] for layout in folders}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    layouts = [name for name in LAYOUTS if name in folders]
    for row in _rows(parquet_uri, opts, landmarks):
        layout = layout_of(row["id"], layouts)
        if layout == "utkface":
            stamp = f"2026{row['id']:013d}"
            rel = utkface_file_name(int(row["age"]), row["gender"], row["ethnicity"], stamp)
        else:
            split = fairface_split(row["id"])
            rel = f"{split}/{row['id']}.jpg"
            csv_rows[split].append([rel, *fairface_labels(row, row["id"] // len(layouts)), "False"])
        target = os.path.join(folders[layout], rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(row["image"])
        counts[layout] += 1
        if landmarks is not None:
            landmark_rows[layout].append([rel, *_landmark_cells(row["landmarks"])])
    if "fairface" in folders:
        for split, name in FAIRFACE_CSVS.items():
            with open(os.path.join(folders["fairface"], name), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["file", "age", "gender", "race", "service_test"])
                w.writerows(sorted(csv_rows[split]))
    for layout, folder in folders.items():
        if landmarks is not None:
            with open(os.path.join(folder, LANDMARKS_CSV), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(landmark_header())
                w.writerows(sorted(landmark_rows[layout]))
        with open(os.path.join(folder, "README.txt"), "w") as f:
            f.write(NOTICE.format(layout={"utkface": "UTKFace", "fairface": "FairFace"}[layout]))
    return counts
