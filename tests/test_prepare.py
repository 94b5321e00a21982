"""`synthfar prepare`: a training-resolution copy keeps every row, column, split and the row order,
resumes, refuses another dataset's folder, and trains; crops belong to the prepare step."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_train import write_fixture

from synthfar_ray.errors import UserError
from synthfar_ray.prepare import MANIFEST, PrepareConfig, PrepareError, run_prepare
from synthfar_ray.train import TrainConfig, check_inputs, run_train


def _table(folder: str):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    return [pq.read_table(os.path.join(folder, f)) for f in files]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    src, out = str(root / "src"), str(root / "out")
    write_fixture(src, 240, seed=3, size=96, files=3)
    manifest = run_prepare(PrepareConfig(source=src, output=out, size=40, quality=92))
    return {"root": root, "src": src, "out": out, "manifest": manifest}


def test_copy_keeps_rows_columns_and_order(prepared):
    src, out = _table(prepared["src"]), _table(prepared["out"])
    assert len(src) == len(out) == 3  # one part per source file, in the source's order
    for a, b in zip(src, out):
        assert a.schema == b.schema
        for name in a.column_names:
            if name not in ("image", "width", "height"):
                assert a.column(name).equals(b.column(name)), name
        sizes = [Image.open(io.BytesIO(d)).size for d in b.column("image").to_pylist()]
        assert set(sizes) == {(40, 40)}
        assert set(b.column("width").to_pylist()) == {40} and set(b.column("height").to_pylist()) == {40}
        assert sum(map(len, b.column("image").to_pylist())) < sum(map(len, a.column("image").to_pylist())) / 2
    m = json.load(open(os.path.join(prepared["out"], MANIFEST)))
    assert (m["stage"], m["status"], m["size"], m["quality"], m["num_rows"]) == ("prepare", "complete", 40, 92, 240)
    assert m["source"] == prepared["src"] and m["source_manifest"] == {"stage": "fixture", "rows": 240}


def test_rerun_resumes_and_other_settings_are_refused(prepared):
    out = prepared["out"]
    os.remove(os.path.join(out, "part-000001.parquet"))  # as if the job died before this part
    again = run_prepare(PrepareConfig(source=prepared["src"], output=out, size=40, quality=92))
    assert again["parts_written_now"] == 1 and again["num_rows"] == 240
    with pytest.raises(PrepareError, match="size 40.*overwrite"):
        run_prepare(PrepareConfig(source=prepared["src"], output=out, size=32))
    with pytest.raises(PrepareError, match="another dataset"):  # a folder of other Parquet files
        run_prepare(PrepareConfig(source=out, output=prepared["src"], size=32))


def test_center_crop_in_source_pixels(prepared, tmp_path):
    out = str(tmp_path / "cropped")
    m = run_prepare(PrepareConfig(source=prepared["src"], output=out, size=24, center_crop=48))
    img = np.asarray(Image.open(io.BytesIO(_table(out)[0].column("image")[0].as_py())))
    assert img.shape == (24, 24, 3) and "centre 48 px" in m["images"]


def test_center_crop_moves_the_keypoints_into_the_crops_frame(prepared, tmp_path):
    """keypoints.py stores points in the frame of the image's centre square; after --center-crop that
    frame is the crop: a 64 x 48 image's square is x 8..56, a 32 px crop x 16..48, y 8..40."""
    import pyarrow as pa

    from synthfar_ray.images import encode_jpeg
    from synthfar_ray.keypoints import NUM_KEYPOINTS

    table = _table(prepared["src"])[0].slice(0, 2)
    image = encode_jpeg(np.zeros((48, 64, 3), np.uint8))
    points = np.full((NUM_KEYPOINTS, 2), np.nan, np.float32)
    points[0], points[1] = (0.5, 0.5), (0.0, 0.0)  # the square's centre and its top-left corner
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array([image, image], pa.binary()))
    table = table.append_column("keypoints", pa.array([points.ravel().tolist(), None], pa.list_(pa.float32())))
    # A real set's sparse points (ingest's keypoints_real) move the same way.
    table = table.append_column("keypoints_real", pa.array([None, [0.5, 0.5] * 5], pa.list_(pa.float32())))
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    pq.write_table(table, src / "part-000000.parquet")
    run_prepare(PrepareConfig(source=str(src), output=out, size=16, center_crop=32))
    moved = _table(out)[0].column("keypoints").to_pylist()
    got = np.asarray(moved[0], np.float64).reshape(NUM_KEYPOINTS, 2)
    np.testing.assert_allclose(got[:2], [[0.5, 0.5], [(8 - 16) / 32, (0 - 8) / 32]], atol=1e-6)
    assert np.isnan(got[2:]).all() and moved[1] is None
    real = _table(out)[0].column("keypoints_real").to_pylist()
    assert real[0] is None and real[1] == pytest.approx([0.5, 0.5] * 5)  # the centre stays the centre


def test_training_on_the_copy(prepared, tmp_path):
    base = dict(name="prep", storage_path=str(tmp_path / "runs"), plan="real", real=prepared["out"],
                model={"backbone": "tiny"}, image_size=32, batch_size=16, lr=5e-3, warmup_steps=2, amp="auto",
                steps=6, val_every=6, log_every=3, num_workers=1, use_gpu=False, cpus_per_worker=0.5,
                data_cpus=0.5, shuffle_buffer=32, failure_max=0)
    with pytest.raises(UserError, match="center_crop=30.*synthfar prepare --center-crop 30"):
        check_inputs(TrainConfig(**base, center_crop=30))
    result = run_train(TrainConfig(**base))
    assert result.steps == 6 and np.isfinite(result.metrics["loss"])
    assert "val_gender_acc" in result.metrics
