"""Evaluation metrics used in the paper's tables: micro accuracy, age MAE (predictions clipped to
[0, 150]) and FairFace age-bin accuracy, from bin logits or from a regression age put into bins.

Missing labels are masked, never counted: a NaN true age (FairFace has only bins) or a label < 0.
Synthetic heads (synthetic_heads.py) add pose MAE in degrees (per angle and their mean), hair
length / colour accuracy and keypoint NME (`keypoint_nme`; on a real set's sparse points
`keypoint_real_nme` / `keypoint_real_baseline_nme`), each only where some row has the label
(a real split has none).
FairFace's 7 races (`ethnicity7` labels): `race7_metrics`, the fixed fold baseline and a transfer map's accuracy.

By group: `metrics_by_group` scores every metric within each ethnicity, gender and age bin and
names the worst group and the gap (max - min) per metric; `confusion_matrices` counts true x
predicted classes per attribute. Groups without rows are listed as absent, never scored as 0.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from synthfar_ray.labels import (AGE_BIN_EDGES, AGE_BIN_NAMES, AGE_CLIP, ETHNICITIES, ETHNICITY_OF_RACE7, GENDERS,
                                 RACES7_OF_ETHNICITY)


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


def pose_mae(pred_pose: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """{"pose_<angle>_mae": degrees, ..., "pose_mae": their mean} over the rows whose angle is known
    (true NaN ignored); {} when the labels hold no known angle. pred_pose: (N, 3) yaw, pitch, roll."""
    from synthfar_ray.synthetic_heads import POSE_COLUMNS

    pred = np.asarray(pred_pose, dtype=np.float64).reshape(-1, len(POSE_COLUMNS))
    out: dict[str, float] = {}
    for j, column in enumerate(POSE_COLUMNS):
        true = labels.get(column)
        if true is None:
            continue
        true = np.asarray(true, dtype=np.float64).reshape(-1)
        _check_same_length(pred, true, column)
        keep = ~np.isnan(true)
        if keep.any():
            out[f"{column}_mae"] = float(np.mean(np.abs(pred[keep, j] - true[keep])))
    if out:
        out["pose_mae"] = float(np.mean(list(out.values())))
    return out


def keypoint_nme(pred: np.ndarray, true: np.ndarray, column: str = "keypoints") -> float:
    """Normalised mean error x 100 (Synthesis AI's case study): per row, the mean distance between
    predicted and true points over the points the row defines, divided by the row's inter-ocular
    distance (between the eye centres, keypoints.INTEROCULAR: both row kinds define them; for
    `keypoints_real`, the real layout's eye points, REAL_INTEROCULAR); then the mean over rows. Rows
    without both eye points are skipped (every real row of the dense layout); NaN when none is left.
    pred, true: (N, 2K) x0, y0, x1, y1, ... (the column's layout, keypoints.KEYPOINT_LAYOUTS)."""
    from synthfar_ray.keypoints import INTEROCULAR, KEYPOINT_LAYOUTS, REAL_INTEROCULAR

    names = KEYPOINT_LAYOUTS[column]
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != true.shape or true.ndim != 2 or true.shape[1] % 2:
        raise ValueError(f"keypoints: predictions {pred.shape} and labels {true.shape} must both be (N, 2K)")
    t, p = true.reshape(len(true), -1, 2), pred.reshape(len(pred), -1, 2)
    a, b = (names.index(name) for name in (REAL_INTEROCULAR if column == "keypoints_real" else INTEROCULAR))
    iod = np.linalg.norm(t[:, a] - t[:, b], axis=-1)
    err = np.linalg.norm(p - t, axis=-1)  # (N, K), NaN where the point is unknown
    known = ~np.isnan(err)
    keep = ~np.isnan(iod) & (iod > 0) & known.any(axis=1)
    if not keep.any():
        return float("nan")
    per_row = np.nansum(err[keep], axis=1) / known[keep].sum(axis=1) / iod[keep]
    return float(100.0 * per_row.mean())


def synthetic_head_metrics(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Pose MAE (pose_mae), hair_length_acc / hair_color_acc and keypoint_nme, for the heads the
    outputs have, each only where some row has its label."""
    result = pose_mae(outputs["pose"], labels) if "pose" in outputs else {}
    for attr in ("hair_length", "hair_color"):
        true = labels.get(attr)
        if f"{attr}_logits" in outputs and true is not None and (np.asarray(true) >= 0).any():
            result[f"{attr}_acc"] = accuracy(np.argmax(np.asarray(outputs[f"{attr}_logits"]), axis=-1), true)
    if "keypoints" in outputs and labels.get("keypoints") is not None:
        nme = keypoint_nme(outputs["keypoints"], labels["keypoints"])
        if not math.isnan(nme):
            result["keypoint_nme"] = nme
    return result | real_keypoint_metrics(outputs, labels)


def real_keypoint_metrics(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """A real set's sparse keypoints (`keypoints_real` labels), where some row has them: NME of the
    transfer head ("keypoint_real_nme", when the outputs have it) and of the fixed baseline map on
    the dense head's points ("keypoint_real_baseline_nme": each real point taken to be its nearest
    dense equivalent, keypoints.BASELINE_MAP)."""
    from synthfar_ray.keypoints import baseline_real

    true = labels.get("keypoints_real")
    if true is None or "keypoints" not in outputs:
        return {}
    found = {"keypoint_real_nme": outputs.get("keypoints_real"),
             "keypoint_real_baseline_nme": baseline_real(np.asarray(outputs["keypoints"]))}
    scores = {name: keypoint_nme(pred, true, "keypoints_real") for name, pred in found.items() if pred is not None}
    return {name: value for name, value in scores.items() if not math.isnan(value)}


def fold_chance_accuracy(ethnicity_logits: np.ndarray, race7: np.ndarray) -> float:
    """Expected 7-race accuracy of the fixed map: predict the 5-class label, then guess uniformly
    among the races folded into it (1/2 for white and asian, 1 otherwise); exact, over the rows
    whose race is known (race7 >= 0). NaN without such rows."""
    y = np.asarray(race7, dtype=np.int64)
    known = y >= 0
    if not known.any():
        return float("nan")
    pred = np.asarray(ethnicity_logits)[known].argmax(axis=1)
    hit = pred == np.asarray(ETHNICITY_OF_RACE7)[y[known]]
    share = 1.0 / np.array([len(r) for r in RACES7_OF_ETHNICITY])[pred]
    return float(np.mean(hit * share))


def race7_metrics(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """FairFace's 7 races, where the labels have some known `ethnicity7`: "race7_fold_acc" (the
    fixed 7->5 fold inverted by chance, fold_chance_accuracy, from the 5 ethnicity logits) and
    "race7_acc" (argmax of "race7_logits", a label-transfer map's output, when present)."""
    race7 = labels.get("ethnicity7")
    if race7 is None or not (np.asarray(race7) >= 0).any():
        return {}
    race7 = np.asarray(race7, dtype=np.int64)
    out: dict[str, float] = {}
    if "ethnicity_logits" in outputs:
        out["race7_fold_acc"] = fold_chance_accuracy(outputs["ethnicity_logits"], race7)
    if "race7_logits" in outputs:
        out["race7_acc"] = accuracy(np.argmax(np.asarray(outputs["race7_logits"]), axis=-1), race7)
    return out


def regression_to_bins(pred_age: np.ndarray) -> np.ndarray:
    """Ages in years -> FairFace bin indices 0..8 (bucketize on [3,10,...,70], right-closed edges,
    i.e. torch.bucketize(right=True) and labels.age_to_bin: 2.99 -> 0, 3 -> 1, 70 -> 8)."""
    edges = np.asarray(AGE_BIN_EDGES, dtype=np.float64)
    return np.searchsorted(edges, clip_age(pred_age), side="right").astype(np.int64)


def true_age_bins(labels: dict[str, np.ndarray]) -> np.ndarray | None:
    """True FairFace bins: the "age_bin" labels, else bins of the true ages (-1 where unknown);
    None when the labels have neither."""
    true_bin = labels.get("age_bin")
    if true_bin is not None:
        return np.asarray(true_bin).reshape(-1)
    true_age = labels.get("age")
    if true_age is None:
        return None
    true_age = np.asarray(true_age, dtype=np.float64).reshape(-1)
    return np.where(np.isnan(true_age), -1, np.searchsorted(
        np.asarray(AGE_BIN_EDGES, dtype=np.float64), np.nan_to_num(true_age), side="right"))


def true_classes(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """True class indices per classification attribute (None where the labels lack it)."""
    return {"age_bin": true_age_bins(labels), "gender": labels.get("gender"), "ethnicity": labels.get("ethnicity")}


def predicted_classes(outputs: dict[str, np.ndarray],
                      age_bins_from: Literal["logits", "regression"] = "logits") -> dict[str, np.ndarray]:
    """Class indices the net predicts, per classification attribute it has a head for:
    "age_bin" (from the bin logits, or bucketized regression ages when asked for or when the net
    has no bin head), "gender" (logit > 0 means female = 1), "ethnicity" (argmax)."""
    pred: dict[str, np.ndarray] = {}
    if "age_bin_logits" in outputs and (age_bins_from == "logits" or "age" not in outputs):
        pred["age_bin"] = np.argmax(np.asarray(outputs["age_bin_logits"]), axis=-1)
    elif "age" in outputs:
        pred["age_bin"] = regression_to_bins(outputs["age"])
    if "gender_logit" in outputs:
        pred["gender"] = (np.asarray(outputs["gender_logit"], dtype=np.float64).reshape(-1) > 0).astype(np.int64)
    if "ethnicity_logits" in outputs:
        pred["ethnicity"] = np.argmax(np.asarray(outputs["ethnicity_logits"]), axis=-1)
    return pred


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
    "age_bin_acc", "gender_acc", "ethnicity_acc" (each when its inputs exist), the synthetic heads'
    metrics (`synthetic_head_metrics`) and "n".
    """
    _check_bins_from(age_bins_from)
    n = _num_rows(labels)
    result: dict[str, float] = {}

    true_age = labels.get("age")
    if "age" in outputs and true_age is not None:
        true_age = np.asarray(true_age, dtype=np.float64)
        if (~np.isnan(true_age)).any():
            result["age_mae"] = age_mae(outputs["age"], true_age)

    pred = predicted_classes(outputs, age_bins_from)
    true = true_classes(labels)
    for attr in ("age_bin", "gender", "ethnicity"):
        if attr in pred and true[attr] is not None:
            result[f"{attr}_acc"] = accuracy(pred[attr], true[attr])
    result.update(synthetic_head_metrics(outputs, labels))
    result.update(race7_metrics(outputs, labels))

    result["n"] = n
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation by group: every metric within each ethnicity, gender and age bin, the worst group and
# the gap between groups, and a confusion matrix per classification attribute.

# Label column -> its groups' names (the index of a name is the label value).
GROUPINGS: dict[str, tuple[str, ...]] = {"ethnicity": ETHNICITIES, "gender": GENDERS, "age_bin": AGE_BIN_NAMES}
GROUP_METRICS: tuple[str, ...] = ("age_mae", "age_bin_acc", "ethnicity_acc", "gender_acc")
LOWER_IS_BETTER: frozenset[str] = frozenset({"age_mae", "pose_mae", "pose_yaw_mae", "pose_pitch_mae", "pose_roll_mae",
                                             "keypoint_nme", "keypoint_real_nme", "keypoint_real_baseline_nme"})
# Groups with fewer rows are flagged and left out of the worst group and the gap (a group of two
# rows has an accuracy of 0, 0.5 or 1: not a measurement of the model).
MIN_GROUP_ROWS = 5


def confusion_matrix(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class.

    Rows whose true label is unknown (outside 0..num_classes-1, e.g. -1) are not counted; a
    prediction outside that range is a bug and raises ValueError."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    true = np.asarray(true).reshape(-1).astype(np.int64)
    _check_same_length(pred, true, "confusion")
    keep = (true >= 0) & (true < num_classes)
    if ((pred[keep] < 0) | (pred[keep] >= num_classes)).any():
        raise ValueError(f"confusion: predicted classes outside 0..{num_classes - 1}")
    flat = np.bincount(true[keep] * num_classes + pred[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def confusion_matrices(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                       age_bins_from: Literal["logits", "regression"] = "logits") -> dict[str, dict]:
    """{attribute: {"classes": [names], "matrix": [[counts]]}} for gender, ethnicity and age bin,
    each where the net predicts it and the labels have it (JSON-ready lists)."""
    _check_bins_from(age_bins_from)
    pred = predicted_classes(outputs, age_bins_from)
    true = true_classes(labels)
    out: dict[str, dict] = {}
    for attr in ("gender", "ethnicity", "age_bin"):
        if attr in pred and true[attr] is not None:
            names = GROUPINGS[attr]
            matrix = confusion_matrix(pred[attr], true[attr], len(names))
            out[attr] = {"classes": list(names), "matrix": matrix.tolist()}
    return out


def _take(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[rows] for k, v in arrays.items()}


def worst_and_gap(values: dict[str, float], metric: str) -> tuple[str, float, float] | None:
    """(worst group, its value, gap = max - min) over the groups given; the worst is the lowest
    accuracy or the highest MAE (ties: the first group in the order given). None with < 2 groups."""
    if len(values) < 2:
        return None
    pick = max if metric in LOWER_IS_BETTER else min
    worst = pick(values, key=values.__getitem__)
    return worst, values[worst], max(values.values()) - min(values.values())


def group_summary(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], by: str,
                  age_bins_from: Literal["logits", "regression"] = "logits",
                  min_rows: int = MIN_GROUP_ROWS) -> dict | None:
    """Every metric within each group of label column `by` (a key of GROUPINGS).

    Returns None when the labels have no such column, else {
      "groups": {name: {"n": rows, metric: value, ...}}  groups with rows only; a metric the
                 group cannot be scored on (no true label of that kind) is left out, never NaN;
      "absent": [names of groups with no row],
      "few":    [names of groups with 1 .. min_rows-1 rows: shown, but not ranked],
      "min_rows": min_rows,
      "worst":  {metric: {"group": name, "value": v}},  over the ranked groups, where >= 2 have it;
      "gap":    {metric: max - min over the same groups}}.
    """
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r} (known: {', '.join(GROUPINGS)})")
    group_of = true_age_bins(labels) if by == "age_bin" else labels.get(by)
    if group_of is None:
        return None
    group_of = np.asarray(group_of).reshape(-1)
    groups: dict[str, dict[str, float]] = {}
    absent, few = [], []
    for index, name in enumerate(GROUPINGS[by]):
        rows = np.flatnonzero(group_of == index)
        if not len(rows):
            absent.append(name)
            continue
        scored = compute_metrics(_take(outputs, rows), _take(labels, rows), age_bins_from)
        groups[name] = {k: int(v) if k == "n" else float(v) for k, v in scored.items() if not math.isnan(v)}
        if len(rows) < min_rows:
            few.append(name)
    worst, gap = rank_groups(groups, exclude=few)
    return {"groups": groups, "absent": absent, "few": few, "min_rows": min_rows, "worst": worst, "gap": gap}


def rank_groups(groups: dict[str, dict[str, float | None]],
                exclude: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, dict], dict[str, float]]:
    """({metric: {"group", "value"}}, {metric: gap}) per GROUP_METRICS entry over the groups not
    excluded that have a finite value for it (a missing value, None or NaN, is never ranked);
    a metric fewer than two groups have is left out of both."""
    worst: dict[str, dict] = {}
    gap: dict[str, float] = {}
    for metric in GROUP_METRICS:
        ranked = {g: float(m[metric]) for g, m in groups.items()
                  if g not in exclude and isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])}
        found = worst_and_gap(ranked, metric)
        if found is not None:
            worst[metric] = {"group": found[0], "value": found[1]}
            gap[metric] = found[2]
    return worst, gap


def metrics_by_group(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                     age_bins_from: Literal["logits", "regression"] = "logits",
                     min_rows: int = MIN_GROUP_ROWS) -> dict[str, dict]:
    """{grouping: group_summary} for ethnicity, gender and age bin (those the labels have)."""
    out = {}
    for by in GROUPINGS:
        summary = group_summary(outputs, labels, by, age_bins_from, min_rows)
        if summary is not None:
            out[by] = summary
    return out


def _check_bins_from(age_bins_from: str) -> None:
    if age_bins_from not in ("logits", "regression"):
        raise ValueError(f"age_bins_from must be 'logits' or 'regression', got {age_bins_from!r}")


def _num_rows(labels: dict[str, np.ndarray]) -> int:
    sizes = {k: len(np.asarray(v)) for k, v in labels.items()}  # rows: keypoints are (N, 2K)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"label arrays differ in length: {sizes}")
    return next(iter(sizes.values()), 0)


def _check_same_length(pred: np.ndarray, true: np.ndarray, what: str) -> None:
    if pred.shape[0] != true.shape[0]:
        raise ValueError(f"{what}: {pred.shape[0]} predictions for {true.shape[0]} labels")
