"""Stage 3: choose the synthetic rows worth training on (`synthfar sample CONFIG [key=value ...]`).
The methods and the config (`SampleConfig`) are in synthfar_ray.sampling_config, the stage's command
line; this module runs the stage.

Data flow: cl-sam / cr-sam scores are one Ray Data batch-inference job over the synthetic train rows
(`map_batches` with an actor class that loads its model(s) once; random reads only ids), cached as
Parquet under `<synthetic>/_scores/<method>-<fingerprint>/` so Tune and repeated runs score each
method once. The fingerprint is of what the scores depend on, by *content*: the synthetic set (its
`_manifest.json` fingerprint and its Parquet parts: name, size, row count), the real set the same
way where a scorer is trained on it, the classifier checkpoint's weights and metadata, and the
method's settings. A synthetic set that grew, or a retrained classifier, gets new scores.
The selection (top-K per class, K split equally over the classes present, ties broken by id) is
pure pandas on the cached scores, written to `<synthetic>/_selections/<method>-<K>/`:
`selection.parquet` (id, score, class, chosen, rank, method) + `_manifest.json`.

Why folders starting with `_`: Ray Data's `read_parquet` skips paths starting with `_` or `.`, so a
reader of the synthetic dataset folder never picks up score or selection files by accident.

Module layout: `sampling_config.py` (config, CLI), `selection.py` (pure top-K, selection files and
their one reader), `scorers.py` (classifier / discriminators, the scoring actor), this module (score
cache, the stage). The public names of selection and scorers are importable from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError, dump_config
from synthfar_ray.labels import CLASS_FIELDS
from synthfar_ray.sampling_config import SampleConfig
from synthfar_ray.raycluster import actor_pool, check_request, ensure_ray
from synthfar_ray.scorers import (DISCRIMINATORS_DIR, DiscriminatorFit,  # noqa: F401
                                  ScoreActor, cl_sam_scores, classifier_train_config,
                                  count_real_train, fit_discriminator,
                                  fit_fold_discriminators, fold_model_uri, fold_of, fold_trained_on_uri,
                                  head_for, open_dataset, train_classifier, train_filter, train_ids)
from synthfar_ray.selection import (CLASS_NAMES, MANIFEST, RENDER_TRUTH, SELECTION_FILE,  # noqa: F401
                                    SELECTIONS_DIR, label_precision, UNKNOWN_CLASS, SelectionError, class_names,
                                    class_quotas, label_array, random_scores, read_parquet, read_selection_ids,
                                    resolve_k, select_top_k, selection_uri, write_parquet, write_selection)
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)
PRECISION_FILE = "label_precision.json"  # in a selection folder, procedural synthetic sets only

SCORES_DIR = "_scores"
SCORES_FILE = "scores.parquet"
# Bumped when what a cached score means changes (2: train split only, content keys, cr-sam cross-fit).
SCORES_VERSION = 2


@dataclass
class SampleResult:
    output: str  # selection folder URI
    method: str
    k: int
    chosen: int
    scores_uri: str
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    # Procedural synthetic sets only: label precision (selection.label_precision) of the chosen rows
    # and of every scored row (what a random pick gets on average); None without render_* columns.
    precision: dict[str, dict[str, float]] | None = None


# ---------------------------------------------------------------------------------------------
# What the scores depend on, by content


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class DatasetContent:
    """A dataset's Parquet parts as they are now: the files scoring reads and their identity."""

    uri: str
    fs: Any
    files: list[str]  # paths inside fs, sorted
    parts: list[tuple[str, int, int]]  # (path relative to the dataset, bytes, rows from the footer)
    manifest_fingerprint: str | None

    @property
    def rows(self) -> int:
        return sum(p[2] for p in self.parts)

    def key(self) -> dict[str, Any]:
        return {"manifest_fingerprint": self.manifest_fingerprint, "parts": len(self.parts), "rows": self.rows,
                "digest": _sha(self.parts)[:24]}

    def dataset(self) -> pads.Dataset:
        return pads.dataset(self.files, filesystem=self.fs, format="parquet")


