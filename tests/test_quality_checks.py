"""Per-image and per-set quality checks (synthfar_ray/quality_checks.py) on real images and known cases."""

from __future__ import annotations

import numpy as np
import pytest

from synthfar_ray import quality_checks as qc
from synthfar_ray.faces import FACE_CENTRE, FACE_UNIT, RenderConfig, render_faces, sample_batch


def test_face_detector_finds_the_astronauts_face_and_nothing_in_noise():
    from skimage.data import astronaut  # a real photo that ships inside the scikit-image wheel

    image = astronaut()  # 512 x 512; Eileen Collins' face is at about x 180-270, y 70-160
    boxes = qc.detect_faces(image)
    assert len(boxes) == 1, boxes
    x, y, w, h = boxes[0] * 512
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 180, boxes[0] * 512
    noise = np.random.default_rng(0).integers(0, 256, (10, 128, 128, 3), dtype=np.uint8)
    assert sum(len(qc.detect_faces(n)) for n in noise) == 0


def test_detections_on_procedural_faces_sit_where_the_pose_put_the_head():
    """The cartoon faces are found often enough to measure (about half at 64 px), and every box found
    is near the head the pose asked for."""
    attrs, poses, seeds = sample_batch(64)
    images, _ = render_faces(attrs, poses, RenderConfig(size=64), seeds)
    errors = []
    for i, image in enumerate(images):
        boxes = qc.detect_faces(image)
        if len(boxes):
            head = qc.expected_head(poses.scale[i], poses.offset_x[i], poses.offset_y[i], FACE_CENTRE, FACE_UNIT)
            errors.append(qc.pose_adherence(boxes[0], head)[0])
    assert len(errors) >= 20, len(errors)
    assert np.median(errors) < 0.5, errors  # centre error in head half-widths


def test_pose_adherence_moves_with_the_box():
    head = qc.expected_head(1.0, 0.0, 0.0)
    unit = head[2]
    centred = np.array([head[0] - unit, head[1] - unit, 2 * unit, 2 * unit])
    assert qc.pose_adherence(centred, head) == pytest.approx((0.0, 1.0), abs=1e-6)
    shifted = centred + np.array([unit, 0, 0, 0])
    assert qc.pose_adherence(shifted, head)[0] == pytest.approx(1.0, abs=1e-6)


def test_blank_images_are_flagged_and_faces_are_not():
    attrs, poses, seeds = sample_batch(4)
    images, _ = render_faces(attrs, poses, RenderConfig(size=64), seeds)
    assert not any(qc.is_blank(i) for i in images)
    assert qc.is_blank(np.full((64, 64, 3), 17, np.uint8))
    flat = np.full((64, 64, 3), 200, np.uint8)
    flat[::7, ::5] = 201  # one grey level of dither is still blank
    assert qc.is_blank(flat)


def test_phash_finds_near_duplicates_and_keeps_distinct_faces_apart():
    attrs, poses, seeds = sample_batch(40)
    images, _ = render_faces(attrs, poses, RenderConfig(size=64), seeds)
    ids = np.arange(100, 140)
    # id 140 is image 3 re-encoded with a little noise, id 141 is image 7 exactly
    rng = np.random.default_rng(1)
    noisy = np.clip(images[3].astype(int) + rng.integers(-3, 4, images[3].shape), 0, 255).astype(np.uint8)
    hashes = [qc.phash(i) for i in images] + [qc.phash(noisy), qc.phash(images[7])]
    thumbs = [qc.thumbnail(i) for i in images] + [qc.thumbnail(noisy), qc.thumbnail(images[7])]
    dup = qc.near_duplicates(np.append(ids, [140, 141]), np.array(hashes), max_distance=3, thumbs=thumbs)
    assert dup == {140: 103, 141: 107}, dup  # and no two different faces
    assert qc.hamming(hashes[0], hashes[0]) == 0
    with pytest.raises(ValueError, match="max_distance"):
        qc.near_duplicates(ids, np.array(hashes[:40]), max_distance=5)


def test_near_duplicate_groups_are_headed_by_the_smallest_id():
    base = 0x0F0F_0F0F_0F0F_0F0F
    hashes = np.array([base, base ^ 1, base ^ 3, ~base & 0x7FFF_FFFF_FFFF_FFFF], dtype=np.int64)
    dup = qc.near_duplicates(np.array([9, 4, 7, 1]), hashes, max_distance=2)
    assert dup == {7: 4, 9: 4}


def test_frechet_distance_matches_the_closed_form_and_is_zero_for_one_set():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(loc=[2.0, 0.0, 0.0], scale=[1.0, 1.0, 3.0], size=(4000, 3))
    # independent axes: |dmu|^2 + sum (sa - sb)^2 over the per-axis sds = 4 + (1 - 3)^2 = 8
    assert qc.frechet_distance(a, b) == pytest.approx(8.0, rel=0.05)
    assert qc.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same width"):
        qc.frechet_distance(a, b[:, :2])


def test_mean_pairwise_distance_and_auc():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert qc.mean_pairwise_distance(x) == pytest.approx(10 / 3)
    assert np.isnan(qc.mean_pairwise_distance(x[:1]))
    assert qc.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == pytest.approx(0.75)
    assert qc.auc(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)
    assert np.isnan(qc.auc(np.array([1.0]), np.array([True])))


def test_the_colour_check_rejects_different_faces_whose_grey_hashes_collide():
    """Two different procedural faces of the same framing can share a grey-level hash; their colour
    thumbnails tell them apart (the demo's 21 hash-only matches differed by 17-60 grey levels, true
    copies by about 1)."""
    base = np.full((64, 64, 3), 120, np.uint8)
    base[16:48, 20:44] = (200, 150, 120)  # a "face" on a plain background
    other = base.copy()
    other[:, :, 1] = np.where(other[:, :, 1] == 120, 60, other[:, :, 1])  # same shapes, another background colour
    h = [qc.phash(base), qc.phash(other)]
    assert qc.hamming(h[0], h[1]) <= 3  # the grey hash cannot tell them apart
    ids = np.array([1, 2])
    assert qc.near_duplicates(ids, np.array(h), 3) == {2: 1}
    assert qc.near_duplicates(ids, np.array(h), 3, [qc.thumbnail(base), qc.thumbnail(other)]) == {}
