"""Synthetic-only heads (`model.synthetic_heads: [pose, hair, keypoints]`): masked losses and their
gradients, the read path with and without the columns, hair vocabulary errors, metrics, checkpoints,
configs, and one run on the procedural ground-truth domain that learns head pose and keypoints
(the keypoint head's unit tests are in tests/test_keypoints.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from synthfar_ray.faces import HAIR_COLORS, HAIR_LENGTHS
from synthfar_ray.losses import LossWeights, head_losses, multitask_loss
from synthfar_ray.metrics import compute_metrics, pose_mae
from synthfar_ray.model import MultiTaskNet
from synthfar_ray.synthetic_heads import POSE_COLUMNS, HairLabelError, hair_indices
from synthfar_ray.train_data import concat_batches, unlabelled
from synthfar_ray.transforms import LABEL_COLUMNS, label_columns, labels_to_numpy

HEADS = ("pose", "hair")


def _net(heads=HEADS) -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet("tiny", None, "both", heads)


def _targets(n: int, pose: np.ndarray | None = None, hair_length=None, hair_color=None) -> dict[str, torch.Tensor]:
    """Core labels known for every row; pose / hair as given (default: unknown, like a real row)."""
    pose = np.full((n, 3), np.nan, np.float32) if pose is None else np.asarray(pose, np.float32)
    t = {"age": torch.full((n,), 30.0), "age_bin": torch.full((n,), 3), "gender": torch.zeros(n, dtype=torch.long),
         "ethnicity": torch.zeros(n, dtype=torch.long)}
    t.update({c: torch.from_numpy(pose[:, j].copy()) for j, c in enumerate(POSE_COLUMNS)})
    t["hair_length"] = torch.tensor([-1] * n if hair_length is None else hair_length)
    t["hair_color"] = torch.tensor([-1] * n if hair_color is None else hair_color)
    return t


# ------------------------------------------------------------------------------------------ model

def test_heads_exist_only_when_asked_for():
    plain, full = _net(()), _net()
    x = torch.zeros(2, 3, 32, 32)
    assert set(plain(x)) == {"age", "age_bin_logits", "gender_logit", "ethnicity_logits"}
    out = full(x)
    assert out["pose"].shape == (2, 3)
    assert out["hair_length_logits"].shape == (2, len(HAIR_LENGTHS))
    assert out["hair_color_logits"].shape == (2, len(HAIR_COLORS))
    assert not any(k.startswith(("pose", "hair")) for k in plain.state_dict())
    with pytest.raises(ValueError, match="unknown synthetic heads"):
        MultiTaskNet("tiny", None, "both", ("landmarks",))


# ------------------------------------------------------------------------------------------ losses

def test_pose_loss_is_smooth_l1_on_known_angles_in_units_of_30_degrees():
    outputs = {"pose": torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 0.0], [90.0, 90.0, 90.0]], requires_grad=True)}
    # Row 0: yaw error 30 deg = 1 unit (linear zone: 1 - 0.1/2), pitch/roll exact; row 1: 1.5 deg
    # yaw error = 0.05 units (quadratic zone: 0.5 * 0.05^2 / 0.1); row 2: unknown (a real row).
    pose = np.array([[0, 0, 0], [1.5, 0, 0], [np.nan] * 3], np.float32)
    loss = head_losses(outputs, _targets(3, pose))["pose"]
    expected = (0.95 + 0.5 * 0.05 ** 2 / 0.1) / 6  # six known angles
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.all(outputs["pose"].grad[2] == 0)  # the unknown row: no gradient at all
    assert torch.isfinite(outputs["pose"].grad).all()


def test_real_rows_contribute_nothing_and_an_unlabelled_batch_still_reaches_every_parameter():
    """A mixed batch scores the same with or without its real rows; a batch of real rows only gives
    the synthetic heads an exact 0 that is still in the graph (DDP needs a gradient for every parameter)."""
    net = _net()
    x = torch.rand(4, 3, 32, 32)
    syn = _targets(2, np.array([[20, -5, 3], [-40, 10, 0]]), hair_length=[1, 5], hair_color=[0, 4])
    both = concat_batches([(x[:2], syn, torch.ones(2)), unlabelled((x[2:], _targets(2), torch.zeros(2)))])
    net.eval()  # BatchNorm statistics must not depend on the other rows for this comparison
    with torch.no_grad():
        alone = head_losses(net(x[:2]), syn)
        mixed = head_losses(net(both[0]), both[1])
    for head in ("pose", "hair_length", "hair_color"):
        assert mixed[head].item() == pytest.approx(alone[head].item(), rel=1e-5) and alone[head].item() > 0

    net.train()
    total, parts = multitask_loss(net(x), unlabelled((x, _targets(4), None))[1], LossWeights())
    for head in ("pose", "hair_length", "hair_color", "age", "gender"):
        assert parts[head].item() == 0.0 and parts[head].requires_grad
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing
    assert torch.all(net.pose.weight.grad == 0) and torch.all(net.hair_color.weight.grad == 0)


def test_synthetic_head_weights_scale_their_losses():
    net = _net()
    x = torch.rand(2, 3, 32, 32)
    t = _targets(2, np.array([[20, -5, 3], [-40, 10, 0]]), hair_length=[1, 5], hair_color=[0, 4])
    out = net(x)
    base, parts = multitask_loss(out, t, LossWeights())
    heavier, _ = multitask_loss(out, t, LossWeights(pose=3.0, hair_color=0.0))
    expected = base.item() + 2 * parts["pose"].item() - parts["hair_color"].item()
    assert heavier.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ read path

def _raw_batch(with_columns: bool) -> dict:
    batch = {"image": np.zeros((3, 4, 4, 3), np.uint8), "id": np.array([7, 8, 9]), "age": np.array([20.0, 30, 40]),
             "age_bin": np.array([3, 4, 5]), "gender": np.array([0, 1, 0]), "ethnicity": np.array([1, 2, 3])}
    if with_columns:
        batch.update({"pose_yaw": np.array([10.0, None, -50.0], dtype=object),
                      "pose_pitch": np.array([1.0, np.nan, 2.0]),
                      "pose_roll": np.array([0.5, np.nan, -0.5], np.float32),
                      "hair_length": np.array(["long", None, "very short"], dtype=object),
                      "hair_color": np.array(["auburn", "black", None], dtype=object)})
    return batch


def test_label_columns_reach_the_batch_only_with_the_heads():
    assert label_columns(()) == LABEL_COLUMNS
    assert label_columns(["hair", "pose"]) == LABEL_COLUMNS + POSE_COLUMNS + ("hair_length", "hair_color")
    assert set(labels_to_numpy(_raw_batch(True))) == set(LABEL_COLUMNS)  # the default: the four only

    labels = labels_to_numpy(_raw_batch(True), label_columns(HEADS))
    np.testing.assert_array_equal(labels["pose_yaw"], np.array([10, np.nan, -50], np.float32))
    assert labels["pose_pitch"].dtype == np.float32 and np.isnan(labels["pose_pitch"][1])
    np.testing.assert_array_equal(labels["hair_length"], [HAIR_LENGTHS.index("long"), -1, 0])
    np.testing.assert_array_equal(labels["hair_color"], [list(HAIR_COLORS).index("auburn"), 0, -1])


def test_a_set_without_the_columns_reads_as_unknown():
    labels = labels_to_numpy(_raw_batch(False), label_columns(HEADS))
    for c in POSE_COLUMNS:
        assert labels[c].dtype == np.float32 and np.isnan(labels[c]).all()
    for c in ("hair_length", "hair_color"):
        assert labels[c].dtype == np.int64 and (labels[c] == -1).all()
    np.testing.assert_array_equal(labels["gender"], [0, 1, 0])


def test_worker_decode_path_carries_the_heads_labels(tmp_path):
    """decode_on: worker hands the raw rows (hair as strings) to the train worker, which converts them."""
    from synthfar_ray.images import encode_jpeg
    from synthfar_ray.train_data import to_device_batch

    cfg = _train_cfg(tmp_path, model={"backbone": "tiny", "synthetic_heads": ["pose", "hair"]}, decode_on="worker",
                     image_size=8)
    batch = _raw_batch(True) | {"image": np.array([encode_jpeg(np.zeros((8, 8, 3), np.uint8))] * 3, dtype=object),
                                "is_synthetic": np.ones(3, np.int8)}
    images, labels, _ = to_device_batch(batch, cfg, "cpu", None)
    assert images.shape == (3, 3, 8, 8)
    assert labels["hair_length"].tolist() == [HAIR_LENGTHS.index("long"), -1, 0]
    assert labels["pose_yaw"][0].item() == 10.0 and math.isnan(labels["pose_yaw"][1].item())
    plain = to_device_batch(batch, _train_cfg(tmp_path, decode_on="worker", image_size=8), "cpu", None)[1]
    assert set(plain) == set(LABEL_COLUMNS)


def test_unknown_hair_strings_name_the_row_and_the_value():
    batch = _raw_batch(True)
    batch["hair_color"] = np.array(["auburn", "teal", None], dtype=object)
    with pytest.raises(HairLabelError, match=r"hair_color of id 8 is 'teal', not one of \['black'"):
        labels_to_numpy(batch, label_columns(["hair"]))
    with pytest.raises(HairLabelError, match="hair_length of row 1 is 'waist-length'"):
        hair_indices(["long", "waist-length"], "hair_length")


# ------------------------------------------------------------------------------------------ metrics

def test_pose_mae_and_hair_accuracy_on_hand_made_arrays():
    outputs = {"pose": np.array([[10, 0, 0], [0, 4, 0], [50, 50, 50]], np.float32),
               "hair_length_logits": np.eye(len(HAIR_LENGTHS))[[1, 2, 3]],
               "hair_color_logits": np.eye(len(HAIR_COLORS))[[0, 0, 0]],
               "gender_logit": np.array([-1.0, 1.0, 1.0])}
    labels = {"gender": np.array([0, 1, 0]), "pose_yaw": np.array([0, 2, np.nan]),
              "pose_pitch": np.array([0, 0, np.nan]), "pose_roll": np.array([1, 1, np.nan]),
              "hair_length": np.array([1, 0, -1]), "hair_color": np.array([-1, -1, -1])}
    m = compute_metrics(outputs, labels)
    assert m["pose_yaw_mae"] == pytest.approx(6.0)  # (10 + 2) / 2; row 2 has no pose
    assert m["pose_pitch_mae"] == pytest.approx(2.0)
    assert m["pose_roll_mae"] == pytest.approx(1.0)
    assert m["pose_mae"] == pytest.approx(3.0)
    assert m["hair_length_acc"] == pytest.approx(0.5)
    assert "hair_color_acc" not in m  # no row has a hair colour
    assert m["gender_acc"] == pytest.approx(2 / 3) and m["n"] == 3


def test_a_real_split_gives_no_synthetic_metric():
    outputs = {"pose": np.zeros((2, 3)), "hair_length_logits": np.zeros((2, 6)), "gender_logit": np.zeros(2)}
    real = labels_to_numpy(_raw_batch(False) | {"image": np.zeros((2, 1)), "id": [1, 2], "gender": [0, 1],
                                                 "age": [1.0, 2.0], "age_bin": [0, 0], "ethnicity": [0, 0]},
                           label_columns(HEADS))
    m = compute_metrics(outputs, real)
    assert not any(k.startswith(("pose", "hair")) for k in m) and "gender_acc" in m
    assert pose_mae(np.zeros((2, 3)), {}) == {}


# ------------------------------------------------------------------------------------------ configs and checkpoints

def _train_cfg(tmp_path, **kw):
    from synthfar_ray.train import TrainConfig

    return TrainConfig(**{"name": "r", "storage_path": str(tmp_path), "plan": "synthetic", "synthetic": str(tmp_path),
                          "model": {"backbone": "tiny"}, **kw})


def test_config_switch_validates_and_leaves_old_configs_unchanged(tmp_path):
    from synthfar_ray.checkpoints import training_view

    plain = training_view(_train_cfg(tmp_path))
    # Runs started before the option: their run_config.json has none of the new keys, and still matches.
    assert "synthetic_heads" not in plain["model"]
    assert not {"pose", "hair_length", "hair_color", "keypoints"} & set(plain["loss_weights"])
    on = _train_cfg(tmp_path, model={"backbone": "tiny", "synthetic_heads": ["pose", "hair"]},
                    loss_weights={"pose": 2.0})
    view = training_view(on)
    assert view["model"]["synthetic_heads"] == ["pose", "hair"] and view["loss_weights"]["pose"] == 2.0
    with pytest.raises(ValueError, match="synthetic_heads"):
        _train_cfg(tmp_path, model={"synthetic_heads": ["landmarks"]})
    with pytest.raises(ValueError, match="lists a head twice"):
        _train_cfg(tmp_path, model={"synthetic_heads": ["pose", "pose"]})
    with pytest.raises(ValueError, match="trained by synthetic rows only"):
        _train_cfg(tmp_path, plan="real", real=str(tmp_path), model={"synthetic_heads": ["pose"]})


def test_checkpoints_round_trip_the_heads_and_old_ones_load_as_before(tmp_path):
    from synthfar_ray.checkpoints import checkpoint_meta, load_model, save_model

    cfg = _train_cfg(tmp_path, augment=False, model={"backbone": "tiny", "synthetic_heads": ["hair", "keypoints", "pose"]})
    net = _net(("pose", "hair", "keypoints"))
    save_model(str(tmp_path / "new"), net, checkpoint_meta(cfg))
    loaded, meta = load_model(str(tmp_path / "new"))
    assert meta["synthetic_heads"] == ["hair", "keypoints", "pose"]
    assert loaded.synthetic_heads == ("pose", "hair", "keypoints")
    x = torch.rand(2, 3, 32, 32)
    for head in ("pose", "keypoints"):
        torch.testing.assert_close(loaded(x)[head], net.eval()(x)[head])

    old = tmp_path / "old"
    save_model(str(old), _net(()), checkpoint_meta(_train_cfg(tmp_path)))
    meta_file = old / "meta.json"
    stored = json.loads(meta_file.read_text())
    del stored["synthetic_heads"]  # as written before the option existed
    meta_file.write_text(json.dumps(stored))
    loaded, _ = load_model(str(old))
    assert loaded.synthetic_heads == () and "pose" not in loaded(x)


# ------------------------------------------------------------------------------------------ ground-truth domain

@pytest.fixture(scope="module")
def pose_run(ray_cluster, tmp_path_factory):
    """800 procedural 64 px faces (yaw drawn in [-60, 60], pitch and roll at the defaults, 20 % val),
    a "real" copy of them without the pose, hair and keypoint columns, and a 600-step mix run (75 %
    synthetic) of a tiny net with the three synthetic heads at 48 px; the loss weighs pose and
    keypoints (and a little hair) only. tests/test_keypoints.py has the keypoint head's unit tests."""
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    from synthfar_ray.generate import GenerateConfig, run_generate
    from synthfar_ray.train import TrainConfig, run_train

    root = tmp_path_factory.mktemp("synthetic-heads")
    syn, real = str(root / "synthetic"), str(root / "real")
    run_generate(GenerateConfig.model_validate({
        "output": syn, "num_images": 800, "seed": 3, "shard_size": 400, "val_fraction": 0.2, "generator": "procedural",
        "render": {"size": 64, "style": "synthetic"}, "poses": {"yaw": [-60, 60]},
        "compute": {"num_actors": 1, "cpus_per_actor": 1}}))
    table = pds.dataset(syn, format="parquet").to_table()
    os.makedirs(real)
    pq.write_table(table.drop([c for c in table.column_names if c.startswith(("pose_", "hair_", "keypoints"))]),
                   os.path.join(real, "part-000000.parquet"))
    cfg = TrainConfig(
        name="pose", storage_path=str(root / "runs"), plan="mix", synthetic=syn, real=real, mix_ratio=0.75,
        model={"backbone": "tiny", "synthetic_heads": ["pose", "hair", "keypoints"]}, image_size=48, batch_size=32, lr=3e-3,
        loss_weights={"age": 0, "age_bin": 0, "gender": 0, "ethnicity": 0, "hair_length": 0.2, "hair_color": 0.2},
        warmup_steps=20, steps=600, val_every=600, log_every=100, augment=False, amp="none", num_workers=1,
        use_gpu=False, cpus_per_worker=1, data_cpus=0.5, shuffle_buffer=256, val_source="synthetic", seed=0)
    return {"syn": syn, "real": real, "table": table.to_pandas(), "result": run_train(cfg), "root": root}


