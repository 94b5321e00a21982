"""The models that score synthetic rows for the `sample` stage, and the Ray work that runs them.

- cl-sam: a classifier trained on real data (train.py's MultiTaskNet; `classifier_train_config` /
  `train_classifier` train a small one when none is given). `cl_sam_scores` turns its outputs into
  p(own label | x), combined over the class fields.
- cr-sam: a real-vs-synthetic `Discriminator` (discriminator.py: a `build_backbone` encoder + a binary head), trained
  on real train rows vs synthetic train rows in class-balanced batches, scoring p(real | x).

  Cross-fitting: a discriminator must not score the rows it was trained on (it would have learnt
  that exactly those rows are synthetic, so their realism would be underrated by an amount that
  depends on how well it memorised them). The synthetic train rows are split into
  `scorer_train.cross_fit_folds` folds by `fold_of` (a seeded hash of the id); the discriminator of
  fold f is trained on real rows vs synthetic rows of the *other* folds and scores only fold f.
  `fit_fold_discriminators` trains them (one Ray task each, in parallel) and reports exactly which
  ids each one was trained on.
- `ScoreActor`: the Ray Data `map_batches` actor that loads the scoring model(s) once and scores
  batches of synthetic rows (for cr-sam: each row with its fold's discriminator).

Datasets are read on the driver as labels and ids only; images are decoded in Ray tasks/actors.
torch is imported where a model runs (discriminator.py, the actor and tasks), so the CLI and the
stage configs load without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError
from synthfar_ray.raycluster import check_request, ensure_ray, use_gpu
from synthfar_ray.labels import CLASS_FIELDS
from synthfar_ray.sampling_config import ScorerTrain
from synthfar_ray.selection import hash_unit, label_array
from synthfar_ray.storage import StorageOptions
from synthfar_ray.transforms import decode_resize, to_model_input

if TYPE_CHECKING:
    from synthfar_ray.sampling_config import SampleConfig

logger = logging.getLogger(__name__)

FOLD_SALT = 0xC4055F17F01D  # independent of random_scores' stream for the same seed
DISCRIMINATORS_DIR = "discriminators"


# ---------------------------------------------------------------------------------------------
# Dataset access (ids and labels on the driver; images of chosen ids in tasks)


def open_dataset(uri: str, opts: StorageOptions | None) -> pads.Dataset:
    return st.open_parquet_dataset(uri, opts)


def train_filter(dataset: pads.Dataset, real_subset: int | None = None) -> pc.Expression | None:
    """split == 'train' (when the set has splits) and subset <= real_subset (when it has subsets)."""
    names = dataset.schema.names
    expr = None
    if "split" in names:
        expr = pc.field("split") == "train"
    if real_subset is not None and real_subset < 100 and "subset" in names:
        sub = pc.field("subset") <= real_subset
        expr = sub if expr is None else expr & sub
    return expr


def count_real_train(uri: str, real_subset: int, opts: StorageOptions | None) -> int:
    dataset = open_dataset(uri, opts)
    return int(dataset.count_rows(filter=train_filter(dataset, real_subset)))


def train_ids(uri: str, opts: StorageOptions | None, real_subset: int | None = None) -> np.ndarray:
    """Sorted ids of a dataset's training rows (see `train_filter`)."""
    dataset = open_dataset(uri, opts)
    ids = dataset.to_table(columns=["id"], filter=train_filter(dataset, real_subset)).column("id")
    return np.sort(ids.to_numpy(zero_copy_only=False).astype(np.int64))


def pick_ids(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n of ids (seeded, without replacement), sorted."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def read_images(uri: str, ids: np.ndarray, size: int, opts: StorageOptions | None, center_crop: int | None = None,
                real_subset: int | None = None) -> np.ndarray:
    """The training rows of `ids` decoded to (n, size, size, 3) uint8; reads only their image bytes."""
    dataset = open_dataset(uri, opts)
    expr = train_filter(dataset, real_subset)
    id_filter = pc.field("id").isin(pa.array(np.asarray(ids, dtype=np.int64)))
    table = dataset.to_table(columns=["image"], filter=id_filter if expr is None else expr & id_filter)
    if table.num_rows != len(ids):
        raise ConfigError(f"{uri}: {len(ids)} training ids asked for, {table.num_rows} rows found "
                          "(did the dataset change while sampling ran?)")
    return np.stack([decode_resize(b, size, center_crop) for b in table.column("image").to_pylist()])


