"""`synthfar evaluate`: Ray Data batch inference gives the same metrics as running the net in-process,
whole and by group (ethnicity, gender, age bin), with confusion matrices."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from test_train import (
    write_fixture,  # the shared fixture-set writer (tests/ is on sys.path under pytest)
)

from synthfar_ray.evaluate import EvaluateConfig, run_evaluate, run_evaluations
from synthfar_ray.metrics import GROUPINGS, compute_metrics, confusion_matrices, metrics_by_group
from synthfar_ray.model import MultiTaskNet, predict
from synthfar_ray.train import load_model, save_model
from synthfar_ray.transforms import decode_resize


def _direct_outputs(table, split, ckpt, size, crop):
    """The reference: decode every row of the split here, run the net; (outputs, labels)."""
    rows = table.filter(pc.equal(table["split"], split))
    net, _ = load_model(ckpt)
    images = torch.from_numpy(np.stack([decode_resize(b, size, crop) for b in rows["image"].to_pylist()]))
    outputs = {k: v.numpy() for k, v in predict(net, images, nhwc=True).items()}
    age = np.array([np.nan if a is None else a for a in rows["age"].to_pylist()], dtype=np.float64)
    labels = {"age": age, "age_bin": rows["age_bin"].to_numpy().astype(np.int64),
              "gender": rows["gender"].to_numpy().astype(np.int64),
              "ethnicity": rows["ethnicity"].to_numpy().astype(np.int64)}
    return outputs, labels


def _direct_metrics(table, split, ckpt, size, crop, bins_from):
    return compute_metrics(*_direct_outputs(table, split, ckpt, size, crop), age_bins_from=bins_from)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    utk = write_fixture(str(root / "utk"), 150, seed=5, size=40, split_p=(0.2, 0.2, 0.6))
    # FairFace-like: ages unknown (bins only), larger images that get a centre crop.
    ff = write_fixture(str(root / "ff"), 120, seed=6, size=48, with_age=False, split_p=(0.2, 0.2, 0.6))
    return root, utk, ff


def _checkpoint(folder, age_mode: str, seed: int) -> str:
    torch.manual_seed(seed)
    save_model(folder, MultiTaskNet("tiny", age_mode=age_mode),
               {"backbone": "tiny", "age_mode": age_mode, "image_size": 32, "center_crop": None})
    return str(folder)


def test_evaluate_matches_in_process_metrics(ray_cluster, sets):
    root, utk, ff = sets
    ckpt = _checkpoint(root / "run" / "checkpoint_000000001", "both", seed=3)
    cfg = EvaluateConfig(checkpoint=str(root / "run"), on=["utkface:test", "fairface:test"],
                         data={"utkface": str(root / "utk"), "fairface": str(root / "ff")},
                         center_crop={"fairface": 36}, batch_size=16)
    report = run_evaluate(cfg)
    assert report["checkpoint"] == ckpt  # a run folder resolves to its latest checkpoint
    for name, table, crop in (("utkface:test", utk, None), ("fairface:test", ff, 36)):
        want = _direct_metrics(table, "test", ckpt, 32, crop, "logits")
        got = report["datasets"][name]
        assert set(got) == set(want), name
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (name, k)
    assert set(report["datasets"]["utkface:test"]) >= {"age_mae", "age_bin_acc", "gender_acc", "ethnicity_acc"}
    _check_by_group(report, utk, ff, ckpt)
    assert "age_mae" not in report["datasets"]["fairface:test"]  # FairFace has bins only
    # Default output folder: the run folder.
    written = json.loads((root / "run" / "metrics.json").read_text())
    assert written["datasets"]["utkface:test"]["n"] == report["datasets"]["utkface:test"]["n"]
    md = (root / "run" / "metrics.md").read_text()
    assert "| utkface:test |" in md and "| fairface:test |" in md and "age MAE" in md
    assert written["by_group"] == json.loads(json.dumps(report["by_group"]))  # stored as returned, JSON-safe
    assert written["confusion"] == report["confusion"]
    assert "## By group" in md
    for name in ("utkface:test", "fairface:test"):
        for by in ("ethnicity", "gender", "age_bin"):
            assert f"| {name} | {by} |" in md


def test_several_checkpoints_in_one_pass_score_as_each_alone(ray_cluster, sets, tmp_path, caplog):
    """The pipeline's way: run_evaluations scores checkpoints that read the same splits at the same
    size in one pass (one log line says so), and each gets exactly its own metrics, written to its
    own folder; a checkpoint at another image size gets a pass of its own."""
    import logging

    root, utk, ff = sets
    data = {"utkface": str(root / "utk"), "fairface": str(root / "ff")}
    ckpts = [_checkpoint(tmp_path / f"m{i}" / "checkpoint_000000001", mode, seed=10 + i)
             for i, mode in enumerate(("both", "regression", "both"))]
    cfgs = [EvaluateConfig(checkpoint=c, on=["utkface:test", "fairface:test"], data=data, out=str(tmp_path / f"out{i}"),
                           center_crop={"fairface": 36}, batch_size=16, image_size=24 if i == 2 else None)
            for i, c in enumerate(ckpts)]
    with caplog.at_level(logging.INFO, logger="synthfar_ray.evaluate"):
        reports = run_evaluations(cfgs)
    passes = [r.getMessage() for r in caplog.records if "in one pass" in r.getMessage()]
    assert len(passes) == 2 and passes[0].startswith("evaluating 2 checkpoint(s) at 32 px"), passes
    for i, (ckpt, report) in enumerate(zip(ckpts, reports)):
        bins = "regression" if i == 1 else "logits"
        assert report["checkpoint"] == ckpt and report["age_bins_from"] == bins
        for name, table, crop in (("utkface:test", utk, None), ("fairface:test", ff, 36)):
            want = _direct_metrics(table, "test", ckpt, 24 if i == 2 else 32, crop, bins)
            for k in want:
                assert report["datasets"][name][k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (i, name, k)
        written = json.loads((tmp_path / f"out{i}" / "metrics.json").read_text())
        assert written["checkpoint"] == ckpt
    # Different nets really gave different predictions (no output column was shared between them).
    assert reports[0]["datasets"]["utkface:test"]["age_mae"] != reports[1]["datasets"]["utkface:test"]["age_mae"]


def _approx_tree(got, want, where=""):
    """Nested dicts/lists equal, floats to 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for k in want:
            _approx_tree(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _approx_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    else:
        assert got == want, where


def _check_by_group(report, utk, ff, ckpt):
    """Per-group metrics and confusion matrices equal the in-process ones, and add up to the whole."""
    for name, table, crop in (("utkface:test", utk, None), ("fairface:test", ff, 36)):
        outputs, labels = _direct_outputs(table, "test", ckpt, 32, crop)
        groups, confusion = report["by_group"][name], report["confusion"][name]
        _approx_tree(groups, metrics_by_group(outputs, labels, age_bins_from="logits"), name)
        _approx_tree(confusion, confusion_matrices(outputs, labels, age_bins_from="logits"), name)
        whole = report["datasets"][name]
        assert list(groups) == ["ethnicity", "gender", "age_bin"] and list(confusion) == ["gender", "ethnicity", "age_bin"]
        for by, summary in groups.items():
            assert sum(g["n"] for g in summary["groups"].values()) == whole["n"], (name, by)
            assert set(summary["groups"]) | set(summary["absent"]) == set(GROUPINGS[by])
            for metric, gap in summary["gap"].items():  # the gap spans the ranked groups' values
                ranked = [g[metric] for k, g in summary["groups"].items() if k not in summary["few"] and metric in g]
                assert gap == pytest.approx(max(ranked) - min(ranked))
        for attr, c in confusion.items():
            m = np.array(c["matrix"])
            assert m.sum() == whole["n"] and np.trace(m) / m.sum() == pytest.approx(whole[f"{attr}_acc"]), (name, attr)
            # the diagonal over a row is that group's accuracy on its own attribute
            for i, g in enumerate(c["classes"]):
                if m[i].sum():
                    assert groups[attr]["groups"][g][f"{attr}_acc"] == pytest.approx(m[i, i] / m[i].sum())
    assert all("age_mae" not in g for g in report["by_group"]["fairface:test"]["gender"]["groups"].values())


def test_evaluate_cli_regression_net(ray_cluster, sets, tmp_path, capsys):
    """A regression-only net is scored on FairFace bins by bucketizing its ages."""
    from synthfar_ray.cli import main

    root, _, ff = sets
    ckpt = _checkpoint(tmp_path / "ckpt", "regression", seed=4)
    out = tmp_path / "out"
    rc = main(["evaluate", ckpt, "--on", "fairface:val", "--data", f"fairface={root / 'ff'}", "--out", str(out),
               "--crop", "fairface=none"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["age_bins_from"] == "regression" and report["center_crop"] == {"fairface": None}
    got = report["datasets"]["fairface:val"]
    want = _direct_metrics(ff, "val", ckpt, 32, None, "regression")
    assert got["age_bin_acc"] == pytest.approx(want["age_bin_acc"]) and got["n"] == want["n"]
    # a regression-only net's age-bin matrix comes from its bucketized ages
    outputs, labels = _direct_outputs(ff, "val", ckpt, 32, None)
    assert report["confusion"]["fairface:val"] == confusion_matrices(outputs, labels, age_bins_from="regression")
    assert "## By group" in capsys.readouterr().out
    # Adapted: its ages go through an age -> 9 bins transfer map fitted on the adapt split's bins (no
    # 7-race labels in this fixture: no race7 map, no 7-race metric).
    assert main(["evaluate", ckpt, "--on", "fairface:val", "--data", f"fairface={root / 'ff'}", "--out", str(out),
                 "--crop", "fairface=none", "--adapt-on", "fairface:test"]) == 0
    adapted = json.loads((out / "metrics.json").read_text())["adapted"]
    assert adapted["rows"]["age_bin"] >= 20 and "race7" not in adapted["rows"] and adapted["race7_transfer"] is None
    assert 0.0 <= adapted["datasets"]["fairface:val"]["age_bin_acc"] <= 1.0
    assert "race7_fold_acc" not in adapted["datasets"]["fairface:val"]
    assert main(["evaluate", ckpt, "--on", "fairface:test", "--out", str(out)]) == 2  # no --data
    assert main(["evaluate", str(tmp_path / "nowhere"), "--on", "u:test", "--data", "u=/x"]) == 2
