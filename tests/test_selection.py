"""selection.py: the one reader of selection files, and the seeded id hashes (no Ray)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfar_ray.config import ConfigError
from synthfar_ray.scorers import fold_of
from synthfar_ray.selection import (SELECTION_FILE, SelectionError, random_scores, read_selection_ids, resolve_k,
                                    select_top_k, write_selection)


def _selection(tmp_path) -> str:
    scores = pd.DataFrame({"id": [5, 3, 9, 1], "score": [0.9, 0.8, 0.1, 0.5], "gender": [0, 0, 1, 1]})
    out = str(tmp_path / "sel")
    write_selection(select_top_k(scores, 2, ["gender"]), out, "random", 2, None)
    return out


def test_read_selection_ids_folder_or_file(tmp_path):
    out = _selection(tmp_path)
    ids = read_selection_ids(out)
    assert ids.dtype == np.int64 and ids.tolist() == [1, 5]
    assert read_selection_ids(os.path.join(out, SELECTION_FILE)).tolist() == [1, 5]
    # any Parquet file with id / chosen (nulls are not chosen, duplicates collapse)
    other = str(tmp_path / "mine.parquet")
    pq.write_table(pa.table({"id": pa.array([7, 2, 7, 4], pa.int64()), "chosen": [True, True, True, None]}), other)
    assert read_selection_ids(other).tolist() == [2, 7]


def test_read_selection_ids_errors_name_the_uri(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SelectionError, match=f"selection {missing} does not exist"):
        read_selection_ids(missing)
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"id": [1, 2]}), bad)
    with pytest.raises(SelectionError, match=rf"selection {bad} has no column\(s\) \['chosen'\]"):
        read_selection_ids(bad)
    none = str(tmp_path / "none.parquet")
    pq.write_table(pa.table({"id": [1, 2], "chosen": [False, False]}), none)
    with pytest.raises(SelectionError, match=f"selection {none} chooses no id"):
        read_selection_ids(none)
    assert issubclass(SelectionError, ConfigError) and issubclass(SelectionError, ValueError)


def test_resolve_k():
    assert resolve_k(7, None, 0) == 7
    assert resolve_k(None, 2.0, 5) == 10
    assert resolve_k(None, 0.01, 5) == 1
    with pytest.raises(ConfigError, match=r"k_multiple=2 needs real training rows, but real=s3://b/r has none "
                                          r"with split=='train' and subset <= 25"):
        resolve_k(None, 2.0, 0, "s3://b/r", 25)


def test_folds_are_seeded_balanced_and_independent_of_random_scores():
    ids = np.arange(30000, dtype=np.int64)
    f = fold_of(ids, 3, seed=0)
    assert set(np.unique(f)) == {0, 1, 2}
    assert np.all(np.abs(np.bincount(f) / len(ids) - 1 / 3) < 0.02)
    perm = np.random.default_rng(1).permutation(ids)
    np.testing.assert_array_equal(fold_of(perm, 3, 0), f[perm])  # pure in (seed, id)
    assert (fold_of(ids, 3, seed=1) != f).mean() > 0.5  # the seed moves rows
    # not a function of the random sampler's score for the same seed
    r = random_scores(ids, 0)
    assert abs(np.corrcoef(r, f)[0, 1]) < 0.05


def test_label_precision_counts_rows_whose_picture_matches_every_label():
    import pandas as pd

    from synthfar_ray.selection import label_precision

    rows = pd.DataFrame({
        "age": [25.0, 25.0, 5.0, 70.0], "render_age": [27.0, 45.0, 6.0, 71.0],  # bins: same, other, same, same
        "gender": [0, 1, 1, 0], "render_gender": [0, 1, 0, 0],
        "ethnicity": [2, 3, 4, 0], "render_ethnicity": [2, 3, 4, 1],
    })
    p = label_precision(rows)
    assert p == {"age_bin": 0.75, "gender": 0.75, "ethnicity": 0.75, "all": 0.25}
    assert all(v != v for v in label_precision(rows.iloc[:0]).values())  # NaN without rows
