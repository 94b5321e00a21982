"""Metrics against scikit-learn and torch on random data, with clipping and missing-label masks;
metrics by group and confusion matrices on a small hand-computed case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error

from synthfar_ray import labels as L
from synthfar_ray.metrics import (
    accuracy,
    age_mae,
    clip_age,
    compute_metrics,
    confusion_matrices,
    confusion_matrix,
    group_summary,
    metrics_by_group,
    rank_groups,
    regression_to_bins,
    worst_and_gap,
)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_age_mae_matches_sklearn_with_clipping_and_nan_mask(rng):
    true = rng.uniform(0, 90, 200)
    pred = rng.uniform(-30, 200, 200)  # some below 0 and above 150: must be clipped
    true[::7] = np.nan
    keep = ~np.isnan(true)
    expected = mean_absolute_error(true[keep], np.clip(pred[keep], 0, 150))
    assert age_mae(pred, true) == pytest.approx(expected)
    # Without clipping the answer would differ: the test data exercises the clip.
    assert mean_absolute_error(true[keep], pred[keep]) != pytest.approx(expected)
    assert math.isnan(age_mae(pred[:3], np.full(3, np.nan)))


def test_clip_age():
    np.testing.assert_array_equal(clip_age(np.array([-5.0, 0.0, 42.5, 150.0, 151.0])), [0, 0, 42.5, 150, 150])


def test_accuracy_matches_sklearn_and_masks_missing(rng):
    true = rng.integers(-1, 5, 300)  # -1 = unknown
    pred = rng.integers(0, 5, 300)
    keep = true >= 0
    assert accuracy(pred, true) == pytest.approx(accuracy_score(true[keep], pred[keep]))
    assert accuracy(pred, true) != pytest.approx(accuracy_score(true, pred))
    assert math.isnan(accuracy(pred[:4], -np.ones(4, dtype=int)))
    with pytest.raises(ValueError):
        accuracy(pred[:3], true[:4])


@pytest.mark.parametrize("age,expected", [(2.99, 0), (3.0, 1), (9.99, 1), (10.0, 2), (69.9, 7), (70.0, 8),
                                          (150.0, 8), (-1.0, 0), (500.0, 8)])
def test_regression_to_bins_edges(age, expected):
    assert int(regression_to_bins(np.array([age]))[0]) == expected


def test_regression_to_bins_matches_torch_bucketize_and_labels(rng):
    ages = np.concatenate([rng.uniform(-10, 160, 500), np.array(L.AGE_BIN_EDGES, dtype=float),
                           np.array(L.AGE_BIN_EDGES, dtype=float) - 0.01])
    ours = regression_to_bins(ages)
    theirs = torch.bucketize(torch.tensor(ages), torch.tensor(L.AGE_BIN_EDGES, dtype=torch.float64), right=True)
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(ours, L.age_to_bin(np.clip(ages, 0, 150)))
    assert ours.min() == 0 and ours.max() == L.NUM_AGE_BINS - 1


def _random_batch(rng, n=120):
    age = rng.uniform(0, 90, n)
    labels = {
        "age": age.astype(np.float32),
        "age_bin": L.age_to_bin(age).astype(np.int64),
        "gender": rng.integers(0, 2, n),
        "ethnicity": rng.integers(0, 5, n),
    }
    outputs = {
        "age": age + rng.normal(0, 8, n),
        "age_bin_logits": rng.normal(size=(n, L.NUM_AGE_BINS)),
        "gender_logit": rng.normal(size=n),
        "ethnicity_logits": rng.normal(size=(n, 5)),
    }
    return outputs, labels


def test_compute_metrics_all_heads(rng):
    outputs, labels = _random_batch(rng)
    m = compute_metrics(outputs, labels)
    assert m["n"] == 120
    assert m["age_mae"] == pytest.approx(mean_absolute_error(labels["age"], np.clip(outputs["age"], 0, 150)), rel=1e-5)
    assert m["age_bin_acc"] == pytest.approx(accuracy_score(labels["age_bin"], outputs["age_bin_logits"].argmax(1)))
    sig = 1 / (1 + np.exp(-outputs["gender_logit"]))
    assert m["gender_acc"] == pytest.approx(accuracy_score(labels["gender"], (sig > 0.5).astype(int)))
    assert m["ethnicity_acc"] == pytest.approx(accuracy_score(labels["ethnicity"], outputs["ethnicity_logits"].argmax(1)))

    # Bins from the regression head instead of the logits.
    r = compute_metrics(outputs, labels, age_bins_from="regression")
    expected = accuracy_score(labels["age_bin"], L.age_to_bin(np.clip(outputs["age"], 0, 150)))
    assert r["age_bin_acc"] == pytest.approx(expected)
    assert r["age_bin_acc"] != pytest.approx(m["age_bin_acc"])
    with pytest.raises(ValueError):
        compute_metrics(outputs, labels, age_bins_from="nope")  # type: ignore[arg-type]


def test_compute_metrics_fairface_style_labels(rng):
    """FairFace: no true ages (NaN), bins only; a regression-only model is scored on bins."""
    outputs, labels = _random_batch(rng)
    labels["age"] = np.full(120, np.nan, dtype=np.float32)
    labels["ethnicity"][:10] = -1  # some unknown labels are masked out
    del outputs["age_bin_logits"]
    m = compute_metrics(outputs, labels)  # "logits" requested but absent: falls back to regression
    assert "age_mae" not in m
    assert m["age_bin_acc"] == pytest.approx(accuracy_score(labels["age_bin"], regression_to_bins(outputs["age"])))
    pred_eth = outputs["ethnicity_logits"].argmax(1)
    assert m["ethnicity_acc"] == pytest.approx(accuracy_score(labels["ethnicity"][10:], pred_eth[10:]))


def test_compute_metrics_bins_only_model(rng):
    outputs, labels = _random_batch(rng)
    del outputs["age"]
    m = compute_metrics(outputs, labels, age_bins_from="regression")  # no regression head: use logits
    assert "age_mae" not in m
    assert m["age_bin_acc"] == pytest.approx(accuracy_score(labels["age_bin"], outputs["age_bin_logits"].argmax(1)))


# ----------------------------------------------------------------------------- by group
# A hand-computed case: 12 rows, white 5 / black 5 / asian 2 (indian, other absent).

def _hand_case():
    labels = {
        "age": np.array([10, 20, 30, 40, 50, 25, 25, 25, 25, 25, 65, 70], dtype=np.float32),
        "gender": np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]),
        "ethnicity": np.array([0] * 5 + [1] * 5 + [2] * 2),
    }
    labels["age_bin"] = L.age_to_bin(labels["age"]).astype(np.int64)  # 2 3 4 5 6 3 3 3 3 3 7 8
    err = np.array([1, 1, 1, 1, 1, 4, -6, 4, -4, 4, 0, 10], dtype=np.float64)
    eth_pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 2, 0])
    outputs = {
        "age": labels["age"] + err,  # row 6: 25 - 6 = 19 falls into the 10-19 bin, every other row keeps its bin
        "gender_logit": np.array([-1, -1, 1, 1, 1, 1, -1, 1, 1, 1, -1, 1], dtype=np.float64),  # rows 2, 5 wrong
        "ethnicity_logits": np.eye(5)[eth_pred],
    }
    return outputs, labels


def test_group_summary_by_ethnicity_hand_computed():
    outputs, labels = _hand_case()
    s = group_summary(outputs, labels, "ethnicity", age_bins_from="regression")
    assert list(s["groups"]) == ["white", "black", "asian"]
    assert s["absent"] == ["indian", "other"] and s["few"] == ["asian"] and s["min_rows"] == 5
    white, black, asian = s["groups"]["white"], s["groups"]["black"], s["groups"]["asian"]
    assert (white["n"], black["n"], asian["n"]) == (5, 5, 2)
    assert white["ethnicity_acc"] == 1.0 and black["ethnicity_acc"] == pytest.approx(0.6) and asian["ethnicity_acc"] == 0.5
    assert white["age_mae"] == pytest.approx(1.0) and black["age_mae"] == pytest.approx(22 / 5) and asian["age_mae"] == 5.0
    assert black["age_bin_acc"] == pytest.approx(0.8) and white["age_bin_acc"] == 1.0
    assert white["gender_acc"] == pytest.approx(4 / 5) and black["gender_acc"] == pytest.approx(4 / 5)
    # asian (2 rows) is shown but not ranked: its 0.5 would otherwise be the worst ethnicity accuracy
    assert s["worst"]["ethnicity_acc"] == {"group": "black", "value": pytest.approx(0.6)}
    assert s["gap"]["ethnicity_acc"] == pytest.approx(0.4)
    assert s["worst"]["age_mae"] == {"group": "black", "value": pytest.approx(4.4)}  # MAE: the highest is worst
    assert s["gap"]["age_mae"] == pytest.approx(3.4)
    assert s["worst"]["age_bin_acc"]["group"] == "black" and s["gap"]["age_bin_acc"] == pytest.approx(0.2)
    assert s["gap"]["gender_acc"] == 0.0 and s["worst"]["gender_acc"]["group"] == "white"  # a tie: first group


def test_group_summary_by_gender_and_age_bin_hand_computed():
    outputs, labels = _hand_case()
    by = metrics_by_group(outputs, labels, age_bins_from="regression")
    assert list(by) == ["ethnicity", "gender", "age_bin"]
    g = by["gender"]
    assert g["absent"] == [] and g["few"] == []
    assert g["groups"]["male"]["gender_acc"] == pytest.approx(4 / 6) and g["groups"]["female"]["gender_acc"] == 1.0
    assert g["groups"]["male"]["ethnicity_acc"] == 1.0 and g["groups"]["female"]["ethnicity_acc"] == 0.5
    assert g["groups"]["male"]["age_mae"] == pytest.approx(13 / 6) and g["groups"]["female"]["age_mae"] == pytest.approx(4.0)
    assert g["worst"]["gender_acc"] == {"group": "male", "value": pytest.approx(4 / 6)}
    assert g["worst"]["ethnicity_acc"]["group"] == "female" and g["gap"]["ethnicity_acc"] == pytest.approx(0.5)
    assert g["worst"]["age_mae"]["group"] == "female" and g["gap"]["age_mae"] == pytest.approx(4 - 13 / 6)
    a = by["age_bin"]
    assert a["absent"] == ["0-2", "3-9"]
    assert a["groups"]["20-29"]["n"] == 6 and a["groups"]["20-29"]["age_bin_acc"] == pytest.approx(5 / 6)
    assert a["few"] == ["10-19", "30-39", "40-49", "50-59", "60-69", "70+"]
    assert a["worst"] == {} and a["gap"] == {}  # one ranked group: nothing to compare
    json.dumps(by, allow_nan=False)  # JSON-safe as it stands


def test_group_summary_never_scores_a_missing_label():
    """FairFace-style labels: no true age, so no group has an age MAE and none is ranked on it;
    a group whose ethnicity labels are all unknown has no ethnicity accuracy (not 0, not NaN)."""
    outputs, labels = _hand_case()
    labels["age"] = np.full(12, np.nan, dtype=np.float32)
    labels["ethnicity"] = np.where(labels["gender"] == 1, -1, labels["ethnicity"])
    g = group_summary(outputs, labels, "gender", age_bins_from="regression")
    assert all("age_mae" not in m for m in g["groups"].values()) and "age_mae" not in g["worst"]
    assert "ethnicity_acc" not in g["groups"]["female"] and g["groups"]["male"]["ethnicity_acc"] == 1.0
    assert "ethnicity_acc" not in g["worst"] and "ethnicity_acc" not in g["gap"]
    e = group_summary(outputs, labels, "ethnicity", age_bins_from="regression")
    assert e["groups"]["white"]["n"] == 3  # rows with an unknown ethnicity belong to no ethnicity group
    assert group_summary(outputs, {"gender": labels["gender"]}, "age_bin") is None  # no age labels of any kind
    with pytest.raises(ValueError, match="grouping"):
        group_summary(outputs, labels, "hair")


def test_worst_and_gap():
    assert worst_and_gap({"a": 0.9, "b": 0.5, "c": 0.7}, "gender_acc") == ("b", 0.5, pytest.approx(0.4))
    assert worst_and_gap({"a": 3.0, "b": 8.0}, "age_mae") == ("b", 8.0, 5.0)
    assert worst_and_gap({"a": 0.9}, "gender_acc") is None and worst_and_gap({}, "age_mae") is None


def test_confusion_matrices_hand_computed():
    outputs, labels = _hand_case()
    c = confusion_matrices(outputs, labels, age_bins_from="regression")
    assert list(c) == ["gender", "ethnicity", "age_bin"]
    assert c["gender"] == {"classes": ["male", "female"], "matrix": [[4, 2], [0, 6]]}
    assert c["ethnicity"]["classes"] == list(L.ETHNICITIES)
    assert c["ethnicity"]["matrix"] == [[5, 0, 0, 0, 0], [2, 3, 0, 0, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5]
    ages = np.array(c["age_bin"]["matrix"])
    assert ages.shape == (9, 9) and ages.sum() == 12 and np.trace(ages) == 11 and ages[3, 2] == 1
    # no age-bin head and no age head: no age-bin matrix
    del outputs["age"]
    assert list(confusion_matrices(outputs, labels)) == ["gender", "ethnicity"]


def test_confusion_matrix_skips_unknown_and_rejects_bad_predictions():
    m = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, -1, 1]), 3)
    np.testing.assert_array_equal(m, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([3]), np.array([0]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)


def test_confusion_matrix_matches_sklearn(rng):
    from sklearn.metrics import confusion_matrix as sk_confusion

    true, pred = rng.integers(-1, 5, 300), rng.integers(0, 5, 300)
    keep = true >= 0
    np.testing.assert_array_equal(confusion_matrix(pred, true, 5), sk_confusion(true[keep], pred[keep], labels=range(5)))


def test_rank_groups_skips_missing_and_excluded():
    groups = {"a": {"gender_acc": 0.9, "age_mae": None}, "b": {"gender_acc": float("nan"), "age_mae": 4.0},
              "c": {"gender_acc": 0.6, "age_mae": 6.0}, "d": {"gender_acc": 0.1}}
    worst, gap = rank_groups(groups, exclude=["d"])
    assert worst == {"gender_acc": {"group": "c", "value": 0.6}, "age_mae": {"group": "c", "value": 6.0}}
    assert gap == {"gender_acc": pytest.approx(0.3), "age_mae": 2.0}
    assert rank_groups({"a": {"gender_acc": 0.5}}) == ({}, {})