def dataset_content(uri: str, opts: StorageOptions | None, setting: str = "dataset") -> DatasetContent:
    """List a dataset's Parquet parts (as Ray Data would read them) with size and footer row count,
    plus the `fingerprint` of its `_manifest.json` when it has one. `setting` names the config field
    in errors."""
    try:
        fs, files, base = st.parquet_files(uri, opts)
    except st.StorageError as e:
        raise st.StorageError(f"{setting}: {e}") from e

    def part(path: str) -> tuple[str, int, int]:
        with fs.open_input_file(path) as f:
            size = f.size()
            rows = pq.ParquetFile(f).metadata.num_rows
        return path[len(base):].lstrip("/"), int(size), int(rows)

    try:
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            parts = list(pool.map(part, files))
    except OSError as e:
        raise st.StorageError(f"{setting}: cannot read the Parquet footers of {uri}: {e}") from e
    manifest_fp = None
    _, path = st.resolve(uri, opts)
    if base == path.rstrip("/"):  # a folder (not a single file): it may have a manifest
        try:
            manifest = json.loads(st.read_bytes(st.join(uri, MANIFEST), opts))
            manifest_fp = manifest.get("fingerprint") if isinstance(manifest, dict) else None
        except (st.StorageError, ValueError):
            manifest_fp = None
    return DatasetContent(uri=uri, fs=fs, files=files, parts=parts, manifest_fingerprint=manifest_fp)


def classifier_content(uri: str, opts: StorageOptions | None, class_key: list[str]) -> tuple[str, str, list[str]]:
    """(resolved checkpoint URI, digest of its weights + metadata, class_key fields it has heads for).

    Loads the net on the driver (CPU) once: the digest is of what scores are computed with, so a
    retrained or replaced checkpoint (or a run folder with a newer checkpoint) is a new cache key."""
    import torch

    from synthfar_ray.train import load_model

    try:
        net, meta = load_model(uri, opts)
    except (FileNotFoundError, st.StorageError) as e:
        raise ConfigError(f"classifier={uri}: {e}") from e
    fields = [f for f in class_key if head_for(f, net)]
    missing = [f for f in class_key if f not in fields]
    if not fields:
        raise ConfigError(f"classifier={uri} has no head for any field of class_key={list(class_key)}")
    if missing:
        logger.warning("classifier %s has no head for %s: cl-sam combines %s only", uri, missing, fields)
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checkpoint"}, sort_keys=True,
                                  default=str).encode())
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return str(meta["checkpoint"]), h.hexdigest()[:24], fields


def score_key(cfg: SampleConfig, synthetic: DatasetContent, real: DatasetContent | None = None,
              classifier_digest: str | None = None) -> dict[str, Any]:
    """What the scores depend on (not K, not the output, not where the inputs live)."""
    key: dict[str, Any] = {"version": SCORES_VERSION, "method": cfg.method, "rows": "split=='train'",
                           "synthetic": synthetic.key()}
    scorer = cfg.scorer_train.model_dump(mode="json")
    if cfg.method == "random":
        key["seed"] = cfg.seed
        return key
    if cfg.method == "cl-sam":
        key.update(class_key=list(cfg.class_key), combine=cfg.combine)
        if cfg.classifier is not None:
            key["classifier"] = classifier_digest
            return key
        scorer.pop("cross_fit_folds", None)
    else:
        for name in ("cpus_per_worker", "data_cpus"):  # the classifier's Ray Train resources
            scorer.pop(name, None)
    key.update(real=real.key() if real else None, real_subset=cfg.real_subset, scorer=scorer, seed=cfg.seed)
    return key


def scores_dir(cfg: SampleConfig, fingerprint: str) -> str:
    return st.join(cfg.synthetic, SCORES_DIR, f"{cfg.method}-{fingerprint}")


