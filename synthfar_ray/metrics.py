"""Evaluation metrics used in the paper's tables: micro accuracy, age MAE (predictions clipped to
[0, 150]) and FairFace age-bin accuracy, from bin logits or from a regression age put into bins.

Missing labels are masked, never counted: a NaN true age (FairFace has only bins) or a label < 0.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from synthfar_ray.labels import AGE_BIN_EDGES, AGE_CLIP


def clip_age(pred: np.ndarray) -> np.ndarray:
    """Clip predicted ages to labels.AGE_CLIP ([0, 150] years)."""
    return np.clip(np.asarray(pred, dtype=np.float64), AGE_CLIP[0], AGE_CLIP[1])


def age_mae(pred_age: np.ndarray, true_age: np.ndarray) -> float:
    """Mean absolute error in years, predictions clipped; rows whose true age is NaN are ignored.

    Returns NaN when no row has a true age.
    """
    pred = clip_age(np.asarray(pred_age).reshape(-1))
    true = np.asarray(true_age, dtype=np.float64).reshape(-1)
    _check_same_length(pred, true, "age")
    keep = ~np.isnan(true)
    if not keep.any():
        return float("nan")
    return float(np.mean(np.abs(pred[keep] - true[keep])))


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Micro accuracy over rows whose true label is known (>= 0). NaN when none is."""
    pred = np.asarray(pred).reshape(-1)
    true = np.asarray(true).reshape(-1)
    _check_same_length(pred, true, "label")
    keep = true >= 0
    if not keep.any():
        return float("nan")
    return float(np.mean(pred[keep] == true[keep]))


def regression_to_bins(pred_age: np.ndarray) -> np.ndarray:
    """Ages in years -> FairFace bin indices 0..8 (bucketize on [3,10,...,70], right-closed edges,
    i.e. torch.bucketize(right=True) and labels.age_to_bin: 2.99 -> 0, 3 -> 1, 70 -> 8)."""
    edges = np.asarray(AGE_BIN_EDGES, dtype=np.float64)
    return np.searchsorted(edges, clip_age(pred_age), side="right").astype(np.int64)


def compute_metrics(
    outputs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    age_bins_from: Literal["logits", "regression"] = "logits",
) -> dict[str, float]:
    """All metrics a model's outputs support against the labels given.

    outputs: "age" (N,) years [optional], "age_bin_logits" (N, 9) [optional], "gender_logit" (N,)
    (> 0, i.e. sigmoid > 0.5, means female = 1), "ethnicity_logits" (N, 5).
    labels: "age" (N,) float (NaN unknown), "age_bin" (N,) int (-1 unknown), "gender", "ethnicity".
    Returns "age_mae" (only when the model predicts ages and some true age is known),
    "age_bin_acc", "gender_acc", "ethnicity_acc" (each when its inputs exist) and "n".
    """
    if age_bins_from not in ("logits", "regression"):
        raise ValueError(f"age_bins_from must be 'logits' or 'regression', got {age_bins_from!r}")
    n = _num_rows(labels)
    result: dict[str, float] = {}

    true_age = labels.get("age")
    if "age" in outputs and true_age is not None:
        true_age = np.asarray(true_age, dtype=np.float64)
        if (~np.isnan(true_age)).any():
            result["age_mae"] = age_mae(outputs["age"], true_age)

    true_bin = labels.get("age_bin")
    if true_bin is None and true_age is not None:  # derive bins from ages where only ages are known
        true_age = np.asarray(true_age, dtype=np.float64)
        true_bin = np.where(np.isnan(true_age), -1, np.searchsorted(
            np.asarray(AGE_BIN_EDGES, dtype=np.float64), np.nan_to_num(true_age), side="right"))
    if true_bin is not None:
        if "age_bin_logits" in outputs and (age_bins_from == "logits" or "age" not in outputs):
            pred_bin = np.argmax(np.asarray(outputs["age_bin_logits"]), axis=-1)
            result["age_bin_acc"] = accuracy(pred_bin, true_bin)
        elif "age" in outputs:
            result["age_bin_acc"] = accuracy(regression_to_bins(outputs["age"]), true_bin)

    if "gender_logit" in outputs and "gender" in labels:
        pred_gender = (np.asarray(outputs["gender_logit"], dtype=np.float64).reshape(-1) > 0).astype(np.int64)
        result["gender_acc"] = accuracy(pred_gender, labels["gender"])
    if "ethnicity_logits" in outputs and "ethnicity" in labels:
        pred_eth = np.argmax(np.asarray(outputs["ethnicity_logits"]), axis=-1)
        result["ethnicity_acc"] = accuracy(pred_eth, labels["ethnicity"])

    result["n"] = n
    return result


def _num_rows(labels: dict[str, np.ndarray]) -> int:
    sizes = {k: len(np.asarray(v).reshape(-1)) for k, v in labels.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"label arrays differ in length: {sizes}")
    return next(iter(sizes.values()), 0)


def _check_same_length(pred: np.ndarray, true: np.ndarray, what: str) -> None:
    if pred.shape[0] != true.shape[0]:
        raise ValueError(f"{what}: {pred.shape[0]} predictions for {true.shape[0]} labels")
