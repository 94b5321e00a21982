"""Pure selection: which synthetic rows a score table keeps, and the selection files training reads.

- `random_scores`: a seeded uniform score per id (splitmix64 of (seed, id)).
- `select_top_k`: top-K per class of a score table (K split equally over the classes present, ties
  broken by id, unknown labels never chosen); `class_quotas` is the split, `class_names` the class
  of each row.
- `label_precision`: on procedural data (ground truth in render_* columns), the share of rows whose
  picture shows what their labels say, per attribute and for all three.
- `resolve_k`: K from `k` or `k_multiple` x the real training rows.
- `write_selection` / `read_selection_ids`: the files of a selection folder
  (`selection.parquet`: id, score, class, chosen, rank, method; plus `_manifest.json`) and THE one
  reader of them: training, Tune and anything else that needs the chosen ids call
  `read_selection_ids`.

Nothing here runs a model or Ray; the scorers live in `scorers.py`, the `sample` stage (score cache,
`run_sample`, CLI) in `sampling.py`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError
from synthfar_ray.labels import AGE_BIN_NAMES, ETHNICITIES, GENDERS
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

CLASS_NAMES: dict[str, tuple[str, ...]] = {"ethnicity": ETHNICITIES, "gender": GENDERS, "age_bin": AGE_BIN_NAMES}
UNKNOWN_CLASS = "unknown"
MANIFEST = "_manifest.json"
SELECTIONS_DIR = "_selections"
SELECTION_FILE = "selection.parquet"
SELECTION_COLUMNS: tuple[str, ...] = ("id", "score", "class", "chosen", "rank", "method")



class SelectionError(ConfigError):
    """A selection that cannot be used (missing, wrong columns, chooses nothing); names the URI."""


# ---------------------------------------------------------------------------------------------
# Seeded hashes of ids


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hash_unit(ids: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Uniform [0, 1) per id, a pure function of (seed, salt, id) (splitmix64). Different salts give
    independent streams for the same seed (random scores, cross-fit folds)."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN * np.uint64((seed & 0xFFFFFFFF) + 1)
        if salt:
            x = x ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def random_scores(ids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) score per id, a pure function of (seed, id) (splitmix64 hash), so the same
    row gets the same score however the data is split into batches."""
    return hash_unit(ids, seed)


# ---------------------------------------------------------------------------------------------
# Classes and top-K per class


def label_array(col: Any, n: int) -> np.ndarray:
    """A label column (numpy, possibly float with NaN or object with None) -> int64, -1 unknown."""
    if col is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.array([-1 if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in arr], dtype=np.float64)
    if arr.dtype.kind == "f":
        arr = np.where(np.isnan(arr), -1, arr)
    return arr.astype(np.int64)


def class_names(scores: pd.DataFrame, class_key: Iterable[str]) -> pd.Series:
    """"white/female/20-29" per row (fields in class_key order); UNKNOWN_CLASS where a field is unknown."""
    parts = []
    unknown = np.zeros(len(scores), dtype=bool)
    for key in class_key:
        if key not in scores.columns:
            raise ValueError(f"scores have no column {key!r} (columns: {list(scores.columns)})")
        values = label_array(scores[key].to_numpy(), len(scores))
        names = CLASS_NAMES[key]
        bad = (values < 0) | (values >= len(names))
        unknown |= bad
        parts.append(np.array([names[v] if not b else "" for v, b in zip(values, bad)], dtype=object))
    joined = ["/".join(p) for p in zip(*parts)] if parts else [""] * len(scores)
    return pd.Series(np.where(unknown, UNKNOWN_CLASS, np.array(joined, dtype=object)), index=scores.index, dtype=object)


