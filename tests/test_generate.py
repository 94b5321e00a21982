"""The generation job end to end on a real local Ray cluster with the tiny offline pipeline."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from synthfar_ray import storage
from synthfar_ray.generate import (FAULT_ENV, MANIFEST, GenerateConfig, image_seed, part_name,
                                   prompt_rows, run_generate, shard_ranges)
from synthfar_ray.images import decode_image
from synthfar_ray.labels import ETHNICITIES, GENDERS, age_to_bin
from synthfar_ray.prompts import render_prompt, sample_attributes


def make_cfg(output: str, **over) -> GenerateConfig:
    data = {
        "output": output, "num_images": 10, "seed": 7, "shard_size": 4,
        "model": {"preset": "tiny-random"},
        "sampler": {"width": 32, "height": 32, "steps": 4},
        "compute": {"num_actors": 2, "cpus_per_actor": 0.5, "batch_size": 4},
    }
    for k, v in over.items():
        node = data
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return GenerateConfig.model_validate(data)


def read_parts(output: str, opts=None):
    names = storage.list_files(output, opts, suffix=".parquet")
    tables = []
    for n in names:
        fs, path = storage.resolve(storage.join(output, n), opts)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f))
    return names, [row for t in tables for row in t.to_pylist()]


def test_shards_cover_ids_once():
    assert shard_ranges(10, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert sum(b - a for _, a, b in shard_ranges(1000, 64)) == 1000


def test_prompt_rows_are_pure_per_id(tmp_path):
    cfg = make_cfg(str(tmp_path))
    alone = prompt_rows(cfg, range(5, 6))[0]
    in_loop = prompt_rows(cfg, range(0, 10))[5]
    assert alone == in_loop
    attrs = sample_attributes(cfg.seed, 5, cfg.prompts)
    assert alone["prompt"] == render_prompt(attrs, cfg.prompts)
    assert alone["age_bin"] == age_to_bin(attrs.age)
    assert alone["seed"] == image_seed(7, 5) != image_seed(8, 5)


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "synthetic")
    cfg = make_cfg(out)
    return cfg, run_generate(cfg)


def test_job_writes_every_id_once_with_labels(first_run):
    cfg, result = first_run
    assert (result.generated, result.shards_generated, result.shards_skipped) == (10, 3, 0)
    names, rows = read_parts(cfg.output)
    assert names == [part_name(s) for s in range(3)]
    assert sorted(r["id"] for r in rows) == list(range(10))
    expected = {r["id"]: r for r in prompt_rows(cfg, range(10))}
    for r in rows:
        exp = expected[r["id"]]
        for key in ("age", "gender", "ethnicity", "age_bin", "prompt", "seed", "country", "name", "pose_yaw", "split"):
            assert r[key] == pytest.approx(exp[key]) if isinstance(exp[key], float) else r[key] == exp[key], key
        assert 0 <= r["gender"] < len(GENDERS) and 0 <= r["ethnicity"] < len(ETHNICITIES)
        assert r["source"] == "synthetic" and r["model"] == "preset:tiny-random"
        img = decode_image(r["image"])
        assert img.shape == (32, 32, 3) and (r["width"], r["height"]) == (32, 32)
    manifest = __import__("json").loads(storage.read_bytes(storage.join(cfg.output, MANIFEST)))
    assert manifest["status"] == "complete" and manifest["num_images"] == 10
    assert manifest["images_generated"] == 10 and manifest["config"]["seed"] == 7


def test_rerun_skips_and_deleted_part_is_regenerated_alone(first_run):
    cfg, _ = first_run
    again = run_generate(cfg)
    assert (again.generated, again.shards_skipped) == (0, 3)
    keep = {n: os.path.getmtime(os.path.join(cfg.output, n)) for n in (part_name(0), part_name(2))}
    _, before = read_parts(cfg.output)
    os.remove(os.path.join(cfg.output, part_name(1)))
    resumed = run_generate(cfg)
    assert (resumed.generated, resumed.shards_generated, resumed.shards_skipped) == (4, 1, 2)
    assert {n: os.path.getmtime(os.path.join(cfg.output, n)) for n in keep} == keep  # untouched
    _, after = read_parts(cfg.output)
    assert sorted(r["id"] for r in after) == list(range(10))
    # The regenerated shard is the same data: same seed + id -> same image.
    by_id = {r["id"]: r for r in before}
    for r in after:
        if 4 <= r["id"] < 8:
            diff = np.abs(decode_image(r["image"]).astype(int) - decode_image(by_id[r["id"]]["image"]).astype(int))
            assert diff.mean() < 1.0


def test_growing_num_images_completes_the_last_shard(first_run):
    cfg, _ = first_run
    grown = run_generate(cfg.model_copy(update={"num_images": 12}))
    assert (grown.generated, grown.shards_generated) == (4, 1)  # shard 2 had 2 of 4 rows
    _, rows = read_parts(cfg.output)
    assert sorted(r["id"] for r in rows) == list(range(12))


def test_other_config_into_same_output_is_refused(first_run):
    cfg, _ = first_run
    other = cfg.model_copy(update={"seed": 8})
    with pytest.raises(FileExistsError, match="different config"):
        run_generate(other)
    _, rows = read_parts(cfg.output)
    assert len(rows) >= 10  # nothing was lost


def test_same_image_for_same_id_whatever_the_batch(ray_cluster, tmp_path):
    """Per-image generators: id 1 generated in a batch of 4 equals id 1 generated alone."""
    a = make_cfg(str(tmp_path / "a"), num_images=4, **{"compute.batch_size": 4, "compute.num_actors": 1})
    b = make_cfg(str(tmp_path / "b"), num_images=4, **{"compute.batch_size": 1, "compute.num_actors": 1})
    run_generate(a)
    run_generate(b)
    _, ra = read_parts(a.output)
    _, rb = read_parts(b.output)
    ia = {r["id"]: decode_image(r["image"]).astype(int) for r in ra}
    ib = {r["id"]: decode_image(r["image"]).astype(int) for r in rb}
    for i in range(4):
        assert np.abs(ia[i] - ib[i]).mean() < 1.0
    assert np.abs(ia[0] - ia[1]).mean() > 1.0  # and different ids differ


def test_actor_killed_mid_run_still_gives_exactly_n_ids(ray_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, str(marker))  # the first actor to finish a micro-batch exits hard
    cfg = make_cfg(str(tmp_path / "out"), num_images=8)
    result = run_generate(cfg)
    assert marker.exists()  # the actor really died
    _, rows = read_parts(cfg.output)
    ids = [r["id"] for r in rows]
    assert len(ids) == 8 and sorted(ids) == list(range(8)) and result.num_images == 8


def test_generate_into_s3(ray_cluster, s3_bucket):
    bucket, opts = s3_bucket
    out = storage.join(bucket, "synthetic")
    cfg = make_cfg(out, num_images=4).model_copy(update={"storage": opts})
    assert run_generate(cfg).generated == 4
    _, rows = read_parts(out, opts)
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]
    assert storage.exists(storage.join(out, MANIFEST), opts)
    again = run_generate(cfg)
    assert again.shards_skipped == 1 and again.generated == 0


def test_foreign_parquet_output_is_refused(ray_cluster, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not made by"):
        run_generate(make_cfg(str(out)))
