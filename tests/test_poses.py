"""Parametric head poses rendered as OpenPose face skeletons, and folders of pose images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from synthfar_ray import storage
from synthfar_ray.images import encode_jpeg
from synthfar_ray.poses import (
    KEYPOINT_INDEX,
    LIMB_DIM,
    LIMBS,
    OPENPOSE_COLORS,
    HeadPose,
    PoseConfig,
    PoseFolder,
    face_keypoints,
    hidden_keypoints,
    render_pose,
    sample_pose,
)

FRONTAL = HeadPose(yaw=0, pitch=0, roll=0, scale=1, offset_x=0, offset_y=0)


def _pose(**kw) -> HeadPose:
    return HeadPose(**{**FRONTAL.__dict__, **kw})


# -------------------------------------------------------------------------------- geometry


def test_frontal_pose_is_symmetric():
    k = face_keypoints(FRONTAL, 512, 512)
    assert set(k) == {"neck", "nose", "right_eye", "left_eye", "right_ear", "left_ear"}
    nose_x, nose_y = k["nose"]
    assert nose_x == pytest.approx(256)
    # Eyes and ears mirror about the nose's x, at equal heights.
    assert nose_x - k["right_eye"][0] == pytest.approx(k["left_eye"][0] - nose_x)
    assert nose_x - k["right_ear"][0] == pytest.approx(k["left_ear"][0] - nose_x)
    assert k["right_eye"][1] == pytest.approx(k["left_eye"][1])
    assert k["right_ear"][1] == pytest.approx(k["left_ear"][1])
    # Subject's right appears on the image left; ears outside the eyes; eyes above the nose.
    assert k["right_ear"][0] < k["right_eye"][0] < nose_x < k["left_eye"][0] < k["left_ear"][0]
    assert k["right_eye"][1] < nose_y
    # Neck straight below the nose, well below the face but inside the frame.
    assert k["neck"][0] == pytest.approx(nose_x)
    assert nose_y + 100 < k["neck"][1] < 512
    assert hidden_keypoints(FRONTAL) == frozenset()


@pytest.mark.parametrize("yaw", [15.0, 30.0])
def test_yaw_turns_nose_toward_its_side(yaw):
    neck_x = face_keypoints(FRONTAL, 512, 512)["neck"][0]
    right = face_keypoints(_pose(yaw=yaw), 512, 512)
    left = face_keypoints(_pose(yaw=-yaw), 512, 512)
    assert right["nose"][0] > neck_x + 10 and left["nose"][0] < neck_x - 10
    assert right["nose"][0] - neck_x == pytest.approx(neck_x - left["nose"][0])
    # Turning right shortens the image-right side of the face (the near side gets wider).
    r = right
    assert (r["left_eye"][0] - r["nose"][0]) < (r["nose"][0] - r["right_eye"][0])
    assert right["neck"] == face_keypoints(FRONTAL, 512, 512)["neck"]  # the body does not turn


def test_large_yaw_hides_far_ear_only():
    assert hidden_keypoints(_pose(yaw=20)) == frozenset()
    assert hidden_keypoints(_pose(yaw=35)) == {"left_ear"}
    assert hidden_keypoints(_pose(yaw=-35)) == {"right_ear"}
    img = render_pose(_pose(yaw=35), 512, 512)
    ear_color = np.array(OPENPOSE_COLORS[KEYPOINT_INDEX["left_ear"]])
    limb_color = (np.array(OPENPOSE_COLORS[16]) * LIMB_DIM).astype(int)
    assert not np.all(img == ear_color, axis=-1).any()
    assert not np.all(img == limb_color, axis=-1).any()
    # The near ear is still drawn.
    x, y = face_keypoints(_pose(yaw=35), 512, 512)["right_ear"]
    assert tuple(img[round(y), round(x)]) == OPENPOSE_COLORS[KEYPOINT_INDEX["right_ear"]]


def test_pitch_moves_nose_up_when_looking_up():
    up = face_keypoints(_pose(pitch=15), 512, 512)
    down = face_keypoints(_pose(pitch=-15), 512, 512)
    front = face_keypoints(FRONTAL, 512, 512)
    assert up["nose"][1] < front["nose"][1] < down["nose"][1]
    assert up["nose"][0] == pytest.approx(front["nose"][0])


@pytest.mark.parametrize("roll", [-10.0, 7.5, 25.0])
def test_roll_rotates_eye_line_by_roll_angle(roll):
    k = face_keypoints(_pose(roll=roll), 512, 512)
    (xr, yr), (xl, yl) = k["right_eye"], k["left_eye"]
    angle = math.degrees(math.atan2(-(yl - yr), xl - xr))  # counter-clockwise, y pointing down
    assert angle == pytest.approx(roll, abs=1e-9)
    # Eye distance is unchanged by roll.
    f = face_keypoints(FRONTAL, 512, 512)
    assert math.dist(k["right_eye"], k["left_eye"]) == pytest.approx(math.dist(f["right_eye"], f["left_eye"]))


def test_scale_and_offset():
    w, h = 640, 480
    base = face_keypoints(FRONTAL, w, h)
    big = face_keypoints(_pose(scale=1.2), w, h)
    shifted = face_keypoints(_pose(offset_x=0.05, offset_y=-0.1), w, h)
    # Scaling is about the head centre: every distance grows by the scale.
    assert math.dist(big["left_ear"], big["right_ear"]) == pytest.approx(1.2 * math.dist(base["left_ear"], base["right_ear"]))
    assert math.dist(big["nose"], big["neck"]) == pytest.approx(1.2 * math.dist(base["nose"], base["neck"]))
    for name in base:
        assert shifted[name][0] == pytest.approx(base[name][0] + 0.05 * w)
        assert shifted[name][1] == pytest.approx(base[name][1] - 0.1 * h)
    # Face size follows the shorter side, so a wide frame gives the same face as a square one.
    square = face_keypoints(FRONTAL, h, h)
    assert math.dist(base["left_eye"], base["right_eye"]) == pytest.approx(math.dist(square["left_eye"], square["right_eye"]))


# -------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [(512, 512), (64, 64), (96, 80)])
def test_render_size_dtype_and_keypoint_colours(size):
    w, h = size
    pose = _pose(yaw=10, roll=5)
    img = render_pose(pose, w, h)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [0, 0, 0]  # black background
    for name, (x, y) in face_keypoints(pose, w, h).items():
        assert tuple(img[round(y), round(x)]) == OPENPOSE_COLORS[KEYPOINT_INDEX[name]], name
    # Every limb's (dimmed) colour appears somewhere: at 512 px between the joints.
    if w == 512:
        k = face_keypoints(pose, w, h)
        for a, b, limb in LIMBS:
            mx, my = (k[a][0] + k[b][0]) / 2, (k[a][1] + k[b][1]) / 2
            expected = tuple(int(c * LIMB_DIM) for c in OPENPOSE_COLORS[limb])
            assert tuple(img[round(my), round(mx)]) == expected, (a, b)


def test_strokes_scale_with_image_size():
    def drawn_fraction(w):
        return (render_pose(FRONTAL, w, w).sum(-1) > 0).mean()

    small, large = drawn_fraction(128), drawn_fraction(512)
    assert small > 0 and large > 0
    # Same look at both sizes: the drawn share of the frame stays about the same.
    assert 0.7 < small / large < 1.4


def test_render_off_frame_pose_does_not_fail():
    img = render_pose(_pose(offset_x=0.5, offset_y=0.5, scale=2.0), 64, 64)
    assert img.shape == (64, 64, 3)


# --------------------------------------------------------------------------------- sampling


def test_sample_pose_deterministic_and_in_range():
    cfg = PoseConfig()
    poses = [sample_pose(5, i, cfg) for i in range(300)]
    assert poses[57] == sample_pose(5, 57, cfg)
    assert [sample_pose(6, i, cfg) for i in range(5)] != poses[:5]
    for field in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y"):
        lo, hi = getattr(cfg, field)
        values = np.array([getattr(p, field) for p in poses])
        assert values.min() >= lo and values.max() <= hi
        assert values.max() - values.min() > 0.8 * (hi - lo)  # spread over the range
    fixed = PoseConfig(yaw=(20, 20), scale=(1, 1))
    p = sample_pose(0, 3, fixed)
    assert p.yaw == 20 and p.scale == 1


def test_pose_config_validation():
    with pytest.raises(ValueError, match="lo <= hi"):
        PoseConfig(yaw=(10, -10))
    with pytest.raises(ValueError, match="scale must be > 0"):
        PoseConfig(scale=(0, 1))
    with pytest.raises(ValueError, match="within"):
        PoseConfig(pitch=(-120, 0))
    with pytest.raises(ValueError, match="Extra inputs"):
        PoseConfig(zoom=(1, 2))


# ------------------------------------------------------------------------------ pose folders


def _write_poses(folder, n: int, size: int = 128) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        img = render_pose(_pose(yaw=-30 + 15 * i), size, size)
        Image.fromarray(img).save(folder / f"pose_{i:02d}.png")
        images.append(img)
    (folder / "notes.txt").write_text("not an image")
    return images


def test_pose_folder_picks_seeded_resized_images(tmp_path):
    images = _write_poses(tmp_path / "poses", 5)
    folder = PoseFolder(str(tmp_path / "poses"), None, width=64, height=96)
    assert len(folder) == 5
    name, img = folder.pick(1, 57)
    assert name.endswith(".png") and img.shape == (96, 64, 3) and img.dtype == np.uint8
    assert folder.pick(1, 57)[0] == name
    again = PoseFolder(str(tmp_path / "poses"), None, width=64, height=96)
    assert again.pick(1, 57)[0] == name
    names = {folder.pick(1, i)[0] for i in range(60)}
    assert names == {f"pose_{i:02d}.png" for i in range(5)}
    # Same size -> the file's pixels unchanged.
    same = PoseFolder(str(tmp_path / "poses"), None, width=128, height=128)
    name, img = same.pick(2, 0)
    assert np.array_equal(img, images[int(name[5:7])])


def test_pose_folder_empty_or_missing_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"pose folder .*empty has no PNG/JPEG images"):
        PoseFolder(str(tmp_path / "empty"), None, 64, 64)
    with pytest.raises(ValueError, match=r"pose folder .*nowhere does not exist"):
        PoseFolder(str(tmp_path / "nowhere"), None, 64, 64)


def test_pose_folder_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    uri = storage.join(bucket, "poses")
    for i in range(3):
        img = render_pose(_pose(yaw=-20 + 20 * i), 64, 64)
        storage.write_bytes(storage.join(uri, f"p{i}.jpg"), encode_jpeg(img), opts)
    folder = PoseFolder(uri, opts, width=32, height=32)
    assert len(folder) == 3
    name, img = folder.pick(0, 1)
    assert name in {"p0.jpg", "p1.jpg", "p2.jpg"} and img.shape == (32, 32, 3)
    assert img.max() > 100  # the skeleton survived the round trip