def test_pose_head_learns_head_pose_on_the_ground_truth_domain(pose_run):
    """Pose MAE on the held-out (val) rows against predicting the train rows' mean pose.

    Measured (seeds fixed; 2 cores; with the keypoint head in the run too): val pose MAE 7.02 deg
    (yaw 11.7, pitch 7.0, roll 2.4) against 14.33 for the mean (yaw 30.5, pitch 7.4, roll 5.1), ratio
    0.49 (yaw 0.38); 7.22 (yaw 12.2) before the keypoint head. Asserted with room
    for thread-count noise: the mean below 0.7 x, yaw below 0.6 x the mean predictor's."""
    df, metrics = pose_run["table"], pose_run["result"].metrics
    train, val = df[df.split == "train"], df[df.split == "val"]
    baseline = {c: float(np.mean(np.abs(val[c] - train[c].mean()))) for c in POSE_COLUMNS}
    assert metrics["val_n"] == len(val) > 100
    assert metrics["val_pose_mae"] < 0.7 * np.mean(list(baseline.values())), (metrics, baseline)
    assert metrics["val_pose_yaw_mae"] < 0.6 * baseline["pose_yaw"], (metrics, baseline)
    assert {"loss_pose", "loss_hair_length", "loss_hair_color"} <= set(metrics)
    assert 0 <= metrics["val_hair_color_acc"] <= 1 and 0 <= metrics["val_hair_length_acc"] <= 1


