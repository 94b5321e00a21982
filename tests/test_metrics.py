"""Metrics against scikit-learn and torch on random data, with clipping and missing-label masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error

from synthfar_ray import labels as L
from synthfar_ray.metrics import accuracy, age_mae, clip_age, compute_metrics, regression_to_bins


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
