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


def test_fold_chance_accuracy_is_the_exact_expectation():
    """Predict the 5-class label, guess uniformly among the races folded into it: a right white or
    asian prediction scores 1/2, a right black, indian or other one 1, a wrong one 0; unknown races
    (-1) are not counted."""
    from synthfar_ray.labels import FAIRFACE_RACES7
    from synthfar_ray.metrics import compute_metrics, fold_chance_accuracy

    race = [FAIRFACE_RACES7.index(r) for r in ("Middle Eastern", "Southeast Asian", "Black", "White", "Indian")]
    pred5 = np.eye(5)[[0, 2, 1, 1, 3]]  # white, asian, black right; White called black: wrong; indian right
    assert fold_chance_accuracy(pred5, np.array(race)) == (0.5 + 0.5 + 1 + 0 + 1) / 5
    assert fold_chance_accuracy(pred5, np.array([*race[:4], -1])) == (0.5 + 0.5 + 1 + 0) / 4
    labels = {"ethnicity": np.array([0, 2, 1, 0, 3]), "gender": np.zeros(5, int), "ethnicity7": np.array(race)}
    m = compute_metrics({"ethnicity_logits": pred5, "race7_logits": np.eye(7)[race]}, labels)
    assert m["race7_fold_acc"] == 0.6 and m["race7_acc"] == 1.0
    assert "race7_fold_acc" not in compute_metrics({"ethnicity_logits": pred5}, {**labels, "ethnicity7": np.full(5, -1)})


def _race7_model(n: int, seed: int):
    """A perfect 5-class model whose logits say nothing about the race within a class; its first
    feature does (White +1 vs Middle Eastern -1, East +1 vs Southeast Asian -1, noise sd 1)."""
    from synthfar_ray.labels import ETHNICITY_OF_RACE7, FAIRFACE_RACES7

    rng = np.random.default_rng(seed)
    race = rng.integers(0, 7, n)
    logits = 4.0 * np.eye(5)[np.asarray(ETHNICITY_OF_RACE7)[race]] + rng.normal(0, 0.3, (n, 5))
    sign = np.select([race == FAIRFACE_RACES7.index(r) for r in ("White", "East Asian", "Middle Eastern",
                                                                  "Southeast Asian")], [1.0, 1.0, -1.0, -1.0], 0.0)
    features = rng.normal(0, 1, (n, 16))
    features[:, 0] += 1.0 * sign
    return {"ethnicity_logits": logits, "features": features}, race


def test_race7_transfer_from_features_beats_the_fold_where_logits_cannot():
    """With the race visible only in the features, a transfer map from logits alone is no better
    than the fold + chance (both about (3 + 4 * 0.5) / 7 = 0.71), one from logits + features is
    (Phi(1) = 0.84 within the two-race classes: about 0.91 in all)."""
    from synthfar_ray.metrics import compute_metrics

    outputs, race = _race7_model(1500, 0)
    test_out, test_race = _race7_model(1500, 1)
    labels = {"ethnicity7": test_race}
    scores = {}
    for inputs in (("logits",), ("logits", "features")):
        maps = fit_label_maps(outputs, {"ethnicity7": race}, transfer=inputs)
        assert set(maps) == {"race7"} and maps["race7"].inputs == inputs and maps["race7"].l2 in (1e-3, 1e-2, 1e-1, 1.0)
        scores[inputs] = compute_metrics(apply_label_maps(test_out, maps), labels)
    fold = scores[("logits",)]["race7_fold_acc"]
    assert abs(fold - 5 / 7) < 0.03, fold
    assert abs(scores[("logits",)]["race7_acc"] - fold) < 0.03, scores
    assert scores[("logits", "features")]["race7_acc"] > fold + 0.12, scores
    assert fit_label_maps(outputs, {"ethnicity7": race}, transfer=()) == {}


def test_exact_ages_transfer_to_age_bins_for_a_net_without_a_bin_head():
    """A regression-only net whose ages are shrunk towards 35 (0.6 * age + 14, noise sd 3), on a split
    with only age bins (FairFace): bucketizing its ages gets few bins right; the age -> 9 bins
    transfer map, fitted on 1000 rows, reads the same ages into the right bins far more often."""
    from synthfar_ray.labels import age_to_bin
    from synthfar_ray.metrics import compute_metrics

    def net(n, seed):
        rng = np.random.default_rng(seed)
        age = rng.uniform(0, 85, n)
        return {"age": 0.6 * age + 14 + rng.normal(0, 3, n)}, {"age": np.full(n, np.nan), "age_bin": age_to_bin(age)}

    outputs, labels = net(1000, 0)
    maps = fit_label_maps(outputs, labels)
    assert set(maps) == {"age_bin"} and maps["age_bin"].inputs == ("age",)
    test_out, test_labels = net(1000, 1)
    before = compute_metrics(test_out, test_labels, age_bins_from="regression")["age_bin_acc"]
    after = compute_metrics(apply_label_maps(test_out, maps), test_labels, age_bins_from="logits")["age_bin_acc"]
    assert after > before + 0.15, (before, after)
