"""The procedural face renderer (synthfar_ray.faces): determinism, validation, label noise, visible
labels, the style gap and the head pose. Real rendering with fixed seeds; ~20-40 s on 2 cores.

Probe numbers measured when the tests were written (2000 faces from sample_batch(run_seed=5), 64 px,
16x16 pixel features, logistic regression C=0.05 on 1500, scored on the other 500):
gender 0.67 held-out synthetic / 0.59 photo; ethnicity 0.68 / 0.51; ridge age MAE 13.4 years
against 21.9 for the median. The tolerances below leave room around those numbers.

The calibration against the issue's targets uses a CNN and takes ~2 min, so it is a script, not a
test: `python bench/faces.py --calibrate` (a 4-block CNN, 600 steps on 3000 synthetic-style faces,
1000 held out) measured gender 0.87, ethnicity 0.77, age MAE 7.9 years on synthetic style and
0.70 / 0.51 / 17.5 on photo style (targets: gender 80-95 %, ethnicity 55-85 %).
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from synthfar_ray.faces import (
    HAIR_COLORS,
    HAIR_LENGTHS,
    FaceBatch,
    PhotoStyle,
    PoseBatch,
    RenderConfig,
    encode,
    face_seeds,
    render_faces,
    rendered_attributes,
    sample_batch,
)
from synthfar_ray.images import decode_image
from synthfar_ray.labels import ETHNICITIES, age_to_bin

PROBE_N, PROBE_TRAIN = 2000, 1500


def _one_face(n: int, *, age=30.0, gender=0, ethnicity=0, hair_length=0, hair_color="brown", hair_style="straight") -> FaceBatch:
    return FaceBatch(age=np.full(n, float(age)), gender=np.full(n, gender), ethnicity=np.full(n, ethnicity),
                     hair_length=np.full(n, hair_length), hair_color=[hair_color] * n, hair_style=[hair_style] * n)


def _poses(n: int, **fields) -> PoseBatch:
    base = PoseBatch.frontal(n)
    values = {f: np.asarray(fields.get(f, getattr(base, f)), dtype=np.float64) * np.ones(n) for f in
              ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")}
    return PoseBatch(**values)


# ------------------------------------------------------------------------------ determinism, API


@pytest.mark.parametrize("style", ["synthetic", "photo"])
def test_same_seed_same_bytes_whatever_the_batch(style):
    attrs, poses, seeds = sample_batch(8, run_seed=3)
    cfg = RenderConfig(style=style, label_noise=0.3)
    batch, rendered = render_faces(attrs, poses, cfg, seeds)
    again, rendered_again = render_faces(attrs, poses, cfg, seeds)
    assert np.array_equal(batch, again)
    for i in range(8):
        single, r1 = render_faces(attrs.take([i]), poses.take([i]), cfg, seeds[[i]])
        assert np.array_equal(single[0], batch[i]), f"image {i} depends on its batch"
        for k in rendered:
            assert r1[k][0] == rendered[k][i]
    # A different batch composition (reversed, with other ids around) changes nothing either.
    more_attrs, more_poses, more_seeds = sample_batch(12, run_seed=3)
    order = np.arange(12)[::-1]
    mixed, _ = render_faces(more_attrs.take(order), more_poses.take(order), cfg, more_seeds[order])
    assert np.array_equal(mixed[::-1][:8], batch)
    assert encode(batch, cfg) == encode(again, cfg)
    # Another seed is another face.
    other, _ = render_faces(attrs, poses, cfg, seeds + 1)
    assert all(not np.array_equal(other[i], batch[i]) for i in range(8))


@pytest.mark.parametrize("size", [32, 64, 100])
def test_shapes_dtypes_and_rendered_columns(size):
    attrs, poses, seeds = sample_batch(5, run_seed=1)
    images, rendered = render_faces(attrs, poses, RenderConfig(size=size, style="photo"), seeds)
    assert images.shape == (5, size, size, 3) and images.dtype == np.uint8
    assert set(rendered) == {"render_age", "render_gender", "render_ethnicity"}
    assert rendered["render_age"].dtype == np.float32
    assert rendered["render_gender"].dtype == np.int8 and rendered["render_ethnicity"].dtype == np.int8
    # Without label noise the picture shows its labels.
    assert np.array_equal(rendered["render_age"], attrs.age.astype(np.float32))
    assert np.array_equal(rendered["render_gender"], attrs.gender)
    assert np.array_equal(rendered["render_ethnicity"], attrs.ethnicity)
    assert images.std() > 10  # not a blank canvas


def test_photo_at_strength_zero_is_the_synthetic_face():
    """Both styles draw the same geometry from the same seed: with every photo effect off the two
    images are identical, so a style gap is the style and nothing else."""
    attrs, poses, seeds = sample_batch(6, run_seed=2)
    synthetic, _ = render_faces(attrs, poses, RenderConfig(style="synthetic"), seeds)
    photo0, _ = render_faces(attrs, poses, RenderConfig(style="photo", photo=PhotoStyle(strength=0)), seeds)
    photo, _ = render_faces(attrs, poses, RenderConfig(style="photo"), seeds)
    assert np.array_equal(photo0, synthetic)
    assert np.abs(photo.astype(int) - synthetic).mean() > 10


def test_photo_tint_and_contrast_shift_every_photo_image_the_same_way():
    """The systematic shift (photo.tint, photo.contrast): off by default (the same bytes as before
    the knobs existed: the default path skips them); on, every image is darker in blue than in red
    and flatter, by the same factors; strength 0 still gives the synthetic face."""
    attrs, poses, seeds = sample_batch(8, run_seed=3)
    base, _ = render_faces(attrs, poses, RenderConfig(style="photo", photo=PhotoStyle(tint=(1, 1, 1), contrast=1)), seeds)
    default, _ = render_faces(attrs, poses, RenderConfig(style="photo"), seeds)
    assert np.array_equal(base, default)
    shifted, _ = render_faces(attrs, poses, RenderConfig(style="photo", photo=PhotoStyle(tint=(0.8, 0.62, 0.5), contrast=0.6)), seeds)
    ratio = shifted.reshape(8, -1, 3).mean(axis=1) / default.reshape(8, -1, 3).mean(axis=1)
    assert (ratio[:, 2] < ratio[:, 0] - 0.1).all(), ratio  # blue drops more than red, in every image
    assert (shifted.reshape(8, -1).std(axis=1) < 0.75 * default.reshape(8, -1).std(axis=1)).all()
    synthetic, _ = render_faces(attrs, poses, RenderConfig(style="synthetic"), seeds)
    zero, _ = render_faces(attrs, poses, RenderConfig(style="photo", photo=PhotoStyle(strength=0, tint=(0.8, 0.6, 0.5))), seeds)
    assert np.array_equal(zero, synthetic)
    with pytest.raises(ValidationError, match="tint"):
        PhotoStyle(tint=(0.8, 0.0, 0.5))


def test_encode_uses_the_style_quality():
    attrs, poses, seeds = sample_batch(6, run_seed=4)
    cfg_photo = RenderConfig(style="photo")
    images, _ = render_faces(attrs, poses, cfg_photo, seeds)
    photo_jpegs = encode(images, cfg_photo)
    synthetic_jpegs = encode(images, RenderConfig(style="synthetic"))
    assert len(photo_jpegs) == 6 and all(j[:2] == b"\xff\xd8" for j in photo_jpegs)
    assert decode_image(photo_jpegs[0]).shape == (64, 64, 3)
    assert sum(map(len, photo_jpegs)) < 0.7 * sum(map(len, synthetic_jpegs))  # q 40 vs 95
    with pytest.raises(ValueError, match="uint8"):
        encode(images.astype(np.float32), cfg_photo)


def test_vocab_hair_is_known_to_the_renderer():
    """Every hair length and colour the packaged vocab can produce has a drawing."""
    from synthfar_ray.prompts import load_vocab

    vocab = load_vocab()
    assert tuple(vocab.hair.lengths) == HAIR_LENGTHS
    colors = set(vocab.hair.colors) | set(vocab.hair.grey_colors)
    for eth in vocab.ethnicities.values():
        colors |= set(eth.hair_colors or ())
    assert colors <= set(HAIR_COLORS), colors - set(HAIR_COLORS)


def test_face_seeds():
    a = face_seeds(7, [0, 1, 2, 3])
    assert a.dtype == np.int64 and (a >= 0).all() and len(set(a.tolist())) == 4
    assert np.array_equal(a, face_seeds(7, [0, 1, 2, 3]))
    assert face_seeds(7, [2])[0] == a[2]  # a pure function of (run_seed, id)
    assert face_seeds(8, [2])[0] != a[2]
    with pytest.raises(ValueError, match=">= 0"):
        face_seeds(7, [-1])


def _bad(field: str, value, n: int = 3):
    attrs = _one_face(n)
    poses = PoseBatch.frontal(n)
    seeds = np.arange(n)
    if field.startswith("FaceBatch."):
        name = field.split(".")[1]
        vals = {k: getattr(attrs, k) for k in ("age", "gender", "ethnicity", "hair_length", "hair_color", "hair_style")}
        arr = vals[name]
        if isinstance(arr, list):
            arr = list(arr)
            arr[1] = value
        else:
            arr = np.array(arr, dtype=type(value) if isinstance(value, float) else arr.dtype)
            arr[1] = value
        vals[name] = arr
        attrs = FaceBatch(**vals)
    elif field.startswith("PoseBatch."):
        name = field.split(".")[1]
        arr = np.array(getattr(poses, name), dtype=np.float64)
        arr[1] = value
        poses = PoseBatch(**{k: (arr if k == name else getattr(poses, k)) for k in
                             ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")})
    else:
        seeds = value
    return attrs, poses, seeds


@pytest.mark.parametrize("field,value", [
    ("FaceBatch.age", -1.0),
    ("FaceBatch.age", float("nan")),
    ("FaceBatch.gender", 2),
    ("FaceBatch.ethnicity", 5),
    ("FaceBatch.hair_length", 6),
    ("FaceBatch.hair_color", "purple"),
    ("PoseBatch.yaw", 120.0),
    ("PoseBatch.scale", 0.0),
    ("PoseBatch.offset_y", 0.9),
    ("seeds", np.arange(2)),
    ("seeds", np.array([0.5, 1.0, 2.0])),
])
def test_invalid_inputs_name_the_field(field, value):
    attrs, poses, seeds = _bad(field, value)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        render_faces(attrs, poses, RenderConfig(), seeds)


def test_invalid_shapes_and_config():
    attrs = _one_face(3)
    with pytest.raises(ValueError, match=r"PoseBatch\.yaw must have shape \(3,\)"):
        render_faces(attrs, PoseBatch.frontal(2), RenderConfig(), np.arange(3))
    with pytest.raises(ValueError, match=r"hair_color must have 3 entries"):
        render_faces(FaceBatch(attrs.age, attrs.gender, attrs.ethnicity, attrs.hair_length, ["brown"]),
                     PoseBatch.frontal(3), RenderConfig(), np.arange(3))
    with pytest.raises(ValueError, match="hair_length"):
        FaceBatch.from_attributes([type("A", (), {"hair_length": "waist", "gender": "male", "ethnicity": "white"})()])
    for bad in ({"size": 16}, {"size": 512}, {"style": "oil"}, {"label_noise": 1.5},
                {"label_noise": {"hair": 0.1}}, {"photo": {"blurr": 1}}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            RenderConfig(**bad)


# ------------------------------------------------------------------------------ label noise


def test_label_noise_rate_and_ground_truth():
    attrs, poses, seeds = sample_batch(2000, run_seed=9)
    clean = rendered_attributes(attrs, poses, RenderConfig(), seeds)
    assert np.array_equal(clean["render_gender"], attrs.gender)
    assert np.array_equal(clean["render_ethnicity"], attrs.ethnicity)
    assert np.array_equal(clean["render_age"], attrs.age.astype(np.float32))

    noisy = rendered_attributes(attrs, poses, RenderConfig(label_noise=0.2), seeds)
    age_changed = age_to_bin(noisy["render_age"]) != age_to_bin(attrs.age)
    gender_changed = noisy["render_gender"] != attrs.gender
    eth_changed = noisy["render_ethnicity"] != attrs.ethnicity
    for name, changed in (("age", age_changed), ("gender", gender_changed), ("ethnicity", eth_changed)):
        assert abs(changed.mean() - 0.2) < 0.04, f"{name}: {changed.mean():.3f} of rows changed, set 0.2 (+-0.04)"
    # A changed age is an age in another bin, within the sampler's range; an unchanged one is the label.
    assert (noisy["render_age"] != attrs.age.astype(np.float32)).sum() == age_changed.sum()
    assert noisy["render_age"].min() >= 0 and noisy["render_age"].max() < 85
    assert ((noisy["render_ethnicity"] >= 0) & (noisy["render_ethnicity"] < len(ETHNICITIES))).all()

    # Per-attribute rates; a higher rate changes a superset of the rows a lower rate changes.
    only_gender = rendered_attributes(attrs, poses, RenderConfig(label_noise={"gender": 0.4}), seeds)
    assert np.array_equal(only_gender["render_ethnicity"], attrs.ethnicity)
    assert np.array_equal(only_gender["render_age"], attrs.age.astype(np.float32))
    changed_04 = only_gender["render_gender"] != attrs.gender
    assert abs(changed_04.mean() - 0.4) < 0.045
    assert (changed_04 | ~gender_changed).all()

    # render_faces reports the same ground truth.
    _, rendered = render_faces(attrs.take(slice(0, 40)), poses.take(slice(0, 40)), RenderConfig(label_noise=0.2), seeds[:40])
    for k in rendered:
        assert np.array_equal(rendered[k], noisy[k][:40])


def test_label_noise_changes_the_picture_not_the_identity():
    attrs, poses, seeds = sample_batch(60, run_seed=12)
    clean, _ = render_faces(attrs, poses, RenderConfig(), seeds)
    noisy, rendered = render_faces(attrs, poses, RenderConfig(label_noise=0.3), seeds)
    kept = ((rendered["render_gender"] == attrs.gender) & (rendered["render_ethnicity"] == attrs.ethnicity)
            & (rendered["render_age"] == attrs.age.astype(np.float32)))
    assert 0 < kept.sum() < 60
    assert all(np.array_equal(noisy[i], clean[i]) for i in np.flatnonzero(kept))
    assert all(not np.array_equal(noisy[i], clean[i]) for i in np.flatnonzero(~kept))


# ------------------------------------------------------------------------------ visible labels, style gap


@pytest.fixture(scope="module")
def probe_data():
    attrs, poses, seeds = sample_batch(PROBE_N, run_seed=5)
    feats = {}
    for style in ("synthetic", "photo"):
        images, _ = render_faces(attrs, poses, RenderConfig(style=style), seeds)
        # 16x16 average-pooled pixels, the features of a cheap linear probe.
        feats[style] = images.reshape(PROBE_N, 16, 4, 16, 4, 3).mean((2, 4)).reshape(PROBE_N, -1) / 255.0
    return attrs, feats


def _probe_scores(feats, y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr = slice(0, PROBE_TRAIN)
    te = slice(PROBE_TRAIN, PROBE_N)
    scaler = StandardScaler().fit(feats["synthetic"][tr])
    clf = LogisticRegression(C=0.05, max_iter=3000).fit(scaler.transform(feats["synthetic"][tr]), y[tr])
    return (clf.score(scaler.transform(feats["synthetic"][te]), y[te]),
            clf.score(scaler.transform(feats["photo"][te]), y[te]))


def test_labels_are_visible_but_not_trivial(probe_data):
    """A linear probe on 16x16 pixels of synthetic faces finds gender and ethnicity on held-out
    faces (chance 0.5 and 0.2), but nowhere near perfectly (measured 0.67 and 0.68)."""
    attrs, feats = probe_data
    gender, _ = _probe_scores(feats, attrs.gender)
    ethnicity, _ = _probe_scores(feats, attrs.ethnicity)
    assert 0.60 <= gender <= 0.95, gender
    assert 0.50 <= ethnicity <= 0.95, ethnicity


def test_age_is_visible(probe_data):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    attrs, feats = probe_data
    tr, te = slice(0, PROBE_TRAIN), slice(PROBE_TRAIN, PROBE_N)
    scaler = StandardScaler().fit(feats["synthetic"][tr])
    model = Ridge(alpha=100).fit(scaler.transform(feats["synthetic"][tr]), attrs.age[tr])
    mae = np.abs(model.predict(scaler.transform(feats["synthetic"][te])) - attrs.age[te]).mean()
    baseline = np.abs(np.median(attrs.age[tr]) - attrs.age[te]).mean()
    assert mae < 0.8 * baseline, (mae, baseline)  # measured 13.4 vs 21.9


def test_style_gap(probe_data):
    """A probe trained on synthetic-style faces scores lower on the photo-style pictures of the
    same held-out ids than on their synthetic-style pictures (measured: gender 0.67 -> 0.59,
    ethnicity 0.68 -> 0.51); required margins: 0.04 for gender, 0.10 for ethnicity."""
    attrs, feats = probe_data
    g_syn, g_photo = _probe_scores(feats, attrs.gender)
    e_syn, e_photo = _probe_scores(feats, attrs.ethnicity)
    assert g_syn - g_photo >= 0.04, (g_syn, g_photo)
    assert e_syn - e_photo >= 0.10, (e_syn, e_photo)


def test_skin_tone_follows_the_rendered_ethnicity():
    """Mean skin colour between the eyebrows of frontal adult faces, by class: white > asian >
    other > indian > black, as SKIN_LIGHTNESS orders them; the classes overlap face by face."""
    n = 60
    light = {}
    for e in range(len(ETHNICITIES)):
        attrs = _one_face(n, ethnicity=e, age=30, gender=0, hair_length=0)
        images, _ = render_faces(attrs, PoseBatch.frontal(n), RenderConfig(size=128), face_seeds(100 + e, range(n)))
        # Glabella: head centre x, 0.12 head units above the head centre, away from brows and fringe.
        px, py = 64, int(128 * 0.45 - 0.12 * 0.27 * 128)
        light[ETHNICITIES[e]] = images[:, py - 1:py + 2, px - 1:px + 2].astype(float).mean(axis=(1, 2, 3))
    means = {k: v.mean() for k, v in light.items()}
    order = sorted(means, key=means.get, reverse=True)
    assert order == ["white", "asian", "other", "indian", "black"], means
    # Overlap: some faces of a darker class are lighter than some of the next lighter class.
    for darker, lighter in (("asian", "white"), ("other", "asian"), ("indian", "other")):
        assert light[darker].max() > light[lighter].min(), (darker, lighter)


# ------------------------------------------------------------------------------ head pose


SCLERA = np.array([240, 237, 230])  # eye whites, RGB (0.94, 0.93, 0.90) in the synthetic style


def _eye_whites(image):
    ys, xs = np.nonzero((np.abs(image.astype(int) - SCLERA) <= 2).all(axis=-1))
    assert len(xs) > 10, "no eye whites found"
    # Two eyes: split the columns at the widest gap.
    cols = np.unique(xs)
    cut = cols[np.argmax(np.diff(cols))] if len(cols) > 1 else cols[0]
    left, right = xs <= cut, xs > cut
    return xs, ys, (xs[left], ys[left]), (xs[right], ys[right])


def _render_pose(**pose):
    attrs = _one_face(1, hair_length=0, hair_style="buzz cut")
    images, _ = render_faces(attrs, _poses(1, **pose), RenderConfig(size=128), np.array([7]))
    return images[0]


def test_yaw_moves_features_and_narrows_the_far_side():
    xs0, *_ = _eye_whites(_render_pose(yaw=0))
    xs_r, _, (lx, _), (rx, _) = _eye_whites(_render_pose(yaw=30))
    xs_l, *_ = _eye_whites(_render_pose(yaw=-30))
    assert xs_r.mean() > xs0.mean() + 4 and xs_l.mean() < xs0.mean() - 4
    # Nose to the image right: the right eye is the far one and looks narrower.
    assert np.ptp(rx) < np.ptp(lx)


def test_pitch_roll_scale_offset():
    _, ys0, *_ = _eye_whites(_render_pose())
    _, ys_up, *_ = _eye_whites(_render_pose(pitch=20))
    assert ys_up.mean() < ys0.mean() - 2  # looking up lifts the features
    _, _, (lx, ly), (rx, ry) = _eye_whites(_render_pose(roll=20))
    assert ry.mean() < ly.mean() - 4  # counter-clockwise: the image-right eye rises

    def person(image):
        return (image != image[0, 0]).any(axis=-1)  # the synthetic background is one colour

    small, big = person(_render_pose(scale=0.8)).sum(), person(_render_pose(scale=1.2)).sum()
    assert big > 1.3 * small
    centre = np.nonzero(person(_render_pose()))[1].mean()
    shifted = np.nonzero(person(_render_pose(offset_x=0.1)))[1].mean()
    assert 8 < shifted - centre < 18  # 0.1 of 128 px = 12.8 px


# ------------------------------------------------------------------------------ FairFace's 7 races (races7)

# sha256 of sample_batch(40, run_seed=3) rendered with label_noise 0.3 by the renderer before races7
# existed (commit d1cfb31): the option off must leave every image as it was.
GOLDEN_BEFORE_RACES7 = {
    "synthetic": "968e9a1ea243645068948d49ddb882a22f32f5ff718794934fa74335477d4aab",
    "photo": "f3bd80b3f712b4f40c3ca7d96b278ab68cc9e7f69e96170cc8453df3fc89eb9c",
}


@pytest.mark.parametrize("style", ["synthetic", "photo"])
def test_races7_off_leaves_every_image_bit_identical(style):
    import hashlib

    attrs, poses, seeds = sample_batch(40, run_seed=3)
    images, rendered = render_faces(attrs, poses, RenderConfig(style=style, label_noise=0.3), seeds)
    assert hashlib.sha256(images.tobytes()).hexdigest() == GOLDEN_BEFORE_RACES7[style]
    assert "render_race7" not in rendered


def test_races7_draws_the_folded_races_and_changes_only_their_faces():
    """races7: each face's race folds into its rendered class (label noise included), the two-race
    classes split about evenly, and only white and asian faces change (Black, Indian and
    Latino_Hispanic keep their class's means, and the race draw has its own stream)."""
    from synthfar_ray.labels import FAIRFACE_RACE_TO_ETHNICITY, FAIRFACE_RACES7

    attrs, poses, seeds = sample_batch(400, run_seed=4)
    cfg = RenderConfig(label_noise=0.2, races7=True)
    rendered = rendered_attributes(attrs, poses, cfg, seeds)
    race = rendered["render_race7"]
    assert race.dtype == np.int8
    folded = [ETHNICITIES.index(FAIRFACE_RACE_TO_ETHNICITY[FAIRFACE_RACES7[r]]) for r in race]
    assert folded == rendered["render_ethnicity"].tolist()
    white = rendered["render_ethnicity"] == ETHNICITIES.index("white")
    share_me = float(np.mean(race[white] == FAIRFACE_RACES7.index("Middle Eastern")))
    assert 0.35 < share_me < 0.65, share_me
    sub = slice(0, 60)
    on, _ = render_faces(attrs.take(sub), poses.take(sub), cfg, seeds[sub])
    off, _ = render_faces(attrs.take(sub), poses.take(sub), RenderConfig(label_noise=0.2), seeds[sub])
    two_race = np.isin(rendered["render_ethnicity"][sub], [ETHNICITIES.index("white"), ETHNICITIES.index("asian")])
    same = np.array([np.array_equal(a, b) for a, b in zip(on, off)])
    assert same[~two_race].all() and not same[two_race].any()


def test_races7_folded_pairs_differ_visibly_but_overlap():
    """Mean skin colour between the eyebrows (as in the 5-class test): White lighter than Middle
    Eastern and East Asian lighter than Southeast Asian on average, with faces of the darker race
    lighter than some of the lighter race's."""
    from synthfar_ray.labels import FAIRFACE_RACES7

    n = 60
    attrs, poses, seeds = sample_batch(800, run_seed=6)
    cfg = RenderConfig(size=128, races7=True)
    rendered = rendered_attributes(attrs, poses, cfg, seeds)
    light = {}
    for name in ("White", "Middle Eastern", "East Asian", "Southeast Asian"):
        idx = np.flatnonzero(rendered["render_race7"] == FAIRFACE_RACES7.index(name))[:n]
        front = _one_face(len(idx), ethnicity=int(rendered["render_ethnicity"][idx[0]]), age=30, gender=0)
        images, truth = render_faces(front, PoseBatch.frontal(len(idx)), cfg, seeds[idx])
        assert (truth["render_race7"] == FAIRFACE_RACES7.index(name)).all()  # the race follows the seed
        px, py = 64, int(128 * 0.45 - 0.12 * 0.27 * 128)
        light[name] = images[:, py - 1:py + 2, px - 1:px + 2].astype(float).mean(axis=(1, 2, 3))
    for lighter, darker in (("White", "Middle Eastern"), ("East Asian", "Southeast Asian")):
        assert light[lighter].mean() > light[darker].mean() + 15, {k: v.mean() for k, v in light.items()}
        assert light[darker].max() > light[lighter].min(), (darker, lighter)
