"""Test-time label maps (synthfar_ray/label_maps.py): fitted on a frozen model's outputs and the
real labels, they undo a model's systematic errors and leave a good model alone."""

from __future__ import annotations

import numpy as np

from synthfar_ray.label_maps import MIN_ROWS, apply_label_maps, fit_label_maps


def _biased_model(n: int, seed: int):
    """Logits of a 5-class model that reads the class (+2) but calls class 0 class 1 (+3 on logit 1)
    and prefers class 2 (+1): a systematic error, as a synthetic-trained model on real photos."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), y] += 2.0
    logits[y == 0, 1] += 3.0
    logits[:, 2] += 1.0
    return logits, y


def test_maps_undo_systematic_confusions_on_new_rows():
    logits, y = _biased_model(1000, 0)
    maps = fit_label_maps({"ethnicity_logits": logits}, {"ethnicity": y})
    test_logits, test_y = _biased_model(1000, 1)
    before = (test_logits.argmax(1) == test_y).mean()
    after = (apply_label_maps({"ethnicity_logits": test_logits}, maps)["ethnicity_logits"].argmax(1) == test_y).mean()
    assert before < 0.65 and after > before + 0.12, (before, after)  # measured 0.621 -> 0.782


def test_a_calibrated_model_keeps_its_accuracy_and_gender_and_age_maps_fit():
    rng = np.random.default_rng(2)
    n = 800
    y = rng.integers(0, 5, n)
    logits = rng.normal(0, 1, (n, 5))
    logits[np.arange(n), y] += 2.0
    gender = rng.integers(0, 2, n)
    gender_logit = np.where(gender == 1, 1.0, -1.0) + rng.normal(0, 1, n) + 2.0  # biased towards 1
    age = rng.uniform(0, 80, n)
    predicted_age = 0.5 * age + 20 + rng.normal(0, 2, n)  # shrunk towards the middle
    outputs = {"ethnicity_logits": logits, "gender_logit": gender_logit, "age": predicted_age}
    labels = {"ethnicity": y, "gender": gender, "age": age}
    maps = fit_label_maps(outputs, labels)
    assert set(maps) == {"ethnicity", "gender", "age"} and maps["ethnicity"].rows == n
    adapted = apply_label_maps(outputs, maps)
    assert (adapted["ethnicity_logits"].argmax(1) == y).mean() >= (logits.argmax(1) == y).mean() - 0.01
    assert ((adapted["gender_logit"] > 0) == gender).mean() > ((gender_logit > 0) == gender).mean() + 0.1
    assert np.abs(adapted["age"] - age).mean() < 0.5 * np.abs(predicted_age - age).mean()


def test_unknown_labels_are_skipped_and_too_few_rows_fit_nothing():
    logits, y = _biased_model(200, 3)
    y = y.astype(float)
    y[:150] = -1  # unknown
    maps = fit_label_maps({"ethnicity_logits": logits, "age_bin_logits": logits}, {"ethnicity": y,
                          "age_bin": np.full(200, -1)})
    assert set(maps) == {"ethnicity"} and maps["ethnicity"].rows == 50
    few = fit_label_maps({"ethnicity_logits": logits[:MIN_ROWS - 1]}, {"ethnicity": y[150:150 + MIN_ROWS - 1]})
    assert few == {}
