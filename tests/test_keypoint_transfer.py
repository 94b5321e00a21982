"""Dense -> sparse keypoint transfer (`train.model.transfer: [keypoints]`): a real set's sparse
landmarks in their own convention (keypoints.REAL_KEYPOINT_NAMES; the stand-ins' landmarks.csv, read
by ingest into `keypoints_real`), a head from the DETACHED dense keypoints to them, its loss, config
rules and metric, and one pipeline run on the ground-truth domain against the fixed baseline map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_ingest import _make_utk, _read

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.faces import RenderConfig, render_keypoints, render_real_keypoints, sample_batch
from synthfar_ray.ingest import LANDMARKS_CSV, IngestError, ingest_utkface, landmark_header
from synthfar_ray.keypoints import (KEYPOINT_INDEX, NUM_KEYPOINTS, NUM_REAL_KEYPOINTS, REAL_KEYPOINT_NAMES,
                                    baseline_real, keypoints_array)
from synthfar_ray.losses import LossWeights, head_losses, multitask_loss
from synthfar_ray.metrics import compute_metrics, keypoint_nme
from synthfar_ray.model import MultiTaskNet
from synthfar_ray.train import TrainConfig

R2 = 2 * NUM_REAL_KEYPOINTS
RI = {name: i for i, name in enumerate(REAL_KEYPOINT_NAMES)}


# ------------------------------------------------------------------------------------------ the convention

def test_real_points_follow_their_own_convention_not_a_subset_of_the_dense_ones():
    """On 64 faces at 128 px (default poses) each real point sits where its definition says relative
    to the dense points: eye points above the eye centres (toward the brows), the subnasale below the
    nose line, the mouth point above the line between the lips, the soft chin above the jaw's lowest
    point. The nearest dense equivalent misses every point by a pose-dependent amount: NME of the
    fixed map on exact dense points is far from 0 (measured 14.9: eyes 12.7 each, nose 11.4, mouth
    6.8, chin 30.9), so a map must be learned."""
    attrs, poses, seeds = sample_batch(64, run_seed=11)
    cfg = RenderConfig(size=128)
    dense = render_keypoints(attrs, poses, cfg, seeds) * 128
    real = render_real_keypoints(attrs, poses, cfg, seeds)
    up = np.stack([-np.sin(np.radians(poses.roll)), -np.cos(np.radians(poses.roll))], axis=1)  # the face's "up" in pixels

    def above(a, b):  # how far a lies above b along the face's up direction (pixels)
        return np.einsum("nk,nk->n", a - b, up)

    for side in ("right_eye", "left_eye"):
        shown = ~np.isnan(real[:, RI[side], 0])
        assert shown.mean() > 0.9
        assert (above(real[shown, RI[side]], dense[shown, KEYPOINT_INDEX[side]]) > 0.5).all()
    assert (above(dense[:, KEYPOINT_INDEX["mouth_centre"]], real[:, RI["mouth"]]) < -0.3).all()
    assert (above(real[:, RI["chin"]], dense[:, KEYPOINT_INDEX["chin"]]) > 2).all()
    nme = keypoint_nme(baseline_real(dense.reshape(64, -1) / 128), real.reshape(64, -1) / 128, "keypoints_real")
    assert 8 < nme < 20, nme


# ------------------------------------------------------------------------------------------ ingest

def _landmark_lines(names: list[str], rng: np.random.Generator) -> dict[str, list[float]]:
    return {name: rng.uniform(2, 22, R2).round(2).tolist() for name in names}


def test_landmark_rows_reach_the_planned_items_and_the_decoded_rows(tmp_path):
    """Without Ray: ingest's plan attaches each landmarks.csv row to its image (a bad row is a bad
    item naming the CSV line, and its image leaves the plan), and decoding converts the pixels into
    keypoints.py's frame once the image size is known."""
    from synthfar_ray.ingest import _decode_batch, _input_blocks, _plan, output_schema

    root = tmp_path / "utk"
    names = sorted(_make_utk(root, n=4))
    rows = [[names[0], *["12"] * R2], [names[1], "x", *["1"] * (R2 - 1)], [names[2], *[""] * R2]]
    (root / LANDMARKS_CSV).write_text("\n".join(",".join(r) for r in [landmark_header(), *rows]) + "\n")
    items, bad, _, extra = _plan("utkface", str(root), seed=0, val_fraction=0.0)
    assert [it.file for it in items] == [names[0], names[2], names[3]] and extra["landmarks"]["rows"] == 2
    assert bad == [{"file": names[1], "row": 3, "reason": f"{LANDMARKS_CSV} line 3: right_eye_x 'x' is not a number"}]
    decoded = _decode_batch(next(_input_blocks(items, "utkface", 8, landmarks=True)), output_schema(True)).to_pylist()
    assert decoded[0]["keypoints_real"] == pytest.approx([0.5] * R2)  # pixel 12 of 24: the centre
    assert all(np.isnan(decoded[1]["keypoints_real"])) and decoded[2]["keypoints_real"] is None