def test_keypoint_head_learns_the_renderers_points_on_the_ground_truth_domain(pose_run):
    """The generator stored each row's exact points (faces.render_keypoints), and the head trained on
    them beats the mean shape: keypoint NME (x100, eye-centre distance) on the held-out rows against
    predicting every train row's mean position of each point.

    Measured (seeds fixed; 2 cores): val NME 36.5 against 85.3 for the mean shape, ratio 0.43 (large
    in absolute terms: a tiny net, 600 steps at 48 px, yaw to +-60 degrees). Asserted below 0.7 x."""
    from synthfar_ray.faces import FaceBatch, PoseBatch, RenderConfig, render_keypoints
    from synthfar_ray.keypoints import keypoints_array
    from synthfar_ray.metrics import keypoint_nme

    df, metrics = pose_run["table"], pose_run["result"].metrics
    first = df.iloc[:16]
    attrs = FaceBatch(age=first.age.to_numpy(float), gender=first.gender.to_numpy(), ethnicity=first.ethnicity.to_numpy(),
                      hair_length=np.array([HAIR_LENGTHS.index(h) for h in first.hair_length]),
                      hair_color=list(first.hair_color), hair_style=list(first.hair_style))
    poses = PoseBatch(**{f: first[f"pose_{f}"].to_numpy(float) for f in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")})
    exact = render_keypoints(attrs, poses, RenderConfig(size=64), first.seed.to_numpy(np.int64)).reshape(16, -1)
    np.testing.assert_allclose(keypoints_array(first.keypoints.to_numpy(), 16), exact, rtol=0, atol=1e-6)

    train, val = df[df.split == "train"], df[df.split == "val"]
    true_train = keypoints_array(train.keypoints.to_numpy(), len(train))
    true_val = keypoints_array(val.keypoints.to_numpy(), len(val))
    mean_shape = keypoint_nme(np.tile(np.nanmean(true_train, axis=0), (len(val), 1)), true_val)
    assert metrics["val_keypoint_nme"] < 0.7 * mean_shape, (metrics["val_keypoint_nme"], mean_shape)
    assert "loss_keypoints" in metrics


def test_a_run_with_device_augmentation_trains_the_keypoint_head(pose_run):
    """augment: true moves the keypoints on the device (tests/test_keypoints.py checks where to): a few
    steps through train_step's augmented path give a finite keypoint loss and a validation NME."""
    from synthfar_ray.train import TrainConfig, run_train

    result = run_train(TrainConfig(
        name="augmented", storage_path=str(pose_run["root"] / "runs"), plan="synthetic", synthetic=pose_run["syn"],
        model={"backbone": "tiny", "synthetic_heads": ["keypoints"]}, image_size=32, batch_size=16, steps=4,
        val_every=4, log_every=2, augment=True, augment_on="device", amp="none", num_workers=1, use_gpu=False,
        cpus_per_worker=1, data_cpus=0.5, shuffle_buffer=64, val_limit=64, seed=0))
    assert math.isfinite(result.metrics["loss_keypoints"]) and result.metrics["val_keypoint_nme"] > 0


def test_evaluate_scores_the_heads_where_the_split_has_the_labels(pose_run):
    """evaluate rebuilds the heads from the checkpoint: the synthetic split gets the validation's
    numbers, the split without pose/hair columns gets no such metric (and no error)."""
    from synthfar_ray.evaluate import EvaluateConfig, run_evaluate

    out = pose_run["root"] / "eval"
    report = run_evaluate(EvaluateConfig(checkpoint=pose_run["result"].checkpoint, on=["syn:val", "real:val"],
                                         data={"syn": pose_run["syn"], "real": pose_run["real"]}, out=str(out),
                                         num_actors=1, cpus_per_actor=0.5))
    syn, real = report["datasets"]["syn:val"], report["datasets"]["real:val"]
    val = pose_run["result"].metrics
    for key in ("pose_mae", "pose_yaw_mae", "pose_pitch_mae", "pose_roll_mae", "hair_length_acc", "hair_color_acc",
                "keypoint_nme"):
        assert syn[key] == pytest.approx(val[f"val_{key}"], rel=1e-4)
        assert key not in real
    assert real["gender_acc"] == pytest.approx(syn["gender_acc"])  # the same images: the core heads are scored
    assert "pose MAE (deg)" in (out / "metrics.md").read_text() and "keypoint NME (x100)" in (out / "metrics.md").read_text()
    written = json.loads((out / "metrics.json").read_text())["datasets"]
    assert written["syn:val"]["pose_mae"] == pytest.approx(syn["pose_mae"]) and "pose_mae" not in written["real:val"]
    # A crop would move the faces but not their keypoints: refused, naming the dataset.
    from synthfar_ray.config import ConfigError

    with pytest.raises(ConfigError, match="center_crop syn=48: .* has keypoints"):
        run_evaluate(EvaluateConfig(checkpoint=pose_run["result"].checkpoint, on=["syn:val"], data={"syn": pose_run["syn"]},
                                    center_crop={"syn": 48}, out=str(out), num_actors=1, cpus_per_actor=0.5))