# ---------------------------------------------------------------------------------------------
# cr-sam: real-vs-synthetic discriminator and cross-fit folds


def fold_of(ids: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Cross-fit fold (0 .. folds-1) of each id: a pure function of (seed, id), so a row keeps its
    fold however the data is batched, and new rows added later do not move the old ones."""
    u = hash_unit(ids, seed, FOLD_SALT)
    return np.minimum((u * folds).astype(np.int64), folds - 1)


@dataclass
class DiscriminatorFit:
    """One trained discriminator and exactly the rows it was trained on."""

    model: bytes  # see load_discriminator
    real_ids: np.ndarray
    synthetic_ids: np.ndarray
    fold: int | None = None  # cross-fit: the fold it scores (it never saw a row of it)
    folds: int | None = None
    fold_rows: int = 0  # synthetic train rows in its fold


def _fit_discriminator_task(real: str, real_ids: np.ndarray, synthetic: str, synthetic_ids: np.ndarray,
                            settings_json: str, opts: StorageOptions | None, real_subset: int, seed: int,
                            gpu: bool, fold: int | None, folds: int | None, fold_seed: int | None) -> bytes:
    import torch

    from synthfar_ray.discriminator import discriminator_bytes, train_discriminator

    settings = ScorerTrain.model_validate_json(settings_json)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    real_images = read_images(real, real_ids, settings.image_size, opts, settings.center_crop, real_subset)
    syn_images = read_images(synthetic, synthetic_ids, settings.image_size, opts, settings.synthetic_center_crop)
    logger.info("discriminator%s: %d real vs %d synthetic images at %d px on %s",
                "" if fold is None else f" fold {fold}/{folds}", len(real_images), len(syn_images),
                settings.image_size, device)
    model = train_discriminator(real_images, syn_images, settings, seed=seed + (fold or 0), device=device)
    return discriminator_bytes(model, settings, fold, folds, fold_seed)


def fit_fold_discriminators(real: str, synthetic: str, settings: ScorerTrain, opts: StorageOptions | None = None,
                            real_subset: int = 100, seed: int = 0, folds: int | None = None) -> list[DiscriminatorFit]:
    """Train cr-sam discriminators as Ray tasks (1 GPU each on a GPU cluster), in parallel.

    folds=None: one discriminator on (up to max_rows of) all synthetic train rows. folds=k: one per
    fold f, trained on synthetic train rows with `fold_of(id) != f`; the real rows (up to max_rows of
    the real train split, seeded) are the same for all. The ids each was trained on are returned."""
    import ray

    ensure_ray()
    gpu = use_gpu(settings.use_gpu, "scorer_train.use_gpu")
    real_all = train_ids(real, opts, real_subset)
    if len(real_all) == 0:
        raise ConfigError(f"cr-sam needs real training rows, but real={real} has none with split=='train'"
                          + (f" and subset <= {real_subset}" if real_subset < 100 else ""))
    syn_all = train_ids(synthetic, opts)
    if len(syn_all) == 0:
        raise ConfigError(f"cr-sam needs synthetic training rows, but synthetic={synthetic} has none with split=='train'")
    real_pick = pick_ids(real_all, settings.max_rows, seed)
    plans: list[tuple[int | None, np.ndarray, int]] = []
    if folds is None:
        plans.append((None, pick_ids(syn_all, settings.max_rows, seed + 1), 0))
    else:
        assigned = fold_of(syn_all, folds, seed)
        for f in range(folds):
            rows, rest = int((assigned == f).sum()), syn_all[assigned != f]
            if rows == 0 or len(rest) == 0:
                raise ConfigError(
                    f"scorer_train.cross_fit_folds={folds} is too many for synthetic={synthetic}: its "
                    f"{len(syn_all)} train rows leave fold {f} with {rows} rows to score and {len(rest)} to train on; "
                    "use fewer folds or more synthetic rows")
            plans.append((f, pick_ids(rest, settings.max_rows, seed + 1 + f), rows))
    check_request("cr-sam: each discriminator fit", {"CPU": 1, "GPU": 1 if gpu else 0})
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=1)(_fit_discriminator_task)
    real_ref = ray.put(real_pick)
    refs = [task.remote(real, real_ref, synthetic, syn_ids, settings.model_dump_json(), opts, real_subset, seed, gpu,
                        f, folds, None if folds is None else seed)
            for f, syn_ids, _ in plans]
    models = ray.get(refs)
    return [DiscriminatorFit(model=m, real_ids=real_pick, synthetic_ids=syn_ids, fold=f, folds=folds, fold_rows=rows)
            for m, (f, syn_ids, rows) in zip(models, plans)]


def fit_discriminator(real: str, synthetic: str, settings: ScorerTrain, opts: StorageOptions | None = None,
                      real_subset: int = 100, seed: int = 0) -> bytes:
    """One discriminator on all synthetic train rows (no cross-fit: for scoring *other* images);
    returns the serialised model (see `load_discriminator`). cr-sam uses `fit_fold_discriminators`."""
    return fit_fold_discriminators(real, synthetic, settings, opts, real_subset, seed, folds=None)[0].model


def fold_model_uri(folder: str, fold: int) -> str:
    return st.join(folder, DISCRIMINATORS_DIR, f"fold-{fold}.pt")


def fold_trained_on_uri(folder: str, fold: int) -> str:
    """Parquet (domain: 'real' | 'synthetic', id) of the rows fold `fold`'s discriminator trained on."""
    return st.join(folder, DISCRIMINATORS_DIR, f"fold-{fold}-trained-on.parquet")


# ---------------------------------------------------------------------------------------------
# cl-sam: class confidence of a classifier trained on real data


def head_for(field_name: str, model) -> bool:
    return getattr(model, {"ethnicity": "ethnicity", "gender": "gender", "age_bin": "age_bin"}[field_name], None) is not None


def input_geometry(meta: dict[str, Any]) -> tuple[int, int | None]:
    """Input size of the classifier and the centre crop it used for synthetic images (train.py's
    checkpoint meta)."""
    size, crop = meta.get("image_size"), meta.get("synthetic_center_crop")
    if not size:
        raise ConfigError(f"classifier metadata does not say its input image_size (keys: {sorted(meta)})")
    return int(size), (int(crop) if crop else None)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_probabilities(outputs: dict[str, np.ndarray], field_name: str) -> np.ndarray:
    """(n, classes) probabilities of one field from MultiTaskNet outputs as numpy ("ethnicity_logits",
    "gender_logit", "age_bin_logits"); column k is the probability of label k (gender: labels.GENDERS)."""
    if field_name == "gender":
        p1 = 1.0 / (1.0 + np.exp(-outputs["gender_logit"].reshape(-1).astype(np.float64)))
        return np.stack([1.0 - p1, p1], axis=1)
    key = "ethnicity_logits" if field_name == "ethnicity" else "age_bin_logits"
    return _softmax(outputs[key].astype(np.float64))


def cl_sam_scores(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], fields: list[str],
                  combine: str) -> np.ndarray:
    """Probability of each row's own label per field, combined over `fields`.

    outputs: MultiTaskNet outputs as numpy (see `class_probabilities`).
    A row whose label of a field is unknown (< 0) gets probability 0 for it."""
    probs = []
    for f in fields:
        y = labels[f]
        sm = class_probabilities(outputs, f)
        p = sm[np.arange(len(y)), np.clip(y, 0, sm.shape[1] - 1)]
        probs.append(np.where(y >= 0, p, 0.0))
    stacked = np.stack(probs)
    if combine == "product":
        return stacked.prod(axis=0)
    if combine == "mean":
        return stacked.mean(axis=0)
    if combine == "min":
        return stacked.min(axis=0)
    raise ValueError(f"combine must be product, mean or min, not {combine!r}")