def class_quotas(available: dict[str, int], k: int, redistribute: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """Split k equally over the classes (the remainder goes one each to the first classes by name).

    Returns (kept per class, wanted per class). A class with fewer rows than its share keeps all its
    rows; with `redistribute` the shortfall is shared again among the classes that have rows left
    (water-filling), so the total is min(k, all rows)."""
    names = sorted(c for c, n in available.items() if n > 0)
    kept = {c: 0 for c in available}
    wanted: dict[str, int] = {c: 0 for c in available}
    remaining, active, first = k, names, True
    while remaining > 0 and active:
        share, extra = divmod(remaining, len(active))
        for i, c in enumerate(active):
            want = share + (1 if i < extra else 0)
            if first:
                wanted[c] = want
            give = min(want, available[c] - kept[c])
            kept[c] += give
            remaining -= give
        first = False
        if not redistribute:
            break
        active = [c for c in active if kept[c] < available[c]]
    return kept, wanted


def select_top_k(scores: pd.DataFrame, k: int, class_key: list[str], redistribute: bool = False) -> pd.DataFrame:
    """Top-K per class of a score table.

    scores: columns id, score and the class_key fields (label indices, < 0 or null = unknown).
    K is split equally over the classes present (see `class_quotas`); within a class rows rank by
    score, highest first, ties by id (ascending), so the result is deterministic. Rows with an
    unknown class field are never chosen (class "unknown").
    Returns one row per input row: id, score, class, rank (1 = best in its class), chosen, sorted
    by class then rank.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for col in ("id", "score"):
        if col not in scores.columns:
            raise ValueError(f"scores have no column {col!r} (columns: {list(scores.columns)})")
    if scores["id"].duplicated().any():
        dup = scores.loc[scores["id"].duplicated(), "id"].iloc[0]
        raise ValueError(f"scores hold id {dup} more than once")
    out = pd.DataFrame({"id": scores["id"].astype(np.int64).to_numpy(),
                        "score": scores["score"].astype(np.float64).to_numpy(),
                        "class": class_names(scores, class_key).to_numpy()})
    if out["score"].isna().any():
        raise ValueError(f"{int(out['score'].isna().sum())} scores are NaN")
    out = out.sort_values(["class", "score", "id"], ascending=[True, False, True], kind="stable").reset_index(drop=True)
    out["rank"] = out.groupby("class", sort=False).cumcount().astype(np.int64) + 1

    known = out["class"] != UNKNOWN_CLASS
    n_unknown = int((~known).sum())
    if n_unknown:
        logger.warning("%d rows have an unknown %s label and are never chosen", n_unknown, "/".join(class_key))
    available = out.loc[known, "class"].value_counts().to_dict()
    kept, wanted = class_quotas(available, k, redistribute)
    short = {c: (available[c], wanted[c]) for c in sorted(available) if available[c] < wanted[c]}
    for c, (have, want) in short.items():
        logger.warning("class %s: %d rows < %d wanted; keeping all %d", c, have, want, have)
    if short:
        total = sum(kept.values())
        if redistribute:
            logger.warning("shortfall of %d rows redistributed over the other classes: %d of K=%d kept",
                           sum(w - h for h, w in short.values()), total, k)
        else:
            logger.warning("%d of K=%d rows kept (shortfall not redistributed)", total, k)
    quota = out["class"].map(kept).fillna(0).astype(np.int64)
    out["chosen"] = known & (out["rank"] <= quota)
    return out[["id", "score", "class", "rank", "chosen"]]


def resolve_k(cfg_k: int | None, k_multiple: float | None, real_train_rows: int, real: str | None = None,
              real_subset: int | None = None) -> int:
    """K: `k` itself, or round(k_multiple x real training rows) (at least 1). `real` / `real_subset`
    only make the error name the dataset."""
    if cfg_k is not None:
        return int(cfg_k)
    if k_multiple is None:
        raise ConfigError("set k (rows) or k_multiple (x real training rows)")
    if real_train_rows <= 0:
        where = f"real={real}" if real else "the real set"
        subset = f" and subset <= {real_subset}" if real_subset is not None and real_subset < 100 else ""
        raise ConfigError(f"k_multiple={k_multiple:g} needs real training rows, but {where} has none with "
                          f"split=='train'{subset}; set k (rows) instead, or point real at a set with training rows")
    return max(1, int(round(float(k_multiple) * real_train_rows)))


# ---------------------------------------------------------------------------------------------
# Selection files


RENDER_TRUTH: dict[str, str] = {"age_bin": "render_age", "gender": "render_gender", "ethnicity": "render_ethnicity"}


def label_precision(rows: pd.DataFrame) -> dict[str, float]:
    """Share of rows whose labels match what their picture shows (the render_* ground truth of the
    procedural generator): per attribute (age compared by age bin) and `all` three at once.
    Needs columns age, gender, ethnicity, render_age, render_gender, render_ethnicity; NaN without rows."""
    if len(rows) == 0:
        return {k: float("nan") for k in (*RENDER_TRUTH, "all")}
    from synthfar_ray.labels import age_to_bin

    ok = {
        "age_bin": age_to_bin(rows["age"].to_numpy(float)) == age_to_bin(rows["render_age"].to_numpy(float)),
        "gender": rows["gender"].to_numpy() == rows["render_gender"].to_numpy(),
        "ethnicity": rows["ethnicity"].to_numpy() == rows["render_ethnicity"].to_numpy(),
    }
    out = {k: float(np.mean(v)) for k, v in ok.items()}
    out["all"] = float(np.mean(ok["age_bin"] & ok["gender"] & ok["ethnicity"]))
    return out


def selection_uri(synthetic: str, method: str, k: int) -> str:
    return st.join(synthetic, SELECTIONS_DIR, f"{method}-{k}")


def write_parquet(df: pd.DataFrame, uri: str, opts: StorageOptions | None) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    st.write_bytes(uri, buf.getvalue(), opts)


def read_parquet(uri: str, opts: StorageOptions | None) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(st.read_bytes(uri, opts))).to_pandas()


def write_selection(selection: pd.DataFrame, output: str, method: str, k: int, opts: StorageOptions | None,
                    extra: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """selection.parquet (id, score, class, chosen, rank, method) + _manifest.json (written last: it
    marks the folder complete); returns per-class counts {class: {available, kept}}."""
    table = selection.assign(method=method)[list(SELECTION_COLUMNS)]
    available = table[table["class"] != UNKNOWN_CLASS].groupby("class").size()
    kept = table[table["chosen"]].groupby("class").size()
    per_class = {c: {"available": int(available[c]), "kept": int(kept.get(c, 0))} for c in available.index}
    write_parquet(table, st.join(output, SELECTION_FILE), opts)
    manifest = {"method": method, "k": k, "chosen": int(table["chosen"].sum()), "rows": len(table),
                "classes": per_class, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    st.write_bytes(st.join(output, MANIFEST), json.dumps(manifest, indent=2).encode(), opts)
    return per_class


def selection_file(uri: str) -> str:
    """The selection.parquet of a selection folder URI (a URI ending in .parquet is the file itself)."""
    return uri if uri.rstrip("/").endswith(".parquet") else st.join(uri, SELECTION_FILE)


def read_selection_ids(uri: str, opts: StorageOptions | None = None) -> np.ndarray:
    """Sorted, distinct int64 ids a selection chooses (what training keeps of the synthetic set).

    uri: a selection folder (as `write_selection` writes it) or its selection.parquet (any Parquet
    file with columns id and chosen). Raises `SelectionError` naming the URI when it does not exist,
    lacks the id / chosen columns, or chooses no id."""
    path = selection_file(uri)
    if not st.exists(path, opts):
        hint = f" (a selection folder holds {SELECTION_FILE})" if path != uri else ""
        raise SelectionError(f"selection {uri} does not exist{hint}")
    fs, local = st.resolve(path, opts)
    try:
        schema = pq.read_schema(local, filesystem=fs)
    except (OSError, ValueError) as e:
        raise SelectionError(f"selection {path} is not a readable Parquet file: {e}") from e
    missing = [c for c in ("id", "chosen") if c not in schema.names]
    if missing:
        raise SelectionError(f"selection {path} has no column(s) {missing} (columns: {schema.names}); "
                             "a selection needs id and chosen")
    try:
        table = pq.read_table(local, filesystem=fs, columns=["id", "chosen"])
    except (OSError, ValueError) as e:
        raise SelectionError(f"cannot read selection {path}: {e}") from e
    chosen = table.column("chosen")
    if not pa.types.is_boolean(chosen.type):
        raise SelectionError(f"selection {path}: column chosen is {chosen.type}, not bool")
    ids = table.filter(pc.fill_null(chosen, False)).column("id").to_numpy(zero_copy_only=False)
    if len(ids) == 0:
        raise SelectionError(f"selection {path} chooses no id ({table.num_rows} rows, none with chosen=true)")
    return np.unique(np.asarray(ids, dtype=np.int64))