# ---------------------------------------------------------------------------------------------
# Scoring


def _check_synthetic(cfg: SampleConfig, synthetic: DatasetContent) -> list[str]:
    """The label columns to carry; errors naming the setting when class_key or train rows are missing."""
    dataset = synthetic.dataset()
    schema = dataset.schema.names
    missing = [f for f in cfg.class_key if f not in schema]
    if missing:
        raise ConfigError(f"class_key={list(cfg.class_key)} names {missing}, but synthetic={cfg.synthetic} "
                          f"has no such column (columns: {schema})")
    for col in ("id", "image") if cfg.method != "random" else ("id",):
        if col not in schema:
            raise ConfigError(f"synthetic={cfg.synthetic} has no {col!r} column (columns: {schema})")
    if "split" not in schema:
        logger.warning("synthetic=%s has no split column: every row counts as a training row", cfg.synthetic)
    elif dataset.count_rows(filter=train_filter(dataset)) == 0:
        raise ConfigError(f"synthetic={cfg.synthetic} has no rows with split=='train' to score "
                          f"({synthetic.rows} rows in all)")
    return [f for f in CLASS_FIELDS if f in schema]


def score_dataset(cfg: SampleConfig, synthetic: DatasetContent, model_uri: str | None,
                  labels: list[str] | None = None) -> pd.DataFrame:
    """Scores of the synthetic train rows -> DataFrame id, ethnicity, gender, age_bin, score (by id);
    cr-sam adds `fold` (the cross-fit fold whose discriminator scored the row).

    cl-sam / cr-sam: a Ray Data batch-inference job (`ScoreActor` pool) over exactly the files of
    `synthetic`. random needs no model and no pixels: it reads the id and label columns only and
    hashes the ids on the driver."""
    import ray

    labels = _check_synthetic(cfg, synthetic) if labels is None else labels
    t0 = time.time()
    if cfg.method == "random":
        dataset = synthetic.dataset()
        table = dataset.to_table(columns=["id", *labels], filter=train_filter(dataset))
        n = table.num_rows
        ids = table.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
        df = pd.DataFrame({"id": ids, **{f: label_array(table.column(f).to_numpy(zero_copy_only=False)
                                                         if f in labels else None, n) for f in CLASS_FIELDS},
                           "score": random_scores(ids, cfg.seed)})
    else:
        ensure_ray()
        actors, gpus = actor_pool(cfg.num_actors, cfg.gpus_per_actor)
        check_request("sample: each scoring actor", {"CPU": cfg.cpus_per_actor, "GPU": gpus})
        split = ["split"] if "split" in synthetic.dataset().schema.names else []
        ds = st.ray_read_parquet(synthetic.files, synthetic.fs,
                                columns=["id", "image", *labels, *split]).map_batches(
            ScoreActor,
            fn_constructor_kwargs={"method": cfg.method, "model_uri": model_uri, "opts": cfg.storage,
                                   "class_key": list(cfg.class_key), "combine": cfg.combine, "use_gpu": gpus > 0,
                                   "folds": cfg.scorer_train.cross_fit_folds if cfg.method == "cr-sam" else None,
                                   "fold_seed": cfg.seed},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=gpus,
        )
        frames = [f for f in ds.iter_batches(batch_format="pandas", batch_size=None) if len(f)]
        columns = ["id", *CLASS_FIELDS, "score"] + (["fold"] if cfg.method == "cr-sam" else [])
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    logger.info("%s: scored %d synthetic train rows in %.1f s", cfg.method, len(df), time.time() - t0)
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def _fit_cr_sam(cfg: SampleConfig, folder: str) -> tuple[list[DiscriminatorFit], dict[str, Any]]:
    """Train the cross-fit discriminators; store each (`discriminators/fold-<f>.pt`) with the ids it
    trained on (`discriminators/fold-<f>-trained-on.parquet`: domain, id) under `folder`."""
    folds = cfg.scorer_train.cross_fit_folds
    fits = fit_fold_discriminators(cfg.real, cfg.synthetic, cfg.scorer_train, cfg.storage, cfg.real_subset,
                                   cfg.seed, folds=folds)
    records = []
    for fit in fits:
        st.write_bytes(fold_model_uri(folder, fit.fold), fit.model, cfg.storage)
        trained_on = pd.DataFrame({"domain": ["real"] * len(fit.real_ids) + ["synthetic"] * len(fit.synthetic_ids),
                                   "id": np.concatenate([fit.real_ids, fit.synthetic_ids]).astype(np.int64)})
        write_parquet(trained_on, fold_trained_on_uri(folder, fit.fold), cfg.storage)
        records.append({"fold": fit.fold, "model": fold_model_uri(folder, fit.fold),
                        "trained_on": fold_trained_on_uri(folder, fit.fold), "real_rows": len(fit.real_ids),
                        "synthetic_rows": len(fit.synthetic_ids), "fold_rows": fit.fold_rows})
    return fits, {"folds": folds, "seed": cfg.seed, "assignment": "scorers.fold_of(id, folds, seed)",
                  "discriminators": records}