def classifier_train_config(cfg: SampleConfig, storage_path: str):
    """The train.py TrainConfig of the small real-data classifier cl-sam trains when none is given."""
    from synthfar_ray.train import NetConfig, TrainConfig

    s = cfg.scorer_train
    return TrainConfig(
        name="classifier", storage_path=storage_path, plan="real", real=cfg.real, real_subset=cfg.real_subset,
        steps=s.steps, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
        warmup_steps=max(0, s.steps // 10), augment=s.augment, image_size=s.image_size,
        center_crop=s.center_crop, synthetic_center_crop=s.synthetic_center_crop,
        model=NetConfig(backbone=s.backbone, pretrained=s.pretrained, age_mode="both"),
        val_source="none", val_every=s.steps, log_every=max(1, s.steps // 5), use_gpu=s.use_gpu,
        cpus_per_worker=s.cpus_per_worker, data_cpus=s.data_cpus, seed=cfg.seed, keep_checkpoints=1,
        storage=cfg.storage)


def train_classifier(cfg: SampleConfig, out_dir: str) -> str:
    """cl-sam without a classifier: train a small one on the real training rows with train.py;
    returns its checkpoint URI."""
    from synthfar_ray.train import run_train

    s = cfg.scorer_train
    logger.info("cl-sam: training a %s classifier on %s (%d steps at %d px)", s.backbone, cfg.real, s.steps, s.image_size)
    result = run_train(classifier_train_config(cfg, out_dir))
    if not result.checkpoint:
        raise ConfigError(f"classifier training in {out_dir} produced no checkpoint")
    return result.checkpoint


# ---------------------------------------------------------------------------------------------
# Scoring actor (Ray Data map_batches)


class ScoreActor:
    """Ray Data map_batches actor: loads the scoring model(s) once, scores batches of synthetic rows.

    cl-sam: `model_uri` is a classifier checkpoint. cr-sam: `model_uri` is the scores folder holding
    `discriminators/fold-<f>.pt` for f < folds; each row is scored by the discriminator of its own
    fold (`fold_of(id, folds, fold_seed)`), and the output has a `fold` column.
    Rows with split != 'train' (when the batch has a split column) are dropped before decoding."""

    def __init__(self, method: str, model_uri: str | None, opts: StorageOptions | None, class_key: list[str],
                 combine: str, use_gpu: bool, folds: int | None = None, fold_seed: int = 0):
        import torch

        from synthfar_ray.discriminator import load_discriminator_meta

        self.method, self.class_key, self.combine = method, list(class_key), combine
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.center_crop: int | None = None
        if method == "cr-sam":
            if not folds:
                raise ValueError("cr-sam scoring needs the number of cross-fit folds")
            self.folds, self.fold_seed = int(folds), int(fold_seed)
            self.models = []
            for f in range(self.folds):
                model, meta = load_discriminator_meta(st.read_bytes(fold_model_uri(model_uri, f), opts), self.device)
                if (meta["fold"], meta["folds"], meta["fold_seed"]) != (f, self.folds, self.fold_seed):
                    raise ValueError(f"{fold_model_uri(model_uri, f)} is the discriminator of fold "
                                     f"{meta['fold']}/{meta['folds']} (seed {meta['fold_seed']}), not of fold "
                                     f"{f}/{self.folds} (seed {self.fold_seed})")
                self.models.append(model)
                self.size, self.center_crop = meta["image_size"], meta["synthetic_center_crop"]
        elif method == "cl-sam":
            from synthfar_ray.train import load_model

            model, meta = load_model(model_uri, opts)
            self.model = model.to(self.device).eval()
            self.size, self.center_crop = input_geometry(meta)
            fields = [f for f in self.class_key if head_for(f, self.model)]
            if not fields:
                raise ConfigError(f"classifier {model_uri} has no head for any of class_key={self.class_key}")
            self.fields = fields
        else:
            raise ValueError(f"ScoreActor does not score method {method!r}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if "split" in batch:
            keep = np.asarray(batch["split"]) == "train"
            batch = {k: np.asarray(v)[keep] for k, v in batch.items() if k != "split"}
        n = len(batch["id"])
        ids = np.asarray(batch["id"], dtype=np.int64)
        labels = {f: label_array(batch.get(f), n) for f in CLASS_FIELDS}
        images = np.stack([decode_resize(b, self.size, self.center_crop) for b in batch["image"]]) if n \
            else np.zeros((0, self.size, self.size, 3), np.uint8)
        out = {"id": ids, **{f: labels[f] for f in CLASS_FIELDS}}
        with torch.no_grad():
            x = to_model_input(torch.from_numpy(images).to(self.device))
            if self.method == "cr-sam":
                fold = fold_of(ids, self.folds, self.fold_seed)
                score = np.zeros(n, dtype=np.float64)
                for f in np.unique(fold):
                    rows = np.flatnonzero(fold == f)
                    logits = self.models[int(f)](x[torch.from_numpy(rows).to(self.device)])
                    score[rows] = torch.sigmoid(logits.float()).cpu().numpy()
                out.update(score=score, fold=fold.astype(np.int16))
            else:
                out["score"] = cl_sam_scores({k: v.float().cpu().numpy() for k, v in self.model(x).items()},
                                             labels, self.fields, self.combine)
        return out
