"""The generation job end to end on a real local Ray cluster with the tiny offline pipeline."""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from synthfar_ray import storage
from synthfar_ray.config import load_config
from synthfar_ray.generate import (FAULT_ENV, MANIFEST, GenerateConfig, ShardGenerator, fingerprint, image_seed,
                                   part_name, prepare_output, prompt_rows, run_generate, shard_ranges)
from synthfar_ray.images import decode_image
from synthfar_ray.keypoints import skeleton_keypoints, to_column
from synthfar_ray.labels import ETHNICITIES, GENDERS, age_to_bin
from synthfar_ray.poses import HeadPose
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


def read_manifest(output: str, opts=None) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, MANIFEST), opts))


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


def test_missing_model_path_fails_on_the_driver_before_ray(tmp_path, monkeypatch):
    import ray

    ray_was_up = ray.is_initialized()
    out = str(tmp_path / "out")
    cfg = load_config(GenerateConfig, None, [f"output={out}", "num_images=4", "model.base=/nonexistent"])
    with pytest.raises(FileNotFoundError) as err:
        run_generate(cfg)
    assert str(err.value).startswith("model.base: /nonexistent does not exist") and "\n" not in str(err.value)
    monkeypatch.chdir(tmp_path)  # a relative path is named by its absolute location
    cfg = make_cfg(out, **{"model.preset": None, "model.controlnet": "./missing-cn"})
    with pytest.raises(FileNotFoundError, match=f"^model.controlnet: {tmp_path / 'missing-cn'} does not exist"):
        run_generate(cfg)
    assert ray.is_initialized() == ray_was_up  # failed before starting Ray
    assert not os.path.exists(os.path.join(out, MANIFEST))  # and before claiming the output


def test_run_that_wrote_no_part_does_not_lock_the_output(tmp_path):
    """A first run that died before its first shard (bad model, no GPU ...) left a `running`
    manifest: the corrected config must be allowed in, as no image of the old one exists."""
    out = str(tmp_path / "out")
    failed = make_cfg(out, seed=1)
    os.makedirs(out)
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(
        {"stage": "generate", "fingerprint": fingerprint(failed), "status": "running", "num_images": 10}).encode())
    corrected = make_cfg(out, seed=2)
    state = prepare_output(corrected)
    assert [s for s, _, _ in state.todo] == [0, 1, 2] and state.history == []


def test_temp_file_of_a_failed_write_never_matches_parquet_glob(tmp_path):
    target = tmp_path / "part-000000.parquet"
    (target / "in-the-way").mkdir(parents=True)  # the rename onto it fails, leaving the temp file
    with pytest.raises(storage.StorageError):
        storage.write_bytes(str(target), b"PAR1...")
    left = [n for n in os.listdir(tmp_path) if n != target.name]
    assert len(left) == 1 and storage.is_temp_name(left[0])
    assert not fnmatch.fnmatch(left[0], "*.parquet")  # duckdb's read_parquet('dir/*.parquet') skips it


def test_shard_is_written_while_the_next_is_diffused(tmp_path, monkeypatch):
    """An actor's two calls overlap (no timing): shard 0's write waits until shard 1 holds the
    generator, which only works if the generator is released before the write. Each call returns
    only after its own file is written."""
    cfg = make_cfg(str(tmp_path / "out"), num_images=8)
    os.makedirs(cfg.output)
    actor = ShardGenerator(cfg)
    in_generator = {0: threading.Event(), 4: threading.Event()}  # by first id of the shard
    real_diffuse, real_write = actor._diffuse_shard, storage.write_bytes

    def diffuse(rows, controls):
        in_generator[rows[0]["id"]].set()
        return real_diffuse(rows, controls)

    def write(uri, data, options=None):
        if uri.endswith(part_name(0)):
            assert in_generator[4].wait(300), "shard 1 never got the generator while shard 0 was written"
        real_write(uri, data, options)

    monkeypatch.setattr(actor, "_diffuse_shard", diffuse)
    monkeypatch.setattr(storage, "write_bytes", write)
    reports, errors = {}, []

    def call(shard, start, stop):
        try:
            reports[shard] = actor.generate_shard(shard, start, stop)
            assert os.path.isfile(os.path.join(cfg.output, part_name(shard)))  # written before the report
        except BaseException as e:
            errors.append(e)

    first = threading.Thread(target=call, args=(0, 0, 4))
    first.start()
    assert in_generator[0].wait(300)
    second = threading.Thread(target=call, args=(1, 4, 8))
    second.start()
    first.join(600), second.join(600)
    assert not errors, errors
    assert reports[1].start < reports[0].end  # shard 1 got the generator before shard 0's file was done
    _, rows = read_parts(cfg.output)
    assert sorted(r["id"] for r in rows) == list(range(8))