def _check_cross_fit(df: pd.DataFrame, fits: list[DiscriminatorFit], info: dict[str, Any]) -> None:
    """Every scored row carries its own fold, and its fold's discriminator never trained on it."""
    ids = df["id"].to_numpy(dtype=np.int64)
    fold = df["fold"].to_numpy(dtype=np.int64)
    if not np.array_equal(fold, fold_of(ids, info["folds"], info["seed"])):
        raise RuntimeError("cr-sam: scored rows carry folds other than fold_of(id)")
    for fit, record in zip(fits, info["discriminators"]):
        scored = ids[fold == fit.fold]
        leaked = np.intersect1d(scored, fit.synthetic_ids)
        if len(leaked):
            raise RuntimeError(f"cr-sam: the discriminator of fold {fit.fold} trained on {len(leaked)} rows it scored")
        record["scored_rows"] = int(len(scored))


def quality_folder_for(cfg: SampleConfig) -> str:
    """cfg.quality.folder, or the folder `synthfar quality` writes (or reuses) for this stage's inputs."""
    from synthfar_ray.quality import run_quality
    from synthfar_ray.quality_config import QualityConfig

    if cfg.quality.folder is not None:
        return cfg.quality.folder
    qcfg = QualityConfig(dataset=cfg.synthetic, real=cfg.real, real_subset=cfg.real_subset, classifier=cfg.classifier,
                         fields=list(cfg.class_key), scorer_train=cfg.scorer_train, seed=cfg.seed,
                         batch_size=cfg.batch_size, num_actors=cfg.num_actors, cpus_per_actor=cfg.cpus_per_actor,
                         gpus_per_actor=cfg.gpus_per_actor, storage=cfg.storage)
    return run_quality(qcfg).folder


def quality_train_rows(cfg: SampleConfig, folder: str) -> pd.DataFrame:
    """The quality columns of the synthetic train rows (what selection may choose), sorted by id."""
    from synthfar_ray.quality import read_quality

    df = read_quality(folder, cfg.storage)
    missing = [f for f in cfg.class_key if f not in df]
    if missing:
        raise ConfigError(f"class_key={list(cfg.class_key)} names {missing}, but quality folder {folder} has no such "
                          "label column (the synthetic set lacks it)")
    df = df[df["id"].isin(train_ids(cfg.synthetic, cfg.storage))].sort_values("id", kind="stable")
    if df.empty:
        raise ConfigError(f"quality folder {folder} has no row of synthetic={cfg.synthetic}'s train split: "
                          "was it made for another dataset?")
    return df.reset_index(drop=True)


# Quality columns the rl policy reads (those present); the duplicate flag is added as a number.
RL_FEATURES = ("p_ethnicity", "p_gender", "p_age_bin", "label_agreement", "p_real", "faces", "blank", "pixel_std",
               "pose_centre_error")