def test_ingest_reads_the_landmark_file_into_keypoints_real(ray_cluster, tmp_path):
    """landmarks.csv (pixels, an empty pair = unmarked) becomes `keypoints_real` in keypoints.py's
    frame (fractions of the 24 px side); an image without a row gets null; a folder without the file
    is ingested exactly as before (no column)."""
    root = tmp_path / "utk"
    names = sorted(_make_utk(root, n=12))
    truth = _landmark_lines(names[:10], np.random.default_rng(0))
    truth[names[0]][2:4] = [np.nan, np.nan]  # left eye not marked
    with open(root / LANDMARKS_CSV, "w") as fh:
        fh.write(",".join(landmark_header()) + "\n")
        for name, values in truth.items():
            fh.write(",".join([name, *("" if np.isnan(v) else str(v) for v in values)]) + "\n")
    result = ingest_utkface(str(root), str(tmp_path / "out"))
    rows = {r["file"]: r for r in _read(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 12 and result.manifest["landmarks"] == {"file": LANDMARKS_CSV, "rows": 10}
    assert result.manifest["ignored_files"] == 0 and "keypoints_real" in result.manifest["columns"]
    for name, values in truth.items():
        np.testing.assert_allclose(rows[name]["keypoints_real"], np.array(values) / 24, rtol=1e-6)
    assert rows[names[10]]["keypoints_real"] is None and rows[names[11]]["keypoints_real"] is None
    labels = keypoints_array([rows[n]["keypoints_real"] for n in names], 12, column="keypoints_real")
    assert np.isnan(labels[0, 2:4]).all() and np.isnan(labels[10:]).all() and not np.isnan(labels[1]).any()

    (root / LANDMARKS_CSV).unlink()
    ingest_utkface(str(root), str(tmp_path / "plain"))
    assert "keypoints_real" not in _read(str(tmp_path / "plain")).column_names


def test_bad_landmark_rows_name_the_file_and_line(ray_cluster, tmp_path):
    """Every bad row is reported at once (strict: nothing written), by file and CSV line; with
    skip_bad the images they name are skipped and listed, the others keep their landmarks. A wrong
    header stops the run naming the expected one."""
    root = tmp_path / "utk"
    names = sorted(_make_utk(root, n=8))
    good = ["1.5"] * R2
    lines = [",".join(landmark_header()),
             ",".join([names[0], *good]),
             ",".join([names[1], "abc", *good[1:]]),  # line 3: not a number
             ",".join([names[2], "", *good[1:]]),  # line 4: x without y... (y given, x empty)
             ",".join([names[3], *good[:-1]]),  # line 5: a field short
             ",".join([names[0], *good]),  # line 6: duplicate of line 2
             ",".join(["nobody.jpg", *good])]  # line 7: no such image
    (root / LANDMARKS_CSV).write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError) as err:
        ingest_utkface(str(root), str(tmp_path / "strict"))
    text = str(err.value)
    assert "5 bad item(s)" in text and not storage.list_files(str(tmp_path / "strict"))
    assert f"{names[1]}: {LANDMARKS_CSV} line 3: right_eye_x 'abc' is not a number" in text
    assert f"{LANDMARKS_CSV} line 4: right_eye has only one coordinate" in text
    assert f"{LANDMARKS_CSV} line 5: 10 fields, expected 11" in text
    assert f"{LANDMARKS_CSV} line 6: duplicate row for {names[0]} (first at line 2)" in text
    assert f"{LANDMARKS_CSV} line 7: no image 'nobody.jpg'" in text

    result = ingest_utkface(str(root), str(tmp_path / "skip"), skip_bad=True)
    rows = {r["file"]: r for r in _read(str(tmp_path / "skip")).to_pylist()}
    assert set(rows) == set(names) - {names[1], names[2], names[3]} and sum(result.counts.values()) == 5
    assert {s["row"] for s in result.skipped} == {3, 4, 5, 6, 7}
    assert rows[names[0]]["keypoints_real"] == pytest.approx([1.5 / 24] * R2)  # the first row decided it

    (root / LANDMARKS_CSV).write_text("file,x,y\n")
    with pytest.raises(IngestError, match=r"landmarks.csv: header \['file', 'x', 'y'\] is not \['file', 'right_eye_x'"):
        ingest_utkface(str(root), str(tmp_path / "header"))


# ------------------------------------------------------------------------------------------ head, loss, metric

def _targets(real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every head's labels unknown but the sparse points (a real row without age, say)."""
    n = len(real)
    return {"age": torch.full((n,), float("nan")), "age_bin": torch.full((n,), -1), "gender": torch.full((n,), -1),
            "ethnicity": torch.full((n,), -1), "keypoints": torch.full((n, 2 * NUM_KEYPOINTS), float("nan")),
            "keypoints_real": real}


def _net() -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet("tiny", None, "both", ("keypoints",), ("keypoints",))


def test_transfer_head_starts_at_the_baseline_map_and_teaches_nothing_below_it():
    """The head's output equals the fixed map at initialisation; its loss (real rows' sparse points,
    NaN unmarked) reaches only the head: the backbone and the dense keypoint head get no gradient.
    A batch without sparse labels gives an exact 0 still in the graph (DDP)."""
    net = _net()
    out = net(torch.rand(4, 3, 32, 32))
    assert out["keypoints_real"].shape == (4, R2) and "race7_logits" not in out
    torch.testing.assert_close(out["keypoints_real"], torch.from_numpy(baseline_real(out["keypoints"].detach().numpy())))
    true = torch.full((4, R2), float("nan"))
    true[0], true[2, :4] = 0.5, torch.tensor([0.4, 0.4, 0.6, 0.4])
    losses = head_losses(out, _targets(true))
    losses["keypoints_real"].backward()
    assert net.keypoints_real.weight.grad.abs().sum() > 0
    below = [*net.backbone.parameters(), *net.keypoints.parameters()]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in below)
    none = head_losses(net(torch.rand(2, 3, 32, 32)), _targets(torch.full((2, R2), float("nan"))))
    assert none["keypoints_real"].item() == 0.0 and none["keypoints_real"].requires_grad
    total, parts = multitask_loss(net(torch.rand(4, 3, 32, 32)), _targets(true), LossWeights(keypoints_real=2.0))
    assert parts["keypoints_real"].item() > 0 and total.item() == pytest.approx(2.0 * parts["keypoints_real"].item())
    assert "keypoints_real" not in LossWeights().model_dump()  # the default is left out of dumps


def test_sparse_nme_normalises_by_the_real_eye_points():
    """keypoint_real_nme (the head) and keypoint_real_baseline_nme (the fixed map on the dense
    points), by the distance between the REAL eye points; only where the split has the labels."""
    dense = np.full((2, 2 * NUM_KEYPOINTS), 0.5)
    dense[:, 2 * KEYPOINT_INDEX["right_eye"]:2 * KEYPOINT_INDEX["right_eye"] + 2] = [0.4, 0.4]
    dense[:, 2 * KEYPOINT_INDEX["left_eye"]:2 * KEYPOINT_INDEX["left_eye"] + 2] = [0.6, 0.4]
    true = baseline_real(dense).copy()
    true[:, 1] -= 0.02  # the real right eye point is 0.02 higher: the fixed map misses it
    true[:, 3] -= 0.02
    pred = true.copy()
    pred[1, 8] += 0.05  # the head misses row 1's chin by 0.05
    labels = {"gender": np.zeros(2), "keypoints_real": true}
    m = compute_metrics({"gender_logit": np.zeros(2), "keypoints": dense, "keypoints_real": pred}, labels)
    assert m["keypoint_real_baseline_nme"] == pytest.approx(100 * 2 * 0.02 / 5 / 0.2)
    assert m["keypoint_real_nme"] == pytest.approx(100 * np.mean([0, 0.05 / 5 / 0.2]))
    assert "keypoint_real_nme" not in compute_metrics({"gender_logit": np.zeros(2), "keypoints": dense},
                                                      {**labels, "keypoints_real": np.full((2, R2), np.nan)})


# ------------------------------------------------------------------------------------------ config

def test_keypoint_transfer_config_rules(tmp_path):
    base = ["name=x", f"storage_path={tmp_path}", "synthetic=/data/s", "real=/data/r", "plan=mix",
            "model.transfer=[keypoints]"]
    with pytest.raises(ConfigError, match="add keypoints to model.synthetic_heads"):
        load_config(TrainConfig, None, base)
    heads = [*base, "model.synthetic_heads=[keypoints]"]
    cfg = load_config(TrainConfig, None, heads)
    assert cfg.model.transfer == ("keypoints",) and cfg.model.transfer_labels == ("keypoints_real",)
    both = load_config(TrainConfig, None, [*heads[:-1], "model.transfer=[features,keypoints]", "model.synthetic_heads=[keypoints]"])
    assert both.model.transfer_labels == ("ethnicity7", "keypoints_real")
    with pytest.raises(ConfigError, match=r"model.transfer \['keypoints'\] trains on the real set's labels \(keypoints_real\)"):
        load_config(TrainConfig, None, [*heads, "plan=synthetic"])
    with pytest.raises(ConfigError, match="center_crop 300 would move the real faces but not their keypoints_real"):
        load_config(TrainConfig, None, [*heads, "center_crop=300"])


# ------------------------------------------------------------------------------------------ ground-truth domain

@pytest.mark.slow
def test_transfer_beats_the_fixed_map_on_held_out_photo_faces(ray_cluster, tmp_path):
    """The issue's case: the dense keypoint head learns from synthetic-style rows only (their exact
    15 points); the transfer head learns the real set's own 5-point convention from the photo-style
    stand-in's landmark file (mix plan, half of each batch real). On the stand-in's held-out test
    rows (180), sparse NME of the transfer head against the fixed map (nearest dense point) on the
    same net's dense points. Measured (seeds fixed, 2 loaded cores, 166 s): transfer 29.1, fixed map
    42.0 (ratio 0.69; in one process without Ray, same settings: 30.1 vs 50.4). Asserted below 0.8x."""
    from synthfar_ray.pipeline import PipelineConfig, run_pipeline

    run_dir = tmp_path / "run"
    run_pipeline(PipelineConfig.model_validate(PROOF_CONFIG | {"run_dir": str(run_dir)}))
    scores = json.loads((run_dir / "eval" / "transfer" / "metrics.json").read_text())["datasets"]["utkface:test"]
    print(f"sparse NME: transfer {scores['keypoint_real_nme']:.1f}, fixed map {scores['keypoint_real_baseline_nme']:.1f}")
    assert scores["n"] > 150
    assert scores["keypoint_real_nme"] < PROOF_RATIO * scores["keypoint_real_baseline_nme"], scores


PROOF_RATIO = 0.8
PROOF_CONFIG = {
    "stages": ["generate", "ingest", "train", "evaluate"], "sample": None,
    "generate": {"generator": "procedural", "render": {"size": 48, "label_noise": 0.0}, "num_images": 800,
                 "shard_size": 400, "val_fraction": 0.1, "compute": {"num_actors": 1, "cpus_per_actor": 1}},
    "standin": {"num_images": 1200, "seed": 7, "layouts": ["utkface"], "landmarks": True},
    "real": {"dataset": "utkface"},
    "train": {"steps": 600, "batch_size": 32, "lr": 0.003, "warmup_steps": 25, "amp": "none", "image_size": 48,
              "val_every": 600, "log_every": 100, "num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5,
              "data_cpus": 0.25, "shuffle_buffer": 256, "augment": False, "val_source": "real",
              "loss_weights": {"age": 0, "age_bin": 0, "gender": 0, "ethnicity": 0}},
    "runs": {"transfer": {"plan": "mix", "mix_ratio": 0.5,
                          "model": {"backbone": "tiny", "synthetic_heads": ["keypoints"], "transfer": ["keypoints"]}}},
    "evaluate_on": ["utkface:test"]}