def test_failed_write_fails_the_run_and_is_not_reported(ray_cluster, tmp_path):
    """A write that fails (here: a folder in the way of the part's rename) fails its shard's task and
    the run, loudly, naming the file; the shard is not counted as written."""
    out = tmp_path / "out"
    (out / part_name(1) / "in-the-way").mkdir(parents=True)
    cfg = make_cfg(str(out), num_images=8, **{"compute.num_actors": 1})
    with pytest.raises(Exception, match=part_name(1)):
        run_generate(cfg)
    manifest = read_manifest(str(out))
    assert manifest["status"] == "failed" and part_name(1) in manifest["runs"][-1]["error"]
    assert manifest["images_present"] <= 4 and not os.path.isfile(out / part_name(1))
    _, rows = read_parts(str(out))
    assert {r["id"] for r in rows} <= {0, 1, 2, 3}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "synthetic")
    os.makedirs(out)
    # Leftovers of writers killed mid-write, old naming and new: the run must remove them.
    for name in (f".tmp-{uuid.uuid4().hex}-part-000001.parquet", storage.temp_name("part-000002.parquet")):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"PAR1 truncated")
    cfg = make_cfg(out)
    return cfg, run_generate(cfg)


def test_job_writes_every_id_once_with_labels(first_run):
    cfg, result = first_run
    assert (result.generated, result.shards_generated, result.shards_skipped) == (10, 3, 0)
    names, rows = read_parts(cfg.output)
    assert names == [part_name(s) for s in range(3)]
    # Every file a `*.parquet` glob sees (duckdb's does see hidden files) is a complete part.
    assert sorted(fnmatch.filter(os.listdir(cfg.output), "*.parquet")) == names
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
        # Diffusion rows carry their skeleton's visible face points (keypoints.py), NaN elsewhere.
        pose = HeadPose(**{k: r[f"pose_{k}"] for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")})
        np.testing.assert_allclose(np.asarray(r["keypoints"], np.float32), to_column(skeleton_keypoints(pose, 32, 32)),
                                   rtol=0, atol=1e-6)
    manifest = __import__("json").loads(storage.read_bytes(storage.join(cfg.output, MANIFEST)))
    assert manifest["status"] == "complete" and manifest["num_images"] == 10
    assert manifest["images_generated"] == 10 and manifest["config"]["seed"] == 7
    # Shard times come from the actors: each shard's own start < end.
    assert sorted(r.shard for r in result.shards) == [0, 1, 2]
    assert all(r.start < r.end and r.images == (2 if r.shard == 2 else 4) for r in result.shards)
    assert result.steady_images_per_second() > 0


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
    # The manifest totals what is present, and keeps every run, not just the last.
    manifest = read_manifest(cfg.output)
    assert (manifest["images_present"], manifest["shards_present"], manifest["images_dropped"]) == (10, 3, 0)
    runs = manifest["runs"]
    assert [(r["shards_generated"], r["shards_skipped"], r["images_generated"]) for r in runs] == \
        [(3, 0, 10), (0, 3, 0), (1, 2, 4)]
    assert all(r["status"] == "complete" and r["started_at"] <= r["finished_at"] and r["seconds"] >= 0 for r in runs)
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


def test_other_batch_size_is_refused_naming_it(first_run):
    """Image bytes depend on the batch size: a dataset is resumed or extended only at its own."""
    cfg, _ = first_run
    batch_2 = cfg.compute.model_copy(update={"batch_size": 2})
    for other in (cfg.model_copy(update={"compute": batch_2}),  # resume
                  cfg.model_copy(update={"compute": batch_2, "num_images": 14})):  # extend
        with pytest.raises(FileExistsError, match="compute.batch_size=4, this run has compute.batch_size=2"):
            run_generate(other)
    _, rows = read_parts(cfg.output)
    assert len(rows) >= 10


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


def _vocab_with_a_nan_name(tmp_path) -> tuple[str, str]:
    """A vocab where one name per gender carries a weight of 1e60: its prompt embedding overflows, so
    the real pipeline's image for those ids is NaN, and only for them."""
    import importlib.resources

    bad = "(Zed:1" + "0" * 60 + ")"
    data = yaml.safe_load((importlib.resources.files("synthfar_ray") / "data" / "vocab.yaml").read_text())
    for eth in data["ethnicities"].values():
        eth["countries"] = {"Atlantis": {"male": ["Zed", bad], "female": ["Zora", bad]}}
    path = tmp_path / "nan_vocab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path), bad


def test_non_finite_images_are_dropped_and_counted(ray_cluster, tmp_path):
    vocab, bad = _vocab_with_a_nan_name(tmp_path)
    cfg = make_cfg(str(tmp_path / "out"), num_images=8, **{"prompts.vocab": vocab, "compute.num_actors": 1})
    nan_ids = sorted(r["id"] for r in prompt_rows(cfg, range(8)) if r["name"] == bad)
    assert 0 < len(nan_ids) < 8
    result = run_generate(cfg)
    _, rows = read_parts(cfg.output)
    assert sorted(r["id"] for r in rows) == sorted(set(range(8)) - set(nan_ids))  # never written
    assert all(decode_image(r["image"]).std() > 1 for r in rows)
    assert result.dropped == len(nan_ids) and result.generated == 8 - len(nan_ids)
    assert sorted(i for r in result.shards for i in r.dropped_ids) == nan_ids  # in each shard's result
    manifest = read_manifest(cfg.output)
    assert manifest["dropped_ids"] == nan_ids and manifest["images_dropped"] == len(nan_ids)
    assert manifest["images_present"] == 8 - len(nan_ids) and manifest["runs"][-1]["images_dropped"] == len(nan_ids)
    again = run_generate(cfg)  # a shard with dropped ids is complete: the same seed gives the same NaN
    assert (again.generated, again.shards_skipped) == (0, 2)
    assert read_manifest(cfg.output)["dropped_ids"] == nan_ids


# ---------------------------------------------------------------------------------------------
# The procedural generator (ground-truth faces)

def test_procedural_rows_are_the_renderer_faces_with_their_truth(ray_cluster, tmp_path):
    from synthfar_ray.faces import FaceBatch, PoseBatch, RenderConfig, encode, face_seeds, render_faces
    from synthfar_ray.poses import sample_pose

    render = {"size": 48, "style": "photo", "label_noise": 0.3}
    cfg = make_cfg(str(tmp_path / "proc"), generator="procedural", render=render, num_images=24, shard_size=8)
    result = run_generate(cfg)
    assert result.generated == 24
    _, rows = read_parts(cfg.output)
    rows.sort(key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(24))
    assert {r["model"] for r in rows} == {"procedural/photo"} and {r["width"] for r in rows} == {48}
    # The same id is the same face as the renderer draws it from the prompt sampler's attributes.
    attrs = [sample_attributes(cfg.seed, i, cfg.prompts) for i in range(24)]
    poses = [sample_pose(cfg.seed, i, cfg.poses) for i in range(24)]
    images, truth = render_faces(FaceBatch.from_attributes(attrs), PoseBatch.from_poses(poses),
                                 RenderConfig(**render), face_seeds(cfg.seed, range(24)))
    assert [r["image"] for r in rows] == encode(images, RenderConfig(**render))
    assert [r["render_gender"] for r in rows] == truth["render_gender"].tolist()
    assert [r["render_ethnicity"] for r in rows] == truth["render_ethnicity"].tolist()
    # Labels are the prompt's; with 30 % label noise some pictures disagree with them.
    assert [r["gender"] for r in rows] == [GENDERS.index(a.gender) for a in attrs]
    flipped = sum(r["gender"] != r["render_gender"] for r in rows)
    assert 1 <= flipped <= 16
    assert "render_race7" not in rows[0]  # render.races7 off: the parts are as before the option
    # Resume: a second run makes nothing; the style is part of the fingerprint.
    assert run_generate(cfg).generated == 0
    other = make_cfg(cfg.output, generator="procedural", render={**render, "style": "synthetic"}, num_images=24,
                     shard_size=8)
    assert fingerprint(other) != fingerprint(cfg)
    with pytest.raises(FileExistsError, match="different config"):
        run_generate(other)


def test_procedural_races7_rows_carry_the_rendered_race(ray_cluster, tmp_path):
    """render.races7: each row carries the race its face shows (the renderer's render_race7), the
    option is part of the fingerprint, and off it leaves the fingerprint of earlier outputs as it was
    (2f197699c177589a: this config's fingerprint before the option existed)."""
    from synthfar_ray.faces import FaceBatch, PoseBatch, RenderConfig, face_seeds, rendered_attributes
    from synthfar_ray.generate import GenerateConfig
    from synthfar_ray.poses import sample_pose

    before = GenerateConfig(output=str(tmp_path / "x"), generator="procedural",
                            render={"style": "photo", "label_noise": 0.2}, num_images=10)
    assert fingerprint(before) == "2f197699c177589a"
    shifted = before.model_copy(update={"render": before.render.model_copy(update={
        "photo": before.render.photo.model_copy(update={"tint": (0.8, 0.6, 0.5)})})})
    assert fingerprint(shifted) != "2f197699c177589a"  # render.photo.tint counts once it is set
    render = {"size": 32, "label_noise": 0.3, "races7": True}
    cfg = make_cfg(str(tmp_path / "proc7"), generator="procedural", render=render, num_images=16, shard_size=8)
    assert fingerprint(cfg) != fingerprint(make_cfg(cfg.output, generator="procedural", num_images=16, shard_size=8,
                                                    render={**render, "races7": False}))
    assert run_generate(cfg).generated == 16
    _, rows = read_parts(cfg.output)
    rows.sort(key=lambda r: r["id"])
    attrs = [sample_attributes(cfg.seed, i, cfg.prompts) for i in range(16)]
    poses = [sample_pose(cfg.seed, i, cfg.poses) for i in range(16)]
    truth = rendered_attributes(FaceBatch.from_attributes(attrs), PoseBatch.from_poses(poses), RenderConfig(**render),
                                face_seeds(cfg.seed, range(16)))
    assert [r["render_race7"] for r in rows] == truth["render_race7"].tolist()


def test_procedural_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="poses.folder"):
        make_cfg(str(tmp_path), generator="procedural", **{"poses.folder": str(tmp_path)})
    # A diffusion config's fingerprint does not depend on the (unused) render settings.
    assert fingerprint(make_cfg(str(tmp_path))) == fingerprint(make_cfg(str(tmp_path), **{"render.size": 96}))


def test_procedural_vocab_with_unknown_hair_is_refused_before_ray(tmp_path):
    from synthfar_ray.faces import VocabError
    from synthfar_ray.prompts import _packaged_vocab_text

    vocab = yaml.safe_load(_packaged_vocab_text())
    vocab["hair"]["colors"] = [*vocab["hair"]["colors"], "neon green"]
    path = tmp_path / "vocab.yaml"
    path.write_text(yaml.safe_dump(vocab))
    cfg = make_cfg(str(tmp_path / "out"), generator="procedural", **{"prompts.vocab": str(path)})
    with pytest.raises(VocabError, match="neon green"):
        run_generate(cfg)
