"""Test-time label adaptation: small maps from a frozen model's outputs to a real set's labels.

`synthfar evaluate CKPT --on fairface:test --adapt-on fairface:train` predicts the adapt split with
the frozen net, fits one map per head on the rows whose label is known there, and scores the test
splits with and without the maps:

- classification heads (ethnicity, age bin; gender as one logit): an affine map of the logits,
  softmax(z W + b) (sigmoid for gender), fitted by cross-entropy with an L2 pull of W towards the
  identity, so a few hundred rows cannot move it far from the model's own reading;
- exact age: least squares, age = a * predicted + b.

This corrects what a synthetic-trained model gets systematically wrong on real data (class priors,
consistent confusions, an age offset), the test-time half of label transfer (Synthesis AI's case
study; issue 10). numpy only: the maps are tiny and fitted on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# head -> (output key, label field)
CLASS_HEADS: dict[str, tuple[str, str]] = {"ethnicity": ("ethnicity_logits", "ethnicity"),
                                           "age_bin": ("age_bin_logits", "age_bin"),
                                           "gender": ("gender_logit", "gender")}
MIN_ROWS = 20  # a head with fewer known labels on the adapt split keeps the model's own outputs


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


def fit_affine(logits: np.ndarray, labels: np.ndarray, l2: float = 1e-2, steps: int = 500,
               lr: float = 0.05) -> AffineMap:
    """Fit softmax(z W + b) (or sigmoid for a 1-column z) to integer labels by Adam on the mean
    cross-entropy + l2 * ||W - I||^2."""
    z = np.asarray(logits, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    n, c = z.shape
    y = np.asarray(labels, dtype=np.int64)
    eye = np.eye(c)
    w, b = eye.copy(), np.zeros(c)
    target = (y[:, None] == np.arange(c)[None, :]).astype(np.float64) if c > 1 else y[:, None].astype(np.float64)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, steps + 1):
        out = z @ w + b
        p = _softmax(out) if c > 1 else 1.0 / (1.0 + np.exp(-out))
        err = (p - target) / n
        grads = [z.T @ err + 2.0 * l2 * (w - eye), err.sum(axis=0)]
        for i, (param, g) in enumerate(zip((w, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            param -= lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return AffineMap(w, b, n)


def fit_label_maps(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, AffineMap]:
    """One map per head the outputs have and the adapt split labels (>= MIN_ROWS known rows)."""
    maps: dict[str, AffineMap] = {}
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
    return maps


def apply_label_maps(outputs: dict[str, np.ndarray], maps: dict[str, AffineMap]) -> dict[str, np.ndarray]:
    """The outputs with every mapped head replaced by its map's output (others unchanged)."""
    out = dict(outputs)
    for head, amap in maps.items():
        key = "age" if head == "age" else CLASS_HEADS[head][0]
        if key in out:
            out[key] = amap(np.asarray(out[key], dtype=np.float64)).astype(np.float32)
    return out
