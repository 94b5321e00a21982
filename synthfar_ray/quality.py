"""Runs the `quality` stage. Its config, command line and the meaning of every column it writes are
in synthfar_ray.quality_config (`synthfar quality --help`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synthfar_ray import quality_checks as qc
from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError, dump_config
from synthfar_ray.labels import CLASS_FIELDS
from synthfar_ray.quality_config import QualityConfig, QualityFilter, Relabel
from synthfar_ray.raycluster import actor_pool, check_request, ensure_ray
from synthfar_ray.sampling_config import QualityRanking
from synthfar_ray.scorers import class_probabilities, head_for, input_geometry, pick_ids, read_images, train_ids
from synthfar_ray.selection import MANIFEST, RENDER_TRUTH, label_array, read_parquet, write_parquet

logger = logging.getLogger(__name__)

QUALITY_DIR = "_quality"
QUALITY_FILE = "quality.parquet"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
QUALITY_VERSION = 2  # bumped when what a column means changes (2: conf_<label>, colour-checked duplicates)
POSE_COLUMNS = ("pose_scale", "pose_offset_x", "pose_offset_y")
EMBED_SALT = 0xE4BEDD1E5


@dataclass
class QualityResult:
    folder: str
    rows: int
    summary: dict[str, Any]
    reused: bool
    seconds: float


# ---------------------------------------------------------------------------------------------
# Per-row checks (Ray Data actor)


class QualityActor:
    """Loads the classifier once; checks batches of rows (quality_config's docstring lists the columns)."""

    def __init__(self, classifier: str | None, opts: st.StorageOptions | None, fields: list[str], use_gpu: bool):
        self.model = None
        self.fields: list[str] = []
        if classifier is not None:
            import torch

            from synthfar_ray.checkpoints import load_model

            self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            model, meta = load_model(classifier, opts)
            self.model = model.to(self.device).eval()
            self.size, self.center_crop = input_geometry(meta)
            self.fields = [f for f in fields if head_for(f, model)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from synthfar_ray.faces import FACE_CENTRE, FACE_UNIT
        from synthfar_ray.images import decode_image

        ids = np.asarray(batch["id"], dtype=np.int64)
        n = len(ids)
        out: dict[str, np.ndarray] = {"id": ids, "decoded": np.zeros(n, bool), "blank": np.zeros(n, bool),
                                      "pixel_std": np.full(n, np.nan, np.float32), "faces": np.zeros(n, np.int16),
                                      "phash": np.zeros(n, np.int64), "thumb": np.full(n, b"", dtype=object)}
        for f in CLASS_FIELDS:  # the stated labels, -1 unknown (what agreement and relabelling compare with)
            if f in batch:
                out[f] = label_array(batch[f], n).astype(np.int16)
        if "age" in batch:
            out["age"] = np.asarray(batch["age"], np.float32)
        for k in ("face_x", "face_y", "face_w", "face_h", "pose_centre_error", "pose_size_ratio"):
            out[k] = np.full(n, np.nan, np.float32)
        procedural = ~pd.isna(batch["render_gender"]) if "render_gender" in batch else np.zeros(n, bool)
        pose = {c: np.asarray(batch[c], np.float64) if c in batch else None for c in POSE_COLUMNS}
        decoded: list[np.ndarray | None] = []
        for i, data in enumerate(batch["image"]):
            try:
                image = decode_image(data)
            except ValueError:
                decoded.append(None)
                continue
            decoded.append(image)
            out["decoded"][i] = True
            out["pixel_std"][i] = qc.pixel_std(image)
            out["blank"][i] = out["pixel_std"][i] < qc.CONSTANT_STD
            out["phash"][i] = qc.phash(image)
            out["thumb"][i] = qc.thumbnail(image)
            boxes = qc.detect_faces(image)
            out["faces"][i] = len(boxes)
            if len(boxes):
                out["face_x"][i], out["face_y"][i], out["face_w"][i], out["face_h"][i] = boxes[0]
                if all(v is not None and np.isfinite(v[i]) for v in pose.values()):
                    geometry = (FACE_CENTRE, FACE_UNIT) if procedural[i] else ()
                    head = qc.expected_head(pose["pose_scale"][i], pose["pose_offset_x"][i],
                                            pose["pose_offset_y"][i], *geometry)
                    out["pose_centre_error"][i], out["pose_size_ratio"][i] = qc.pose_adherence(boxes[0], head)
        if self.model is not None:
            out.update(self._classify(batch, decoded, n))
        return out

    def _classify(self, batch: dict[str, np.ndarray], decoded: list[np.ndarray | None], n: int) -> dict[str, np.ndarray]:
        import torch

        from synthfar_ray.transforms import decode_resize, to_model_input

        cols: dict[str, np.ndarray] = {}
        ok = np.array([d is not None for d in decoded], bool)
        rows = np.flatnonzero(ok)
        outputs: dict[str, np.ndarray] = {}
        if len(rows):
            images = np.stack([decode_resize(batch["image"][i], self.size, self.center_crop) for i in rows])
            with torch.no_grad():
                x = to_model_input(torch.from_numpy(images).to(self.device))
                outputs = {k: v.float().cpu().numpy() for k, v in self.model(x).items()}
        agreement = np.ones(n, np.float64)
        for f in self.fields:
            stated = label_array(batch.get(f), n)
            p_stated = np.full(n, np.nan, np.float32)
            pred = np.full(n, -1, np.int16)
            conf = np.full(n, np.nan, np.float32)
            if len(rows):
                probs = class_probabilities(outputs, f)
                known = stated[rows] >= 0
                p = probs[np.arange(len(rows)), np.clip(stated[rows], 0, probs.shape[1] - 1)]
                p_stated[rows] = np.where(known, p, np.nan)
                pred[rows] = probs.argmax(axis=1)
                conf[rows] = probs.max(axis=1)
            cols[f"p_{f}"], cols[f"pred_{f}"], cols[f"conf_{f}"] = p_stated, pred, conf
            agreement = agreement * p_stated  # NaN where a label is unknown or the image did not decode
        cols["label_agreement"] = agreement.astype(np.float32)
        pred_age = np.full(n, np.nan, np.float32)
        if len(rows) and "age" in outputs:
            pred_age[rows] = outputs["age"].reshape(-1)
        cols["pred_age"] = pred_age
        return cols


def _embed_task(uri: str, ids: np.ndarray, classifier: str, opts: st.StorageOptions | None,
                real_subset: int | None) -> np.ndarray:
    """Backbone features (n, d) of the training rows `ids` of a dataset."""
    import torch

    from synthfar_ray.checkpoints import load_model
    from synthfar_ray.transforms import to_model_input

    model, meta = load_model(classifier, opts)
    size, crop = input_geometry(meta)
    real_crop = meta.get("center_crop")
    images = read_images(uri, ids, size, opts, crop if real_subset is None else real_crop, real_subset)
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = to_model_input(torch.from_numpy(images[start:start + 256]))
            feats.append(model.backbone(x).float().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# The stage


def quality_key(cfg: QualityConfig, dataset: Any, real: Any, classifier_digest: str | None) -> dict[str, Any]:
    """What the columns depend on (not where the inputs live, not the compute settings)."""
    key: dict[str, Any] = {"version": QUALITY_VERSION, "dataset": dataset.key(), "classifier": classifier_digest,
                           "fields": list(cfg.fields), "duplicate_distance": cfg.duplicate_distance,
                           "duplicate_thumb_diff": cfg.duplicate_thumb_diff,
                           "embed_rows": cfg.embed_rows, "seed": cfg.seed}
    if real is not None:
        key.update(real=real.key(), real_subset=cfg.real_subset, realism=cfg.realism)
        if cfg.realism or cfg.classifier is None:
            key["scorer"] = cfg.scorer_train.model_dump(mode="json", exclude={"use_gpu"})
    return key


def quality_folder(dataset: str, fingerprint: str) -> str:
    return st.join(dataset, QUALITY_DIR, fingerprint)


def _sample_config(cfg: QualityConfig, method: str, classifier: str | None = None):
    from synthfar_ray.sampling_config import SampleConfig

    return SampleConfig(synthetic=cfg.dataset, real=cfg.real, real_subset=cfg.real_subset, method=method,
                        classifier=classifier, class_key=list(cfg.fields), scorer_train=cfg.scorer_train,
                        seed=cfg.seed, batch_size=cfg.batch_size, num_actors=cfg.num_actors,
                        cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor, storage=cfg.storage)


def check_rows(cfg: QualityConfig, content: Any, classifier: str | None) -> pd.DataFrame:
    """The per-row columns of every row of the dataset, sorted by id (a Ray Data job)."""
    import ray

    names = content.dataset().schema.names
    for col in ("id", "image"):
        if col not in names:
            raise ConfigError(f"dataset={cfg.dataset} has no {col!r} column (columns: {names})")
    carry = [c for c in (*CLASS_FIELDS, "age", *POSE_COLUMNS, "render_gender") if c in names]
    actors, gpus = actor_pool(cfg.num_actors, cfg.gpus_per_actor)
    check_request("quality: each checking actor", {"CPU": cfg.cpus_per_actor, "GPU": gpus})
    ds = st.ray_read_parquet(content.files, content.fs, columns=["id", "image", *carry]).map_batches(
        QualityActor,
        fn_constructor_kwargs={"classifier": classifier, "opts": cfg.storage, "fields": list(cfg.fields),
                               "use_gpu": gpus > 0},
        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=gpus)
    t0, frames, done = time.time(), [], 0
    for frame in ds.iter_batches(batch_format="pandas", batch_size=None):
        frames.append(frame)
        done += len(frame)
        if time.time() - t0 > 30 or done == content.rows:
            logger.info("quality: %d / %d rows checked", done, content.rows)
    df = pd.concat(frames, ignore_index=True).sort_values("id", kind="stable").reset_index(drop=True)
    if df["id"].duplicated().any():
        raise ConfigError(f"dataset={cfg.dataset} has duplicate ids, e.g. {df.loc[df['id'].duplicated(), 'id'].iloc[0]}")
    decoded = df["decoded"].to_numpy()
    ok = df[decoded]  # an undecodable row has no hash or thumbnail to compare
    groups = qc.near_duplicates(ok["id"].to_numpy(), ok["phash"].to_numpy(), cfg.duplicate_distance,
                                ok["thumb"].tolist(), cfg.duplicate_thumb_diff)
    df = df.drop(columns=["thumb"])  # only the duplicate check needs it
    df["duplicate_of"] = pd.array([groups.get(int(i)) for i in df["id"]], dtype="Int64")
    return df


def embeddings(cfg: QualityConfig, classifier: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(synthetic ids, their embeddings, real embeddings or None): up to embed_rows train rows each,
    a seeded pick; one Ray task per set, in parallel."""
    import ray

    syn_ids = pick_ids(train_ids(cfg.dataset, cfg.storage), cfg.embed_rows, cfg.seed ^ EMBED_SALT)
    task = ray.remote(num_cpus=1)(_embed_task)
    refs = [task.remote(cfg.dataset, syn_ids, classifier, cfg.storage, None)]
    if cfg.real is not None:
        real_ids = pick_ids(train_ids(cfg.real, cfg.storage, cfg.real_subset), cfg.embed_rows, cfg.seed ^ EMBED_SALT)
        refs.append(task.remote(cfg.real, real_ids, classifier, cfg.storage, cfg.real_subset))
    out = ray.get(refs)
    return syn_ids, out[0], out[1] if len(out) > 1 else None


def summarize(df: pd.DataFrame, truth: pd.DataFrame | None, syn_embed: tuple[np.ndarray, np.ndarray] | None,
              real_embed: np.ndarray | None, fields: list[str]) -> dict[str, Any]:
    """Set-level numbers from the per-row columns (rates over decoded rows)."""
    ok = df[df["decoded"]]
    n = max(len(ok), 1)
    summary: dict[str, Any] = {
        "rows": int(len(df)), "undecodable": int((~df["decoded"]).sum()),
        "blank_rate": float(ok["blank"].mean()) if len(ok) else float("nan"),
        "face_detection_rate": float((ok["faces"] > 0).sum() / n),
        "multiple_faces_rate": float((ok["faces"] > 1).sum() / n),
        "near_duplicate_rate": float(ok["duplicate_of"].notna().sum() / n),
        "pose_centre_error_median": float(ok["pose_centre_error"].median()) if ok["pose_centre_error"].notna().any() else None,
    }
    agreement: dict[str, Any] = {}
    for f in fields:
        if f"p_{f}" not in df:
            continue
        known = ok[ok[f] >= 0] if f in ok else ok.iloc[:0]
        agreement[f] = {"mean_p_stated": float(known[f"p_{f}"].mean()),
                        "predicted_equals_stated": float((known[f"pred_{f}"] == known[f].astype(int)).mean())}
        if truth is not None:
            t = known.merge(truth, on="id", how="inner")
            agreement[f]["auc_vs_truth"] = qc.auc(t[f"p_{f}"].to_numpy(), t[f"{f}_true"].to_numpy())
            agreement[f]["stated_is_true"] = float(t[f"{f}_true"].mean())
    if agreement:
        summary["label_agreement"] = agreement
    if "p_real" in df:
        summary["p_real_mean"] = float(df["p_real"].mean())
    if syn_embed is not None:
        ids, emb = syn_embed
        eth = df.set_index("id").reindex(ids)["ethnicity"].to_numpy() if "ethnicity" in df else np.full(len(ids), -1)
        summary["diversity"] = {"all": qc.mean_pairwise_distance(emb)}
        from synthfar_ray.labels import ETHNICITIES

        for k, name in enumerate(ETHNICITIES):
            rows = emb[np.asarray(eth) == k]
            if len(rows) >= 2:
                summary["diversity"][name] = qc.mean_pairwise_distance(rows)
        summary["embedded_rows"] = int(len(ids))
        if real_embed is not None and len(real_embed) >= 2:
            summary["frechet_distance_classifier_space"] = qc.frechet_distance(emb, real_embed)
            summary["real_diversity"] = qc.mean_pairwise_distance(real_embed)
    return summary


def truth_table(content: Any, fields: list[str]) -> pd.DataFrame | None:
    """id and `<field>_true` (the stated label is what the picture shows) on a procedural set; None otherwise."""
    from synthfar_ray.labels import age_to_bin

    names = content.dataset().schema.names
    if not all(c in names for c in ("id", *RENDER_TRUTH.values())):
        return None
    t = content.dataset().to_table(columns=["id", "age", "gender", "ethnicity", *RENDER_TRUTH.values()]).to_pandas()
    if t["render_gender"].isna().all():
        return None
    out = pd.DataFrame({"id": t["id"].astype(np.int64)})
    same = {"age_bin": age_to_bin(t["age"].to_numpy(float)) == age_to_bin(t["render_age"].to_numpy(float)),
            "gender": t["gender"].to_numpy() == t["render_gender"].to_numpy(),
            "ethnicity": t["ethnicity"].to_numpy() == t["render_ethnicity"].to_numpy()}
    for f in fields:
        out[f"{f}_true"] = same[f]
    return out


def summary_markdown(summary: dict[str, Any], dataset: str) -> str:
    def num(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [f"# Quality of {dataset}", "", "| measure | value |", "| --- | --- |"]
    for k in ("rows", "undecodable", "blank_rate", "face_detection_rate", "multiple_faces_rate", "near_duplicate_rate",
              "pose_centre_error_median", "p_real_mean", "frechet_distance_classifier_space", "embedded_rows"):
        if k in summary:
            lines.append(f"| {k} | {num(summary[k])} |")
    if "label_agreement" in summary:
        lines += ["", "| label | mean p(stated) | predicted = stated | AUC vs truth |", "| --- | --- | --- | --- |"]
        for f, a in summary["label_agreement"].items():
            lines.append(f"| {f} | {num(a['mean_p_stated'])} | {num(a['predicted_equals_stated'])} | "
                         f"{num(a.get('auc_vs_truth'))} |")
    if "diversity" in summary:
        lines += ["", "| diversity (mean pairwise distance, classifier space) | value |", "| --- | --- |"]
        lines += [f"| {k} | {num(v)} |" for k, v in summary["diversity"].items()]
    return "\n".join(lines) + "\n"


def run_quality(cfg: QualityConfig) -> QualityResult:
    from synthfar_ray.sampling import _sha, classifier_content, compute_scores, dataset_content

    t0 = time.time()
    content = dataset_content(cfg.dataset, cfg.storage, "dataset")
    real = dataset_content(cfg.real, cfg.storage, "real") if cfg.real is not None else None
    classifier = digest = None
    if cfg.classifier is not None:
        classifier, digest, _ = classifier_content(cfg.classifier, cfg.storage, list(cfg.fields))
    fingerprint = _sha(quality_key(cfg, content, real, digest))[:12]
    folder = quality_folder(cfg.dataset, fingerprint)
    if cfg.reuse and st.exists(st.join(folder, MANIFEST), cfg.storage):
        summary = json.loads(st.read_bytes(st.join(folder, SUMMARY_JSON), cfg.storage))
        logger.info("quality: reusing %s (same inputs and settings)", folder)
        return QualityResult(folder=folder, rows=summary["rows"], summary=summary, reused=True, seconds=time.time() - t0)
    ensure_ray()
    if classifier is None and cfg.real is not None:
        from synthfar_ray.scorers import train_classifier

        classifier = train_classifier(_sample_config(cfg, "cl-sam"), st.join(folder, "classifier"))
    if classifier is None:
        logger.warning("quality: no classifier and no real set: no label agreement, embeddings or realism")
    logger.info("quality: checking %d rows of %s", content.rows, cfg.dataset)
    df = check_rows(cfg, content, classifier)
    if cfg.real is not None and cfg.realism:
        scores, _ = compute_scores(_sample_config(cfg, "cr-sam"))
        df = df.merge(scores[["id", "score"]].rename(columns={"score": "p_real"}), on="id", how="left")
    syn_embed = real_embed = None
    if classifier is not None:
        ids, emb, real_embed = embeddings(cfg, classifier)
        syn_embed = (ids, emb)
    summary = summarize(df, truth_table(content, list(cfg.fields)), syn_embed, real_embed, list(cfg.fields))
    summary.update(dataset=cfg.dataset, real=cfg.real, classifier=classifier, seconds=round(time.time() - t0, 2))
    write_parquet(df, st.join(folder, QUALITY_FILE), cfg.storage)
    st.write_bytes(st.join(folder, SUMMARY_JSON), json.dumps(summary, indent=2, default=str).encode(), cfg.storage)
    st.write_bytes(st.join(folder, SUMMARY_MD), summary_markdown(summary, cfg.dataset).encode(), cfg.storage)
    manifest = {"fingerprint": fingerprint, "rows": len(df), "config": dump_config(cfg),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    st.write_bytes(st.join(folder, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(), cfg.storage)
    logger.info("quality: %d rows in %.1f s -> %s", len(df), time.time() - t0, folder)
    return QualityResult(folder=folder, rows=len(df), summary=summary, reused=False, seconds=time.time() - t0)


def read_quality(folder: str, opts: st.StorageOptions | None = None) -> pd.DataFrame:
    """The per-row columns of a complete quality folder."""
    if not st.exists(st.join(folder, MANIFEST), opts):
        raise ConfigError(f"{folder} is not a complete quality folder (no {MANIFEST}): run `synthfar quality` first")
    return read_parquet(st.join(folder, QUALITY_FILE), opts)


def passing_ids(qf: QualityFilter, opts: st.StorageOptions | None = None) -> np.ndarray:
    """Sorted ids of the rows that pass `qf` (see QualityFilter); errors name the setting."""
    df = read_quality(qf.folder, opts)
    keep = np.ones(len(df), bool)
    if qf.drop_blank:
        keep &= df["decoded"].to_numpy() & ~df["blank"].to_numpy()
    if qf.drop_duplicates:
        keep &= df["duplicate_of"].isna().to_numpy()
    if qf.require_face:
        keep &= df["faces"].to_numpy() > 0
    thresholds = [(f"min_agreement.{f}", f"p_{f}", t, "--classifier or --real") for f, t in qf.min_agreement.items()]
    if qf.min_p_real is not None:
        thresholds.append(("min_p_real", "p_real", qf.min_p_real, "--real"))
    for setting, column, threshold, needs in thresholds:
        if column not in df:
            raise ConfigError(f"quality.{setting}={threshold}, but {qf.folder} has no {column} column "
                              f"(run `synthfar quality` with {needs})")
        keep &= df[column].fillna(-1.0).to_numpy() >= threshold
    ids = np.sort(df.loc[keep, "id"].to_numpy(np.int64))
    logger.info("quality filter %s: %d of %d rows pass", qf.folder, len(ids), len(df))
    if len(ids) == 0:
        raise ConfigError(f"quality: no row of {qf.folder} passes the thresholds {qf.model_dump(exclude={'folder'})}")
    return ids


LOWER_IS_BETTER = ("pose_centre_error",)


def quality_rank_scores(df: pd.DataFrame, ranking: QualityRanking, folder: str = "") -> np.ndarray:
    """Score in [0, 1] per row of a quality table (see QualityRanking); -1 for rows failing the hard checks.
    A missing value ranks lowest in its column."""
    missing = [c for c in ranking.weights if c not in df]
    if missing:
        raise ConfigError(f"quality.weights names {missing}, which quality folder {folder} has no column for "
                          "(p_real needs `realism: true` and a real set; p_<label> and label_agreement a classifier): "
                          f"set quality.weights to columns it has: {sorted(df.columns)}")
    total = sum(ranking.weights.values())
    if total <= 0:
        raise ConfigError("quality.weights: at least one weight must be > 0")
    score = np.zeros(len(df), np.float64)
    for column, weight in ranking.weights.items():
        values = pd.to_numeric(df[column], errors="coerce").astype(float)
        if column in LOWER_IS_BETTER:
            values = -values
        score += weight * values.rank(pct=True, method="average").fillna(0.0).to_numpy()
    score /= total
    fails = np.zeros(len(df), bool)
    if ranking.drop_blank:
        fails |= ~df["decoded"].to_numpy(bool) | df["blank"].to_numpy(bool)
    if ranking.drop_duplicates:
        fails |= df["duplicate_of"].notna().to_numpy()
    if ranking.require_face:
        fails |= df["faces"].to_numpy() == 0
    return np.where(fails, -1.0, score)


def relabel_changes(rl: Relabel, opts: st.StorageOptions | None = None) -> pd.DataFrame:
    """The labels relabelling replaces: one row per (id, field) with the stated and the new value
    (field age also changes age_bin to the new age's bin)."""
    from synthfar_ray.labels import age_to_bin

    df = read_quality(rl.folder, opts)
    parts = []
    for f in rl.fields:
        key = "age_bin" if f == "age" else f
        needed = [f"p_{key}", f"conf_{key}", f"pred_{key}"] + (["pred_age", "age"] if f == "age" else [f])
        missing = [c for c in needed if c not in df]
        if missing:
            raise ConfigError(f"relabel.fields has {f}, but quality folder {rl.folder} has no {missing} (it needs a "
                              "classifier with that head, and quality columns of version 2)")
        confident = ((df[f"p_{key}"].fillna(1.0).to_numpy() <= rl.max_p_stated)
                     & (df[f"conf_{key}"].fillna(0.0).to_numpy() >= rl.min_confidence))
        if f == "age":
            stated, new = df["age"].to_numpy(float), df["pred_age"].to_numpy(float)
            change = confident & np.isfinite(stated) & np.isfinite(new) & (np.abs(new - stated) > rl.age_tolerance)
            new = np.clip(new, 0.0, 120.0)
        else:
            stated, new = df[f].to_numpy(float), df[f"pred_{f}"].to_numpy(float)
            change = confident & (stated >= 0) & (new >= 0) & (new != stated)
        parts.append(pd.DataFrame({"id": df["id"].to_numpy(np.int64)[change], "field": f,
                                   "stated": stated[change], "new": new[change]}))
        if f == "age":  # the bin follows the new age
            rows = parts[-1]
            parts.append(pd.DataFrame({"id": rows["id"], "field": "age_bin",
                                       "stated": age_to_bin(rows["stated"].to_numpy()).astype(float),
                                       "new": age_to_bin(rows["new"].to_numpy()).astype(float)}))
    changes = pd.concat(parts, ignore_index=True)
    logger.info("relabel: %s", ", ".join(f"{f} {int((changes['field'] == f).sum())}" for f in rl.fields) + " rows changed")
    return changes


def apply_changes(batch: dict[str, np.ndarray], changes: dict[str, dict[int, float]]) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: replace the labels `changes` names ({field: {id: new value}})."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    for f, new in changes.items():
        if f not in batch or not new:
            continue
        col = np.array(batch[f], copy=True)
        for i, row_id in enumerate(ids.tolist()):
            if row_id in new:
                col[i] = new[row_id]
        batch[f] = col
    return batch


# ---------------------------------------------------------------------------------------------
# Report section


REPORT_POINTER = "quality.json"  # in a pipeline's run_dir: {"folder": ..., "dataset": ...}


def report_blocks(run_dir: str, tmp: str, images: list[tuple[str, bytes]], opts: st.StorageOptions | None = None,
                  n: int = 8) -> list:
    """The report's quality section (when run_dir has a quality pointer): the summary, the agreement
    table, and the n worst and n best rows by the default quality ranking as image grids."""
    from synthfar_ray import plots
    from synthfar_ray.report import Block, Cell, _read

    pointer = st.join(run_dir, REPORT_POINTER)
    if not st.exists(pointer, opts):
        return []
    info = json.loads(st.read_bytes(pointer, opts))
    folder, dataset = info["folder"], info["dataset"]
    summary = json.loads(st.read_bytes(st.join(folder, SUMMARY_JSON), opts))
    df = read_quality(folder, opts)
    weights = {c: w for c, w in QualityRanking().weights.items() if c in df and df[c].notna().any()}
    score = quality_rank_scores(df, QualityRanking(weights=weights or {"pixel_std": 1.0}), folder)
    order = np.argsort(score, kind="stable")
    worst, best = df.iloc[order[:n]], df.iloc[order[::-1][:n]]

    def caption(row: pd.Series) -> str:
        flags = [name for name, bad in (("undecodable", not row["decoded"]), ("blank", row["blank"]),
                                        ("duplicate", pd.notna(row["duplicate_of"]))) if bad]
        agree = f"agree {row['label_agreement']:.2f}" if "label_agreement" in row and pd.notna(row["label_agreement"]) else ""
        return " ".join(flags) or agree or f"faces {row['faces']}"

    rows = [[Cell(k), Cell(f"{v:.3f}" if isinstance(v, float) else str(v))] for k, v in summary.items()
            if isinstance(v, (int, float)) and k != "seconds"]
    blocks = [Block("heading", "Synthetic data quality"),
              Block("text", f"`synthfar quality` of {dataset} ({summary['rows']} rows): face detection (OpenCV Haar), "
                            "blank and near-duplicate images, and agreement of a real-trained classifier with the "
                            "stated labels (AUC vs the truth on procedural sets). Fréchet distance is measured in "
                            "that classifier's embedding, not Inception's: it is not FID."),
              Block("table", headers=["measure", "value"], rows=rows)]
    agreement = summary.get("label_agreement") or {}
    if agreement:
        blocks.append(Block("table", headers=["label", "mean p(stated)", "predicted = stated", "AUC vs truth"],
                            rows=[[Cell(f), *[Cell(f"{a[k]:.3f}" if isinstance(a.get(k), float) else "n/a")
                                              for k in ("mean_p_stated", "predicted_equals_stated", "auc_vs_truth")]]
                                  for f, a in agreement.items()]))
    for label, part in (("worst", worst), ("best", best)):
        png = plots.sample_grid(dataset, f"{tmp}/quality_{label}.png", opts, n=n, ids=part["id"].tolist(),
                                captions={int(r["id"]): caption(r) for _, r in part.iterrows()})
        images.append((f"plots/quality_{label}.png", _read(png)))
        blocks.append(Block("image", f"The {n} {label} rows by the default quality ranking", image=images[-1][1],
                            image_name=images[-1][0]))
    blocks.append(Block("sources", st.join(folder, QUALITY_FILE)))
    return blocks