def rl_features(df: pd.DataFrame) -> pd.DataFrame:
    """id, the class fields and the numeric quality features of quality rows (see RL_FEATURES)."""
    out = df[["id", *[f for f in CLASS_FIELDS if f in df], *[c for c in RL_FEATURES if c in df]]].copy()
    out["duplicate"] = df["duplicate_of"].notna().to_numpy()
    return out


def _rl_scores(cfg: SampleConfig, k: int | None) -> tuple[pd.DataFrame, str]:
    from synthfar_ray.rl_sampler import fingerprint, rl_scores

    if k is None:
        raise ConfigError("method rl learns a policy for one K: compute its scores with the K (run_sample does)")
    folder = quality_folder_for(cfg)
    features = rl_features(quality_train_rows(cfg, folder))
    inputs = f"quality:{folder.rstrip('/').rsplit('/', 1)[-1]}"  # the quality folder's name is its content key
    fp = fingerprint(cfg.rl, k, list(cfg.class_key), features, cfg.synthetic, cfg.real, cfg.real_subset, cfg.seed,
                     cfg.redistribute, inputs)
    state_dir = st.join(cfg.synthetic, SCORES_DIR, f"rl-{fp}")
    scores = rl_scores(cfg.synthetic, cfg.real, features, k, list(cfg.class_key), cfg.rl, state_dir, cfg.storage,
                       cfg.real_subset, cfg.seed, cfg.redistribute, inputs)
    df = features[["id"]].merge(scores, on="id")
    for f in CLASS_FIELDS:
        df[f] = label_array(features[f].to_numpy() if f in features else None, len(features))
    return df[["id", *CLASS_FIELDS, "score"]], state_dir


