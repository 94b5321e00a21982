"""Ingest of UTKFace and FairFace layouts (folders and archives) on a real Ray cluster, into local
folders and moto's S3; splits, nested subsets, bad input, overwrite."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfar_ray import labels as L
from synthfar_ray import storage
from synthfar_ray.cli import main as cli_main
from synthfar_ray.images import decode_image, encode_jpeg
from synthfar_ray.ingest import (
    MANIFEST_NAME,
    MAX_LISTED_BAD,
    OUTPUT_SCHEMA,
    IngestError,
    assign_splits,
    assign_subsets,
    ingest_fairface,
    ingest_utkface,
    parse_utkface_name,
    utkface_file_name,
    write_order,
)

N_UTK = 40
FF_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")


def _jpeg(rng: np.random.Generator) -> bytes:
    return encode_jpeg(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), quality=90)


def _make_utk(folder, n: int = N_UTK, seed: int = 0) -> dict[str, tuple[int, int, int]]:
    """A stand-in UTKFace folder; returns {file name: (age, gender, race)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        age, gender, race = int([0, 2, 3, 9, 10, 69, 70, 116][i % 8] if i < 8 else rng.integers(0, 100)), i % 2, i % 5
        name = utkface_file_name(age, gender, race, stamp=f"20170109{i:09d}")
        (folder / name).write_bytes(_jpeg(rng))
        truth[name] = (age, gender, race)
    return truth


def _make_fairface(folder, n_train: int = 40, n_val: int = 14, seed: int = 0) -> dict[str, tuple[str, str, str]]:
    """A stand-in FairFace folder (train/, val/, both CSVs); returns {file: (age, gender, race)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", n_train), ("val", n_val)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / f"fairface_label_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "age", "gender", "race", "service_test"])
            for i in range(1, n + 1):
                rel = f"{split}/{i}.jpg"
                (folder / rel).write_bytes(_jpeg(rng))
                row = (FF_AGES[i % 9], ("Male", "Female")[i % 2], L.FAIRFACE_RACES7[i % 7])
                w.writerow([rel, *row, str(bool(i % 3 == 0))])
                truth[rel] = row
    return truth


def _read(out: str, opts=None) -> pa.Table:
    fs, path = storage.resolve(out, opts)
    return pq.read_table(path, filesystem=fs).sort_by("id")  # _manifest.json is skipped (leading "_")


def _manifest(out: str, opts=None) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, MANIFEST_NAME), opts))


@pytest.fixture(scope="module")
def utk_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("utk") / "UTKFace"
    return root, _make_utk(root)


@pytest.fixture(scope="module")
def utk_out(ray_cluster, utk_tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("utk_out") / "parquet")
    result = ingest_utkface(str(utk_tree[0]), out, seed=42)
    return out, result


# ---------------------------------------------------------------------------------------------- UTKFace


def test_utkface_folder_end_to_end(utk_tree, utk_out):
    _, truth = utk_tree
    out, result = utk_out
    table = _read(out)
    assert table.num_rows == N_UTK
    for f in OUTPUT_SCHEMA:  # dtypes as the shared schema says
        assert table.schema.field(f.name).type == f.type, f.name
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(N_UTK))  # ids: index in the sorted file list
    assert sorted(truth) == [r["file"] for r in rows]
    for r in rows:
        age, gender, race = truth[r["file"]]
        assert (r["age"], r["gender"], r["ethnicity"]) == (age, gender, race)
        assert r["age_bin"] == int(L.age_to_bin(age))
        assert r["source"] == "utkface" and r["ethnicity7"] is None
        img = decode_image(r["image"])
        assert img.shape == (24, 24, 3) and (r["width"], r["height"]) == (24, 24)
        assert (r["subset"] is not None) == (r["split"] == "train")
    assert {r["age_bin"] for r in rows} >= {0, 1, 2, 7, 8}  # 2 -> 0, 3/9 -> 1, 69 -> 7, 70/116 -> 8
    # 70/15/15 of 40
    assert result.counts == {"train": 28, "val": 6, "test": 6}
    assert {s: sum(r["split"] == s for r in rows) for s in L.SPLITS} == result.counts
    m = _manifest(out)
    assert m["dataset"] == "utkface" and m["seed"] == 42 and m["counts"] == result.counts
    assert m["skipped"] == [] and m["num_rows"] == N_UTK
    assert m["subset_counts"] == {"25": 7, "50": 14, "75": 21, "100": 28}
    cc = m["class_counts"]["all"]
    assert cc["gender"] == {"male": 20, "female": 20}
    assert cc["ethnicity"] == {name: 8 for name in L.ETHNICITIES}
    assert sum(cc["age_bin"].values()) == N_UTK
    assert sum(m["class_counts"]["train"]["gender"].values()) == 28


def test_utkface_tar_gz_matches_folder(ray_cluster, utk_tree, utk_out, tmp_path):
    root, _ = utk_tree
    archive = tmp_path / "UTKFace.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="UTKFace")
    out = str(tmp_path / "from_tar")
    ingest_utkface(str(archive), out, seed=42)
    cols = ["id", "file", "split", "subset", "age", "gender", "ethnicity"]
    assert _read(out).select(cols).to_pylist() == _read(utk_out[0]).select(cols).to_pylist()
    assert _ids_per_file(out) == _ids_per_file(utk_out[0])  # same rows in the same files, same order


def _ids_per_file(folder: str) -> list[list[int]]:
    names = [p for p in os.listdir(folder) if p.endswith(".parquet")]
    return sorted(pq.read_table(os.path.join(folder, p), columns=["id"]).column("id").to_pylist() for p in names)


def test_utkface_into_s3(ray_cluster, utk_tree, s3_bucket):
    bucket, opts = s3_bucket
    out = f"{bucket}/real/utkface"
    result = ingest_utkface(str(utk_tree[0]), out, seed=42, storage=opts)
    table = _read(out, opts)
    assert table.num_rows == N_UTK and sum(result.counts.values()) == N_UTK
    assert decode_image(table.column("image")[0].as_py()).shape == (24, 24, 3)
    assert _manifest(out, opts)["counts"] == result.counts
    assert any(n.endswith(".parquet") for n in storage.list_files(out, opts))


def test_utkface_name_parsing():
    assert parse_utkface_name("26_1_3_20170119180512345.jpg.chip.jpg") == (26, 1, 3)
    assert parse_utkface_name("5_0_4_20161219.jpg") == (5, 0, 4)
    assert parse_utkface_name(utkface_file_name(150, 1, 0, "x1")) == (150, 1, 0)
    for bad in ("39_1_20170116174525125.jpg.chip.jpg", "a_0_0_1.jpg", "30_2_0_1.jpg", "30_0_5_1.jpg",
                "151_0_0_1.jpg", "30_0_0_1.txt"):
        with pytest.raises(ValueError):
            parse_utkface_name(bad)
    with pytest.raises(ValueError):
        utkface_file_name(30, 0, 7, "x")


# ---------------------------------------------------------------------------------------------- splits


def test_split_determinism_and_fractions():
    keys = [f"{i}_0_0_{i}.jpg" for i in range(1000)]
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = dict(zip(keys, assign_splits(keys, fractions, seed=42)))
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    b = dict(zip(shuffled, assign_splits(shuffled, fractions, seed=42)))
    assert a == b  # listing order does not matter
    c = dict(zip(keys, assign_splits(keys, fractions, seed=7)))
    assert sum(a[k] != c[k] for k in keys) > 300  # another seed, another split
    assert {s: list(a.values()).count(s) for s in fractions} == {"train": 700, "val": 150, "test": 150}
    with pytest.raises(ValueError):
        assign_splits(keys, {"train": 0.7, "val": 0.2}, seed=0)


def test_subsets_are_nested():
    keys = [f"train/{i}.jpg" for i in range(1001)]
    sub = dict(zip(keys, assign_subsets(keys, seed=42)))
    sets = {p: {k for k, s in sub.items() if s <= p} for p in (25, 50, 75, 100)}
    assert sets[25] < sets[50] < sets[75] < sets[100] == set(keys)
    assert [len(sets[p]) for p in (25, 50, 75)] == [250, 500, 751]  # round(1001 * p / 100)
    shuffled = keys[::-1]
    assert dict(zip(shuffled, assign_subsets(shuffled, seed=42))) == sub
    assert dict(zip(keys, assign_subsets(keys, seed=1))) != sub


# ---------------------------------------------------------------------------------------------- FairFace


def test_fairface_folder_and_zip(ray_cluster, tmp_path):
    root = tmp_path / "fairface"
    truth = _make_fairface(root)
    out = str(tmp_path / "ff_out")
    result = ingest_fairface(str(root), out, seed=3, val_fraction=0.25)
    table = _read(out)
    for f in OUTPUT_SCHEMA:
        assert table.schema.field(f.name).type == f.type, f.name
    rows = table.to_pylist()
    assert len(rows) == 54 and sorted(truth) == sorted(r["file"] for r in rows)
    for r in rows:
        age, gender, race = truth[r["file"]]
        assert r["age"] is None
        assert r["age_bin"] == FF_AGES.index(age)
        assert r["gender"] == (gender == "Female")
        assert L.FAIRFACE_RACES7[r["ethnicity7"]] == race
        assert L.ETHNICITIES[r["ethnicity"]] == L.FAIRFACE_RACE_TO_ETHNICITY[race]
        assert r["source"] == "fairface"
        # the official val set is the test split; official train is split into train/val
        assert (r["split"] == "test") == r["file"].startswith("val/")
    eth_of = {L.FAIRFACE_RACES7[r["ethnicity7"]]: L.ETHNICITIES[r["ethnicity"]] for r in rows}
    assert eth_of == {"White": "white", "Middle Eastern": "white", "Black": "black", "East Asian": "asian",
                      "Southeast Asian": "asian", "Indian": "indian", "Latino_Hispanic": "other"}
    assert result.counts == {"train": 30, "val": 10, "test": 14}
    assert {r["subset"] for r in rows if r["split"] == "train"} == {25, 50, 75, 100}
    m = _manifest(out)
    assert m["class_counts"]["all"]["age_bin"]["70+"] == sum(a == "more than 70" for a, _, _ in truth.values())
    assert sum(m["class_counts"]["all"]["ethnicity7"].values()) == 54

    # The zip of the same folder gives the same rows and splits.
    archive = tmp_path / "fairface.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, arcname=os.path.join("fairface", path.relative_to(root)))
    out_zip = str(tmp_path / "ff_zip_out")
    ingest_fairface(str(archive), out_zip, seed=3, val_fraction=0.25)
    cols = ["id", "file", "split", "subset", "age_bin", "gender", "ethnicity", "ethnicity7"]
    assert _read(out_zip).select(cols).to_pylist() == table.select(cols).to_pylist()


def test_fairface_bad_rows(ray_cluster, tmp_path):
    root = tmp_path / "ff"
    _make_fairface(root, n_train=20, n_val=6)
    path = root / "fairface_label_train.csv"
    lines = path.read_text().splitlines()
    lines[3] = "train/3.jpg,20-29,Female,Martian,False"  # line 4 of the file
    lines[5] = "train/5.jpg,20-29,Robot,White,False"  # line 6
    lines.append("train/99.jpg,3-9,Male,Black,False")  # no such image (line 22)
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(IngestError, match=r"train/3\.jpg.*fairface_label_train\.csv line 4.*Martian"):
        ingest_fairface(str(root), str(tmp_path / "strict"))
    assert not storage.list_files(str(tmp_path / "strict"))

    out = str(tmp_path / "skip")
    result = ingest_fairface(str(root), out, skip_bad=True)
    assert sum(result.counts.values()) == 26 - 2  # 3 rows bad, one of them was an extra row
    skipped = {s["file"]: s for s in _manifest(out)["skipped"]}
    assert set(skipped) == {"train/3.jpg", "train/5.jpg", "train/99.jpg"}
    assert skipped["train/3.jpg"]["row"] == 4 and "race 'Martian'" in skipped["train/3.jpg"]["reason"]
    assert skipped["train/5.jpg"]["row"] == 6 and "gender 'Robot'" in skipped["train/5.jpg"]["reason"]
    assert skipped["train/99.jpg"]["row"] == 22 and "missing image" in skipped["train/99.jpg"]["reason"]
    assert not {"train/3.jpg", "train/5.jpg"} & set(_read(out).column("file").to_pylist())


# ---------------------------------------------------------------------------------------------- bad input


def test_malformed_utkface_name_stops_or_is_skipped(ray_cluster, tmp_path):
    root = tmp_path / "utk"
    _make_utk(root, n=12, seed=1)
    (root / "39_1_20170116174525125.jpg.chip.jpg").write_bytes(_jpeg(np.random.default_rng(0)))  # race missing
    (root / "README.txt").write_text("not an image")  # ignored, and said so in the manifest
    with pytest.raises(IngestError, match=r"39_1_20170116174525125\.jpg\.chip\.jpg"):
        ingest_utkface(str(root), str(tmp_path / "strict"))
    assert not (tmp_path / "strict").exists()  # stopped while parsing names, before any output

    # skip mode: the bad name and a corrupt JPEG are both listed, the rest is written
    corrupt = utkface_file_name(30, 0, 1, "corrupt1")
    (root / corrupt).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = str(tmp_path / "skip")
    result = ingest_utkface(str(root), out, skip_bad=True)
    m = _manifest(out)
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"39_1_20170116174525125.jpg.chip.jpg", corrupt}
    assert "does not match" in reasons["39_1_20170116174525125.jpg.chip.jpg"]
    assert "unreadable image" in reasons[corrupt]
    assert m["ignored_files"] == 1 and m["ignored_examples"] == ["README.txt"]
    assert _read(out).num_rows == 12 == sum(result.counts.values()) == m["num_rows"]


def test_corrupt_jpeg_fails_the_ray_job_with_its_name(ray_cluster, tmp_path):
    root = tmp_path / "utk"
    _make_utk(root, n=10, seed=2)
    name = utkface_file_name(44, 1, 2, "truncated")
    (root / name).write_bytes(_jpeg(np.random.default_rng(1))[:60])
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=name.replace(".", r"\.") + ": unreadable image"):
        ingest_utkface(str(root), str(out))
    assert not [p for p in out.rglob("*") if p.is_file()]  # no partial output left behind


def _make_bad_utk(folder) -> dict[str, str]:
    """A UTKFace folder with one bad item of each kind; returns {bad file: words its reason holds}."""
    _make_utk(folder, n=30, seed=3)
    rng = np.random.default_rng(3)
    bad = {
        "39_1_20170116174525125.jpg.chip.jpg": "does not match",  # race missing
        "30_0_7_20170116174525126.jpg.chip.jpg": "race 7",  # no such race
        utkface_file_name(25, 1, 2, "corrupt"): "unreadable image",  # bytes that are no image
        utkface_file_name(61, 0, 3, "truncated"): "unreadable image",  # a JPEG cut short
    }
    for name, jpeg in zip(bad, (_jpeg(rng), _jpeg(rng), b"\xff\xd8\xff\xe0 not a jpeg", _jpeg(rng)[:60])):
        (folder / name).write_bytes(jpeg)
    dangling = utkface_file_name(40, 0, 0, "dangling")  # listed, but cannot be opened
    (folder / dangling).symlink_to(folder / "no-such-file.jpg")
    return bad | {dangling: "cannot read image file"}


def _make_bad_fairface(folder) -> dict[str, str]:
    """A FairFace folder with one bad item of each kind; returns {bad file or CSV: words its reason holds}."""
    _make_fairface(folder, n_train=24, n_val=10, seed=4)
    (folder / "train/7.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # csv line 8
    train_csv = folder / "fairface_label_train.csv"
    lines = train_csv.read_text().splitlines()
    lines[3] = "train/3.jpg,20-29,Female,Martian,False"  # line 4: unknown race
    lines.append("train/99.jpg,3-9,Male,Black,False")  # line 26: no such image
    train_csv.write_text("\n".join(lines) + "\n")
    val_csv = folder / "fairface_label_val.csv"
    lines = val_csv.read_text().splitlines()
    lines.append(lines[2])  # line 12: val/2.jpg a second time, same labels
    val_csv.write_text("\n".join(lines) + "\n")
    return {"train/3.jpg": "line 4: unknown race 'Martian'", "train/99.jpg": "line 26: missing image file",
            "train/7.jpg": "line 8: unreadable image",
            "fairface_label_val.csv": "line 12: duplicate row for val/2.jpg (first at line 3)"}


def _counts_in(table: pa.Table, dataset: str) -> dict:
    """The manifest's counts, computed from the Parquet rows themselves."""
    rows = table.select(["split", "subset", "gender", "ethnicity", "age_bin", "ethnicity7"]).to_pylist()
    vocab = {"gender": L.GENDERS, "ethnicity": L.ETHNICITIES, "age_bin": L.AGE_BIN_NAMES}
    if dataset == "fairface":
        vocab["ethnicity7"] = L.FAIRFACE_RACES7
    class_counts = {split: {column: {name: sum(r[column] == i and split in ("all", r["split"]) for r in rows)
                                     for i, name in enumerate(names)} for column, names in vocab.items()}
                    for split in ("all", *L.SPLITS)}
    return {
        "num_rows": len(rows),
        "counts": {s: sum(r["split"] == s for r in rows) for s in L.SPLITS},
        "subset_counts": {str(p): sum(r["split"] == "train" and r["subset"] <= p for r in rows)
                          for p in (25, 50, 75, 100)},
        "class_counts": class_counts,
    }


# ---------------------------------------------------------------------------------------------- trust


def test_rows_are_written_in_a_seeded_permuted_order(ray_cluster, tmp_path):
    """In file-name order UTKFace is sorted by age: the stored order and training batches must mix
    ages and genders."""
    import ray
    from ray.data.expressions import col

    root = tmp_path / "UTKFace"
    root.mkdir()
    rng = np.random.default_rng(5)
    tiny = encode_jpeg(np.full((8, 8, 3), 128, np.uint8))
    for i in range(400):  # ages 10..89, 5 each: file names sort by age, then gender
        age, gender, race = 10 + i // 5, int(rng.integers(0, 2)), int(rng.integers(0, 5))
        (root / utkface_file_name(age, gender, race, f"2017{i:05d}")).write_bytes(tiny)
    out = str(tmp_path / "out")
    ingest_utkface(str(root), out, seed=42)
    all_ages = _read(out).column("age").to_numpy()

    # Stored order: every run of 16 rows in a file (what a reader without a shuffle buffer batches
    # together) is a sample of the whole set. Ray Data reads small files into one block and the
    # shuffle buffer takes whole blocks, so at this size only this check sees a sorted order.
    parts = [p for p in os.listdir(out) if p.endswith(".parquet")]
    assert len(parts) >= 4  # spread over files, so Ray Data's file shuffle has something to shuffle
    runs = []
    for part in parts:
        t = pq.read_table(os.path.join(out, part), columns=["age", "gender"])
        ages, genders = t.column("age").to_numpy(), t.column("gender").to_numpy()
        runs += [(ages[i:i + 16], genders[i:i + 16]) for i in range(0, len(ages) - 15, 16)]
    assert len(runs) >= 16
    assert np.mean([np.std(a) for a, _ in runs]) > 0.7 * np.std(all_ages)
    assert np.mean([len(set(g.tolist())) for _, g in runs]) > 1.8

    # Read the train split the way training does: shuffled files, a small local shuffle buffer.
    ds = (ray.data.read_parquet(out, shuffle=ray.data.FileShuffleConfig(seed=7))
          .filter(expr=col("split") == "train").select_columns(["id", "image", "age", "gender"]))
    batches = list(ds.iter_batches(batch_size=16, local_shuffle_buffer_size=64, local_shuffle_seed=7,
                                   batch_format="numpy", drop_last=True))
    assert len(batches) == 280 // 16
    ages = np.concatenate([b["age"] for b in batches])
    assert np.mean([np.std(b["age"]) for b in batches]) > 0.7 * np.std(ages)
    assert np.mean([len(set(b["gender"].tolist())) for b in batches]) > 1.8


def test_write_order_is_a_function_of_seed_and_files():
    keys = [f"{i}_0_0_{i}.jpg" for i in range(200)]
    order = [keys[i] for i in write_order(keys, seed=42)]
    shuffled = keys[::-1]
    assert [shuffled[i] for i in write_order(shuffled, seed=42)] == order  # listing order does not matter
    assert order != sorted(keys) and sorted(order) == sorted(keys)
    assert [keys[i] for i in write_order(keys, seed=7)] != order


@pytest.mark.parametrize("dataset", ["utkface", "fairface"])
def test_manifest_counts_equal_the_parquet_with_skip_bad(ray_cluster, tmp_path, dataset):
    root = tmp_path / dataset
    if dataset == "utkface":
        bad = _make_bad_utk(root)
        result = ingest_utkface(str(root), str(tmp_path / "out"), skip_bad=True)
    else:
        bad = _make_bad_fairface(root)
        result = ingest_fairface(str(root), str(tmp_path / "out"), skip_bad=True, val_fraction=0.25)
    out = str(tmp_path / "out")
    table, m = _read(out), _manifest(out)
    assert {k: m[k] for k in ("num_rows", "counts", "subset_counts", "class_counts")} == _counts_in(table, dataset)
    assert result.counts == m["counts"] and result.skipped == m["skipped"]

    # Each bad item is listed once with its reason, and nothing written is listed as skipped.
    skipped = [s["file"] for s in m["skipped"]]
    assert sorted(skipped) == sorted(bad)
    for s in m["skipped"]:
        assert bad[s["file"]] in s["reason"], s
    files = table.column("file").to_pylist()
    assert len(files) == len(set(files)) and not set(skipped) & set(files)
    if dataset == "fairface":
        assert "val/2.jpg" in files and m["counts"]["test"] == 10  # the duplicated row's file, once
        assert {s["file"]: s["row"] for s in m["skipped"]} == {
            "train/3.jpg": 4, "train/99.jpg": 26, "train/7.jpg": 8, "fairface_label_val.csv": 12}


def test_strict_mode_reports_every_bad_item_at_once(ray_cluster, utk_out, tmp_path):
    # UTKFace: two bad names (planning), two undecodable images (Ray decode) and one file that
    # cannot be read, one error.
    root = tmp_path / "utk"
    bad = _make_bad_utk(root)
    n_utk_bad = len(bad)
    out = tmp_path / "strict"
    with pytest.raises(IngestError) as info:
        ingest_utkface(str(root), str(out))
    message = str(info.value)
    assert message.startswith(f"{len(bad)} bad item(s) in {root}")
    for name, reason in bad.items():
        assert any(line.strip().startswith(f"{name}: ") and reason in line for line in message.splitlines()), name
    assert not out.exists()  # nothing written, not even a folder

    # FairFace: each CSV line named; an --overwrite run that fails keeps the old output.
    ff = tmp_path / "ff"
    bad = _make_bad_fairface(ff)
    out = tmp_path / "ff_out"
    shutil.copytree(utk_out[0], out)
    before = sorted(storage.list_files(str(out)))
    with pytest.raises(IngestError) as info:
        ingest_fairface(str(ff), str(out), overwrite=True)
    message = str(info.value)
    for name, reason in bad.items():
        assert any(name in line and reason in line for line in message.splitlines()), name
    assert "fairface_label_train.csv line 8: unreadable image" in message  # image failures name the row
    assert sorted(storage.list_files(str(out))) == before

    # Many bad items: the first MAX_LISTED_BAD are listed, then how many more.
    for i in range(MAX_LISTED_BAD + 3):
        (root / f"nolabel_{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(IngestError) as info:
        ingest_utkface(str(root), str(tmp_path / "many"))
    lines = str(info.value).splitlines()
    n_bad = n_utk_bad + MAX_LISTED_BAD + 3
    assert lines[0].startswith(f"{n_bad} bad item(s)")
    assert len(lines) == 1 + MAX_LISTED_BAD + 1 and lines[-1].strip() == f"and {n_bad - MAX_LISTED_BAD} more"


def test_relative_locations_are_made_absolute_on_the_driver(ray_cluster, utk_tree, tmp_path, monkeypatch):
    root, _ = utk_tree
    shutil.copytree(root, tmp_path / "UTKFace")
    monkeypatch.chdir(tmp_path)
    result = ingest_utkface("UTKFace", "rel_out")
    assert result.out == str(tmp_path / "rel_out") and _read(str(tmp_path / "rel_out")).num_rows == N_UTK
    m = _manifest(result.out)
    assert (m["source"], m["out"]) == (str(tmp_path / "UTKFace"), str(tmp_path / "rel_out"))

    # Inside a `ray job submit` job the working directory is Ray's temporary copy of the upload.
    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(IngestError, match="relative output path 'out'"):
        ingest_utkface(str(tmp_path / "UTKFace"), "out")
    assert not (job_dir / "out").exists()


# ---------------------------------------------------------------------------------------------- CLI, overwrite


def test_cli_refuses_existing_output_unless_overwrite(ray_cluster, utk_tree, utk_out, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(utk_out[0], out)  # leave the shared output alone
    old_parts = set(storage.list_files(out, suffix=".parquet"))
    assert cli_main(["ingest", "utkface", str(utk_tree[0]), out, "--seed", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert set(storage.list_files(out, suffix=".parquet")) == old_parts

    assert cli_main(["ingest", "utkface", str(utk_tree[0]), out, "--seed", "5", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "40 rows (train 28, val 6, test 6)" in printed and "skipped 0" in printed
    assert not old_parts & set(storage.list_files(out, suffix=".parquet"))  # old parts deleted
    assert _read(out).num_rows == N_UTK and _manifest(out)["seed"] == 5

    assert cli_main(["ingest", "utkface", "/no/such/dir", str(tmp_path / "other")]) == 2
    assert "/no/such/dir" in capsys.readouterr().err
