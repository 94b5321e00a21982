"""Test-time label adaptation: small maps from a frozen model's outputs to a real set's labels.

`synthfar evaluate CKPT --on fairface:test --adapt-on fairface:train` predicts the adapt split with
the frozen net, fits one map per head on the rows whose label is known there, and scores the test
splits with and without the maps:

- classification heads (ethnicity, age bin; gender as one logit): an affine map of the logits,
  softmax(z W + b) (sigmoid for gender), fitted by cross-entropy with an L2 pull of W towards the
  identity, so a few hundred rows cannot move it far from the model's own reading;
- exact age: least squares, age = a * predicted + b;
- a net with exact ages and no bin head (age_mode regression), on a split with age bins: a
  transfer map from the predicted age to the 9 bins (`age_bin_logits`) in place of bucketizing it;
- label transfer, where the real set has labels the model's space lacks: FairFace's 7 races
  (`ethnicity7`) from the 5 ethnicity logits and/or the pooled encoder features (`transfer_inputs`),
  a softmax regression on the standardised inputs (L2 towards 0, its weight picked on a held-out
  fifth of the adapt rows unless given), output as `race7_logits`. Its
  fixed alternative, the 7->5 fold inverted by guessing uniformly among the races folded into the
  predicted class, is scored exactly by metrics.fold_chance_accuracy (metrics reports both).

This corrects what a synthetic-trained model gets systematically wrong on real data (class priors,
consistent confusions, an age offset), the test-time half of label transfer (Synthesis AI's case
study; issue 10). numpy only: the maps are tiny and fitted on the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from synthfar_ray.labels import FAIRFACE_RACES7, NUM_AGE_BINS

# head -> (output key, label field)
CLASS_HEADS: dict[str, tuple[str, str]] = {"ethnicity": ("ethnicity_logits", "ethnicity"),
                                           "age_bin": ("age_bin_logits", "age_bin"),
                                           "gender": ("gender_logit", "gender")}
MIN_ROWS = 20  # a head with fewer known labels on the adapt split keeps the model's own outputs
# Transfer inputs -> the output key they come from; `features` are the encoder's pooled features.
TRANSFER_INPUTS: dict[str, str] = {"logits": "ethnicity_logits", "features": "features", "age": "age"}
# Transfer map name -> the output key it writes.
TRANSFER_OUTPUTS: dict[str, str] = {"race7": "race7_logits", "age_bin": "age_bin_logits"}
# A transfer map's L2 penalty, unless given: the best of these on a held-out share of the adapt rows.
L2_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_SHARE = 0.2


@dataclass
class AffineMap:
    weight: np.ndarray  # (C, C); gender (1, 1)
    bias: np.ndarray  # (C,)
    rows: int  # labelled rows it was fitted on

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim == 1:  # one logit (gender) or one value (age) per row
            return (z[:, None] @ self.weight + self.bias)[:, 0]
        return z @ self.weight + self.bias


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fit_softmax(x: np.ndarray, y: np.ndarray, classes: int, w0: np.ndarray, l2: float, steps: int,
                 lr: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of softmax(x W + b) (sigmoid for classes == 1) fitted to integer labels by full-batch
    Adam on the mean cross-entropy + l2 * ||W - w0||^2, starting from W = w0, b = 0."""
    n = len(x)
    w, b = w0.copy(), np.zeros(w0.shape[1])
    target = (y[:, None] == np.arange(classes)[None, :]).astype(np.float64) if classes > 1 else y[:, None].astype(np.float64)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, steps + 1):
        out = x @ w + b
        p = _softmax(out) if classes > 1 else 1.0 / (1.0 + np.exp(-out))
        err = (p - target) / n
        grads = [x.T @ err + 2.0 * l2 * (w - w0), err.sum(axis=0)]
        for i, (param, g) in enumerate(zip((w, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            param -= lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return w, b


def fit_affine(logits: np.ndarray, labels: np.ndarray, l2: float = 1e-2, steps: int = 500,
               lr: float = 0.05) -> AffineMap:
    """Fit softmax(z W + b) (or sigmoid for a 1-column z) to integer labels by Adam on the mean
    cross-entropy + l2 * ||W - I||^2."""
    z = np.asarray(logits, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    c = z.shape[1]
    w, b = _fit_softmax(z, np.asarray(labels, dtype=np.int64), c, np.eye(c), l2, steps, lr)
    return AffineMap(w, b, len(z))


@dataclass
class TransferMap:
    """softmax(((x - mean) / scale) W + b): a frozen model's outputs (`inputs`, TRANSFER_INPUTS names,
    concatenated) -> a label space the model does not have (FairFace's 7 races; age bins from exact ages)."""

    inputs: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (D, classes)
    bias: np.ndarray
    rows: int
    l2: float  # the penalty it was fitted with

    def __call__(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return (transfer_inputs(outputs, self.inputs) - self.mean) / self.scale @ self.weight + self.bias


def transfer_inputs(outputs: dict[str, np.ndarray], inputs: Sequence[str]) -> np.ndarray:
    """The named inputs side by side, (N, D) float64; KeyError naming what the outputs lack."""
    missing = [name for name in inputs if TRANSFER_INPUTS[name] not in outputs]
    if missing:
        raise KeyError(f"transfer inputs {missing} need outputs {[TRANSFER_INPUTS[m] for m in missing]}, "
                       f"which the model's predictions lack (have: {sorted(outputs)})")
    parts = [np.asarray(outputs[TRANSFER_INPUTS[name]], dtype=np.float64) for name in inputs]
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)


def fit_transfer(outputs: dict[str, np.ndarray], labels: np.ndarray, classes: int, inputs: Sequence[str],
                 l2: float | None = None, steps: int = 500, lr: float = 0.05) -> TransferMap:
    """Fit a TransferMap on rows with known integer labels (all rows given must be known). `l2`
    None: the value of L2_GRID with the best log-likelihood on the last HOLDOUT_SHARE of the rows
    when fitted on the rest (the inputs' dimension ranges from 5 logits to thousands of features)."""
    x = transfer_inputs(outputs, inputs)
    y = np.asarray(labels, dtype=np.int64)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    xs = (x - mean) / scale
    w0 = np.zeros((x.shape[1], classes))
    if l2 is None:
        cut = int(round(len(xs) * (1.0 - HOLDOUT_SHARE)))
        scores = []
        for value in L2_GRID:
            w, b = _fit_softmax(xs[:cut], y[:cut], classes, w0, value, steps, lr)
            p = _softmax(xs[cut:] @ w + b)[np.arange(len(xs) - cut), y[cut:]]
            scores.append(float(np.mean(np.log(np.maximum(p, 1e-12)))))  # held-out log-likelihood
        l2 = L2_GRID[int(np.argmax(scores))]
    w, b = _fit_softmax(xs, y, classes, w0, l2, steps, lr)
    return TransferMap(tuple(inputs), mean, scale, w, b, len(x), float(l2))


def fit_label_maps(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], transfer: Sequence[str] = ("logits",),
                   transfer_l2: float | None = None) -> dict[str, AffineMap | TransferMap]:
    """One map per head the outputs have and the adapt split labels (>= MIN_ROWS known rows), and
    the transfer maps: 7 races from the `transfer` inputs where the split has `ethnicity7` labels
    (empty `transfer`: none), age bins from the exact age for a net without a bin head."""
    maps: dict[str, AffineMap | TransferMap] = {}
    for head, (key, field) in CLASS_HEADS.items():
        if key not in outputs or field not in labels:
            continue
        y = np.asarray(labels[field], dtype=np.float64)
        known = np.isfinite(y) & (y >= 0)
        if known.sum() >= MIN_ROWS:
            maps[head] = fit_affine(outputs[key][known], y[known].astype(np.int64))
    if "age" in outputs and "age" in labels:
        age = np.asarray(labels["age"], dtype=np.float64)
        known = np.isfinite(age)
        if known.sum() >= MIN_ROWS:
            pred = np.asarray(outputs["age"], dtype=np.float64)[known]
            a, b = np.polyfit(pred, age[known], 1)
            maps["age"] = AffineMap(np.array([[a]]), np.array([b]), int(known.sum()))
    race7 = np.asarray(labels.get("ethnicity7", []), dtype=np.int64)
    if transfer and (race7 >= 0).sum() >= MIN_ROWS:
        known = race7 >= 0
        maps["race7"] = fit_transfer({k: np.asarray(v)[known] for k, v in outputs.items()}, race7[known],
                                     len(FAIRFACE_RACES7), transfer, transfer_l2)
    bins = np.asarray(labels.get("age_bin", []), dtype=np.int64)
    if "age" in outputs and "age_bin_logits" not in outputs and (bins >= 0).sum() >= MIN_ROWS:
        known = bins >= 0
        maps["age_bin"] = fit_transfer({"age": np.asarray(outputs["age"])[known]}, bins[known], NUM_AGE_BINS, ("age",))
    return maps


def apply_label_maps(outputs: dict[str, np.ndarray], maps: dict[str, AffineMap | TransferMap]) -> dict[str, np.ndarray]:
    """The outputs with every mapped head replaced by its map's output (others unchanged), plus
    each transfer map's output (TRANSFER_OUTPUTS; fed the model's own outputs, as it was fitted)."""
    out = dict(outputs)
    for head, amap in maps.items():
        if isinstance(amap, TransferMap):
            out[TRANSFER_OUTPUTS[head]] = amap(outputs).astype(np.float32)
            continue
        key = "age" if head == "age" else CLASS_HEADS[head][0]
        if key in out:
            out[key] = amap(np.asarray(out[key], dtype=np.float64)).astype(np.float32)
    return out