def compute_scores(cfg: SampleConfig, k: int | None = None) -> tuple[pd.DataFrame, str]:
    """Scores of the synthetic train rows for cfg.method, from the cache when there (and reuse_scores).
    k: the top-K the scores are for (only method rl learns for a K)."""
    if cfg.method == "rl":
        return _rl_scores(cfg, k)
    if cfg.method == "quality":  # pure pandas on the quality columns (which are cached themselves)
        from synthfar_ray.quality import QUALITY_FILE, quality_rank_scores

        folder = quality_folder_for(cfg)
        df = quality_train_rows(cfg, folder)
        scores = pd.DataFrame({"id": df["id"].to_numpy(np.int64),
                               **{f: label_array(df[f].to_numpy() if f in df else None, len(df)) for f in CLASS_FIELDS},
                               "score": quality_rank_scores(df, cfg.quality, folder)})
        return scores, st.join(folder, QUALITY_FILE)
    synthetic = dataset_content(cfg.synthetic, cfg.storage, "synthetic")
    real = None
    if cfg.method == "cr-sam" or (cfg.method == "cl-sam" and cfg.classifier is None):
        real = dataset_content(cfg.real, cfg.storage, "real")
    classifier_uri = classifier_digest = None
    if cfg.method == "cl-sam" and cfg.classifier is not None:
        classifier_uri, classifier_digest, _ = classifier_content(cfg.classifier, cfg.storage, list(cfg.class_key))
    key = score_key(cfg, synthetic, real, classifier_digest)
    fingerprint = _sha(key)[:12]
    folder = scores_dir(cfg, fingerprint)
    uri = st.join(folder, SCORES_FILE)
    if cfg.reuse_scores and st.exists(st.join(folder, MANIFEST), cfg.storage):
        logger.info("%s: using cached scores %s", cfg.method, uri)
        return read_parquet(uri, cfg.storage), uri
    labels = _check_synthetic(cfg, synthetic)  # before any training
    t0 = time.time()
    info: dict[str, Any] = {"method": cfg.method, "synthetic": cfg.synthetic, "fingerprint": fingerprint, "key": key}
    model_uri = None
    fits: list[DiscriminatorFit] = []
    if cfg.method == "cl-sam":
        model_uri = classifier_uri or train_classifier(cfg, folder)
        info.update(classifier=model_uri, classifier_digest=classifier_digest, trained_classifier=cfg.classifier is None)
    elif cfg.method == "cr-sam":
        fits, info["cross_fit"] = _fit_cr_sam(cfg, folder)
        model_uri = folder
    if cfg.method != "random":
        info.update(real=cfg.real, real_subset=cfg.real_subset, scorer_train=cfg.scorer_train.model_dump(mode="json"))
    df = score_dataset(cfg, synthetic, model_uri, labels)
    if fits:
        _check_cross_fit(df, fits, info["cross_fit"])
    write_parquet(df, uri, cfg.storage)
    info.update(rows=len(df), seconds=round(time.time() - t0, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # Manifest last: it marks the cache entry complete.
    st.write_bytes(st.join(folder, MANIFEST), json.dumps(info, indent=2, default=str).encode(), cfg.storage)
    return df, uri


# ---------------------------------------------------------------------------------------------
# Stage


def run_sample(cfg: SampleConfig) -> SampleResult:
    t0 = time.time()
    real_rows = None
    if cfg.k is None:
        try:
            real_rows = count_real_train(cfg.real, cfg.real_subset, cfg.storage)
        except st.StorageError as e:
            raise st.StorageError(f"real: {e}") from e
    k = resolve_k(cfg.k, cfg.k_multiple, real_rows or 0, cfg.real, cfg.real_subset)
    scores, scores_uri = compute_scores(cfg, k)
    selection = select_top_k(scores, k, list(cfg.class_key), cfg.redistribute)
    output = cfg.output or selection_uri(cfg.synthetic, cfg.method, k)
    per_class = write_selection(selection, output, cfg.method, k, cfg.storage, extra={
        "k_multiple": cfg.k_multiple, "real_train_rows": real_rows, "class_key": list(cfg.class_key),
        "redistribute": cfg.redistribute, "synthetic": cfg.synthetic, "real": cfg.real, "scores": scores_uri,
        "config": dump_config(cfg)})
    precision = selection_precision(cfg, selection)
    if precision is not None:
        st.write_bytes(st.join(output, PRECISION_FILE), json.dumps(precision, indent=2).encode(), cfg.storage)
        logger.info("%s: label precision of the chosen rows %.3f (all three labels right), of all scored rows %.3f",
                    cfg.method, precision["chosen"]["all"], precision["pool"]["all"])
    chosen = int(selection["chosen"].sum())
    logger.info("%s: kept %d of %d synthetic train rows (K=%d, %d classes) -> %s",
                cfg.method, chosen, len(selection), k, len(per_class), output)
    return SampleResult(output=output, method=cfg.method, k=k, chosen=chosen, scores_uri=scores_uri,
                        per_class=per_class, seconds=time.time() - t0, precision=precision)


def selection_precision(cfg: SampleConfig, selection: pd.DataFrame) -> dict[str, dict[str, float]] | None:
    """Label precision (chosen rows, all scored rows) when the synthetic set carries the procedural
    generator's ground truth (render_* columns); None otherwise."""
    content = dataset_content(cfg.synthetic, cfg.storage, "synthetic")
    dataset = content.dataset()
    columns = ["id", "age", "gender", "ethnicity", *RENDER_TRUTH.values()]
    if any(c not in dataset.schema.names for c in columns):
        return None
    truth = dataset.to_table(columns=columns).to_pandas()
    if truth["render_gender"].isna().all():
        return None  # a diffusion set: the columns exist but hold no truth
    scored = truth[truth["id"].isin(selection["id"])]
    chosen = scored[scored["id"].isin(selection.loc[selection["chosen"], "id"])]
    return {"chosen": label_precision(chosen), "pool": label_precision(scored),
            "rows": {"chosen": len(chosen), "pool": len(scored)}}


# ---------------------------------------------------------------------------------------------
# CLI


