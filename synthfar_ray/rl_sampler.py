"""RL sampler (`method: rl`): learn which synthetic rows to train on from how well a small child
network trained on them does on REAL validation data.

Formulation (a one-step bandit; the "state" is the fixed synthetic pool):

- Per-row features: the numeric columns of `features` (e.g. `synthfar quality` columns). A column
  with missing values gets its mean for them plus a `<col>_missing` 0/1 column; every column is then
  standardised over the pool (the synthetic train rows), constant columns are dropped.
- Scoring function: linear, score_i = w . x_i. A selection is the top-K per class of those scores
  with the project's own `select_top_k` (K split equally over the classes of `class_key`), i.e.
  exactly how the caller will use the final scores.
- Actor: a diagonal Gaussian over the weights, w ~ N(mu, diag(sigma^2)); exploration is in weight
  space (parameter-exploring policy gradients, Sehnke et al. 2010). Why not a per-row policy
  (Plackett-Luce over row logits, Gumbel-top-k): its samples of K of N rows, for K a good fraction
  of N, all have nearly the same mean features, so the few dozen child rewards a budget allows carry
  almost no information about which rows helped (on the test domain, random 200-of-539 picks had
  ethnicity label precision 0.700-0.715, while weight-directed picks span 0.42-0.93). A sampled
  weight vector instead picks a visibly
  different subset per child (e.g. the rows of high vs low label agreement), whose rewards differ
  by more than the child-training noise. Children come in mirrored pairs (mu + sigma*eps,
  mu - sigma*eps) trained with the same torch seed (common random numbers), so the pair's reward
  difference isolates the effect of the direction eps.
- Reward: mean validation accuracy over the heads ethnicity / gender / age_bin (rows with a known
  label; heads without val labels are skipped) of a `MultiTaskNet("tiny", None, "both")` trained
  `child_steps` steps on the chosen rows, evaluated on the real `split=='val'` rows, MINUS the mean
  accuracy of `reference_children` children trained on random selections of the same K (measured
  once at the start). Reward 0 = as good as a random pick.
- Critic: a learned scalar value V (the state never changes, so a state-value is one number),
  trained by MSE on the rewards; advantage A = r - V. A scalar baseline keeps the gradient unbiased.
- Update (REINFORCE with baseline, Adam): actor loss = -mean_c A_c log N(w_c; mu, sigma)
  - entropy * H(N(mu, sigma)); log sigma is learned too (clamped to [min_std, max_std]) unless
  `learn_std` is false. With mirrored pairs the mu-gradient reduces to (r+ - r-) eps / sigma; the
  critic matters for the sigma-gradient and for odd children counts.
- Result: score_i = mu . x_i (the mean policy's logit per row), higher = chosen first.

Randomness is counter-based: eps of episode e and the child seeds are pure functions of (seed, e,
pair), so a resumed run makes the same draws as an uninterrupted one.

Execution: the synthetic pool and the real val rows are decoded once on the driver (uint8 at
`image_size`) and put in the Ray object store; each child is a Ray task (`cpus_per_child`, one torch
thread) that gets the pool, its row indices and the val set, and returns accuracies.

Files under `state_dir` (local path or URI): `state.pt` (written atomically after every episode:
actor / critic weights, optimiser states, next episode, reward history, random reference, feature
names, fingerprint), `rewards.json` (one record per episode) and `tensorboard/`. A re-run
with the same state_dir resumes at the next episode; a finished one returns at once; a state of
other settings or inputs is refused.

torch and ray are imported inside functions: the CLI imports this module without them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError
from synthfar_ray.labels import CLASS_FIELDS
from synthfar_ray.sampling_config import RLSettings
from synthfar_ray.selection import label_array, random_scores, select_top_k
from synthfar_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
REWARDS_FILE = "rewards.json"
TENSORBOARD_DIR = "tensorboard"
STATE_VERSION = 1
HEADS: tuple[str, ...] = ("ethnicity", "gender", "age_bin")  # the heads the reward averages
NOISE_SALT = 0x5EED_A11CE  # independent of the other seeded streams of the project
REFERENCE_SALT = 0x0AD0_11CE
# Settings that do not change what a run computes: a resume may change them.
RESUMABLE_SETTINGS = ("episodes", "cpus_per_child")


# ---------------------------------------------------------------------------------------------
# Features


@dataclass
class FeatureMatrix:
    """Standardised policy inputs of every row of `features`."""

    ids: np.ndarray  # int64, row order of `features`
    x: np.ndarray  # (n, d) float32
    names: list[str]  # the d input columns (incl. <col>_missing indicators)
    mean: np.ndarray
    std: np.ndarray


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The numeric input columns: everything but id and the class fields (bools count as 0/1)."""
    cols = [c for c in features.columns if c != "id" and c not in CLASS_FIELDS]
    types = pd.api.types
    bad = [c for c in cols if not (types.is_numeric_dtype(features[c]) or types.is_bool_dtype(features[c]))]
    if bad:
        raise ConfigError(f"rl features: column(s) {bad} are not numeric (dtypes: "
                          f"{[str(features[c].dtype) for c in bad]}); drop them or encode them as numbers")
    if not cols:
        raise ConfigError(f"rl features have no numeric column besides id and {list(CLASS_FIELDS)} "
                          f"(columns: {list(features.columns)})")
    return cols


def prepare_features(features: pd.DataFrame, pool: np.ndarray | None = None) -> FeatureMatrix:
    """Impute, add missing indicators, standardise (statistics over the rows where `pool` is true,
    default all), drop constant columns. NaN and +-inf count as missing."""
    if "id" not in features.columns:
        raise ConfigError(f"rl features have no id column (columns: {list(features.columns)})")
    n = len(features)
    pool = np.ones(n, bool) if pool is None else np.asarray(pool, bool)
    if not pool.any():
        raise ConfigError("rl features: no row of the pool to standardise over")
    cols, names = [], []
    for c in feature_columns(features):
        v = features[c].to_numpy(dtype=np.float64, na_value=np.nan)
        missing = ~np.isfinite(v)
        if missing.any():
            known = pool & ~missing
            fill = float(v[known].mean()) if known.any() else 0.0
            cols.append(np.where(missing, fill, v))
            names.append(c)
            cols.append(missing.astype(np.float64))
            names.append(f"{c}_missing")
        else:
            cols.append(v)
            names.append(c)
    raw = np.stack(cols, axis=1)
    mean, std = raw[pool].mean(axis=0), raw[pool].std(axis=0)
    keep = std > 1e-12
    if not keep.any():
        raise ConfigError(f"rl features: every column is constant over the pool ({names})")
    dropped = [nm for nm, k in zip(names, keep) if not k]
    if dropped:
        logger.info("rl: constant feature column(s) %s carry no information; dropped", dropped)
    x = (raw[:, keep] - mean[keep]) / std[keep]
    return FeatureMatrix(ids=features["id"].to_numpy(dtype=np.int64), x=x.astype(np.float32),
                         names=[nm for nm, k in zip(names, keep) if k], mean=mean[keep], std=std[keep])


# ---------------------------------------------------------------------------------------------
# Policy pieces (pure torch; also unit-tested)


def gaussian_log_prob(w, mu, log_std):
    """log N(w; mu, diag(exp(log_std)^2)), summed over the last dimension (torch tensors)."""
    import torch

    z = (w - mu) / torch.exp(log_std)
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of the diagonal Gaussian (torch scalar)."""
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()


def episode_noise(seed: int, episode: int, children: int, dim: int) -> np.ndarray:
    """(children, dim) standard normal directions of one episode, mirrored in pairs (+eps, -eps);
    a pure function of (seed, episode) so a resumed run draws what an uninterrupted one would."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, episode, NOISE_SALT])
    pairs = rng.standard_normal(((children + 1) // 2, dim))
    return np.stack([pairs, -pairs], axis=1).reshape(-1, dim)[:children]


def child_seed(seed: int, episode: int, child: int) -> int:
    """torch seed of a child: the two children of a mirrored pair share it (common random numbers);
    episode -1 = the random reference."""
    pair = child // 2 if episode >= 0 else child
    digest = hashlib.sha256(f"{seed}/{episode}/{pair}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class Policy:
    """Actor (Gaussian over the linear weights) + critic (scalar value), with their optimisers."""

    def __init__(self, dim: int, settings: RLSettings):
        import torch

        self.settings = settings
        self.mu = torch.zeros(dim, requires_grad=True)
        self.log_std = torch.full((dim,), float(np.log(settings.init_std)), requires_grad=True)
        self.value = torch.zeros((), requires_grad=True)
        actor = [self.mu, self.log_std] if settings.learn_std else [self.mu]
        self.actor_opt = torch.optim.Adam(actor, lr=settings.policy_lr)
        self.critic_opt = torch.optim.Adam([self.value], lr=settings.critic_lr)

    def sample(self, eps: np.ndarray) -> np.ndarray:
        """Weight vectors mu + sigma * eps (one per row of eps)."""
        with_std = self.mu.detach().numpy() + np.exp(self.log_std.detach().numpy()) * eps
        return with_std.astype(np.float32)

    def update(self, weights: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
        """One REINFORCE-with-baseline step of the actor and one MSE step of the critic; returns what
        the episode logs (value and advantage are before the update)."""
        import torch

        w = torch.as_tensor(weights, dtype=torch.float32)
        r = torch.as_tensor(rewards, dtype=torch.float32)
        value = self.value.detach().clone()
        advantage = r - value
        log_prob = gaussian_log_prob(w, self.mu, self.log_std)
        entropy = gaussian_entropy(self.log_std)
        actor_loss = -(advantage * log_prob).mean() - self.settings.entropy * entropy
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            self.log_std.clamp_(float(np.log(self.settings.min_std)), float(np.log(self.settings.max_std)))
        critic_loss = ((r - self.value) ** 2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        return {"value": float(value), "advantage": float(advantage.mean()),
                "advantage_abs": float(advantage.abs().mean()), "entropy": float(entropy.detach()),
                "std": float(torch.exp(self.log_std).mean().detach()), "critic_loss": float(critic_loss.detach())}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """score_i = mu . x_i."""
        return (x.astype(np.float64) @ self.mu.detach().numpy().astype(np.float64))

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu.detach().clone(), "log_std": self.log_std.detach().clone(),
                "value": self.value.detach().clone(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.mu.copy_(state["mu"])
            self.log_std.copy_(state["log_std"])
            self.value.copy_(state["value"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])


# ---------------------------------------------------------------------------------------------
# Data: the synthetic pool and the real val rows, decoded once on the driver


@dataclass
class Images:
    """Decoded rows, sorted by id."""

    ids: np.ndarray  # int64
    images: np.ndarray  # (n, s, s, 3) uint8
    labels: dict[str, np.ndarray]  # HEADS -> int64, -1 unknown


def _read_rows(uri: str, expr: pc.Expression, size: int, center_crop: int | None, opts: StorageOptions | None,
               what: str) -> Images:
    """id, decoded image and the HEADS labels of the rows matching `expr`, sorted by id."""
    from synthfar_ray.transforms import decode_resize

    dataset = st.open_parquet_dataset(uri, opts)
    cols = ["id", "image"] + [h for h in HEADS if h in dataset.schema.names]
    table = dataset.to_table(columns=cols, filter=expr).sort_by("id")
    if table.num_rows == 0:
        raise ConfigError(f"rl: {what}={uri} has no rows for {expr}")
    n = table.num_rows
    labels = {h: label_array(table.column(h).to_numpy(zero_copy_only=False) if h in cols else None, n) for h in HEADS}
    images = np.stack([decode_resize(b, size, center_crop) for b in table.column("image").to_pylist()])
    return Images(np.asarray(table.column("id").to_numpy(zero_copy_only=False), np.int64), images, labels)


def read_pool(synthetic: str, ids: np.ndarray, settings: RLSettings, opts: StorageOptions | None) -> Images:
    """The synthetic train rows of `ids` (the children's training pool)."""
    dataset = st.open_parquet_dataset(synthetic, opts)
    expr = pc.field("id").isin(pa.array(np.asarray(ids, np.int64)))
    if "split" in dataset.schema.names:
        expr = expr & (pc.field("split") == "train")
    return _read_rows(synthetic, expr, settings.image_size, settings.synthetic_center_crop, opts, "synthetic")


def read_val(real: str, settings: RLSettings, opts: StorageOptions | None, seed: int) -> Images:
    """Up to max_val_rows of the real split=='val' rows (seeded pick): what the reward measures."""
    dataset = st.open_parquet_dataset(real, opts)
    if "split" not in dataset.schema.names:
        raise ConfigError(f"rl: real={real} has no split column; the reward needs its split=='val' rows")
    ids = dataset.to_table(columns=["id"], filter=pc.field("split") == "val").column("id")
    ids = np.sort(ids.to_numpy(zero_copy_only=False).astype(np.int64))
    if len(ids) == 0:
        raise ConfigError(f"rl: real={real} has no split=='val' rows; the reward is measured on them")
    if len(ids) > settings.max_val_rows:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=settings.max_val_rows, replace=False))
    expr = (pc.field("split") == "val") & pc.field("id").isin(pa.array(ids))
    val = _read_rows(real, expr, settings.image_size, settings.center_crop, opts, "real")
    if not any((v >= 0).any() for v in val.labels.values()):
        raise ConfigError(f"rl: the split=='val' rows of real={real} have no {', '.join(HEADS)} label to measure")
    return val


# ---------------------------------------------------------------------------------------------
# Child training (a Ray task)


def train_child(pool_images: np.ndarray, pool_labels: dict[str, np.ndarray], rows: np.ndarray,
                val_images: np.ndarray, val_labels: dict[str, np.ndarray], settings_json: str,
                torch_seed: int) -> dict[str, float]:
    """Train a tiny MultiTaskNet on pool rows `rows` for child_steps steps; val accuracy per head
    and their mean ("reward_raw"). Single-threaded: children run side by side."""
    import torch

    from synthfar_ray.losses import LossWeights, multitask_loss
    from synthfar_ray.model import MultiTaskNet, predict
    from synthfar_ray.transforms import to_model_input

    t0 = time.time()
    settings = RLSettings.model_validate_json(settings_json)
    torch.set_num_threads(1)
    torch.manual_seed(torch_seed)
    gen = torch.Generator().manual_seed(torch_seed)
    net = MultiTaskNet("tiny", None, "both")
    opt = torch.optim.Adam(net.parameters(), lr=settings.child_lr)
    # Age regression is not part of the reward (and its L1 in years would swamp the class losses).
    weights = LossWeights(age=0.0, age_bin=1.0, gender=1.0, ethnicity=1.0)

    images = torch.from_numpy(np.ascontiguousarray(pool_images[rows]))
    targets = {h: torch.from_numpy(pool_labels[h][rows]) for h in HEADS}
    targets["age"] = torch.full((len(rows),), float("nan"))
    net.train()
    for _ in range(settings.child_steps):
        idx = torch.randint(len(rows), (min(settings.child_batch_size, len(rows)),), generator=gen)
        out = net(to_model_input(images[idx]))
        loss, _ = multitask_loss(out, {k: v[idx] for k, v in targets.items()}, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = predict(net, torch.from_numpy(val_images))
    pred = {"ethnicity": out["ethnicity_logits"].argmax(1).numpy(), "gender": (out["gender_logit"] > 0).long().numpy(),
            "age_bin": out["age_bin_logits"].argmax(1).numpy()}
    acc = {}
    for h in HEADS:
        known = val_labels[h] >= 0
        if known.any():
            acc[h] = float((pred[h][known] == val_labels[h][known]).mean())
    return {**{f"acc_{h}": v for h, v in acc.items()}, "reward_raw": float(np.mean(list(acc.values()))),
            "seconds": time.time() - t0}


def run_children(task, pool_ref, labels_ref, val_ref, val_labels_ref, selections: list[np.ndarray],
                 seeds: list[int], settings: RLSettings) -> list[dict[str, float]]:
    import ray

    payload = settings.model_dump_json()
    refs = [task.remote(pool_ref, labels_ref, rows, val_ref, val_labels_ref, payload, s)
            for rows, s in zip(selections, seeds)]
    return ray.get(refs)


# ---------------------------------------------------------------------------------------------
# State, fingerprint, logs


def fingerprint(settings: RLSettings, k: int, class_key: list[str], features: pd.DataFrame, synthetic: str,
                real: str, real_subset: int, seed: int, redistribute: bool, inputs_key: str | None = None) -> str:
    """Digest of what the learned policy depends on: the settings (not the episode budget or CPUs per
    child), k, class_key, seed, the feature columns, and the inputs: `inputs_key` (the caller's digest
    of the datasets by content) when given, else the URIs and the features' values."""
    h = hashlib.sha256()
    key = {"settings": settings.model_dump(mode="json", exclude=set(RESUMABLE_SETTINGS)), "k": k,
           "class_key": list(class_key), "columns": list(features.columns), "real_subset": real_subset,
           "seed": seed, "redistribute": redistribute, "version": STATE_VERSION}
    key["inputs"] = inputs_key if inputs_key is not None else {"synthetic": synthetic, "real": real}
    h.update(json.dumps(key, sort_keys=True).encode())
    if inputs_key is None:
        h.update(pd.util.hash_pandas_object(features.reset_index(drop=True), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def load_state(state_dir: str, fp: str, opts: StorageOptions | None) -> dict[str, Any] | None:
    uri = st.join(state_dir, STATE_FILE)
    if not st.exists(uri, opts):
        return None
    import torch

    try:
        state = torch.load(io.BytesIO(st.read_bytes(uri, opts)), map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ConfigError(f"rl state_dir={state_dir}: {STATE_FILE} is not a readable RL state ({e}); "
                          "delete it or use another state_dir") from e
    if not isinstance(state, dict) or state.get("fingerprint") != fp:
        old = state.get("fingerprint") if isinstance(state, dict) else None
        raise ConfigError(
            f"rl state_dir={state_dir} holds the state of other settings or inputs (fingerprint {old}, this run "
            f"{fp}: settings other than episodes/cpus_per_child, k, class_key, features, datasets or seed differ); "
            "use another state_dir, or delete it to start over")
    return state


def save_state(state_dir: str, state: dict[str, Any], opts: StorageOptions | None) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    st.write_bytes(st.join(state_dir, STATE_FILE), buf.getvalue(), opts)
    st.write_bytes(st.join(state_dir, REWARDS_FILE), json.dumps(state["history"], indent=1).encode(), opts)


def upload_tensorboard(local_dir: str, state_dir: str, opts: StorageOptions | None) -> None:
    """Copy the local event files to <state_dir>/tensorboard/ (as checkpoints.upload_tensorboard)."""
    import pyarrow.fs as pafs

    fs, path = st.resolve_retrying(st.join(state_dir, TENSORBOARD_DIR), opts)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# ---------------------------------------------------------------------------------------------
# Entry point


def rl_scores(synthetic: str, real: str, features: pd.DataFrame, k: int, class_key: list[str],
              settings: RLSettings, state_dir: str, opts: StorageOptions | None = None, real_subset: int = 100,
              seed: int = 0, redistribute: bool = False, inputs_key: str | None = None) -> pd.DataFrame:
    """Train (or resume) the RL sampler; returns (id, score) per row of `features`, score = the final
    mean policy's logit (higher = chosen first; take the top-K per class with `select_top_k`).

    features: id, the class_key fields (label indices, -1 unknown) and numeric feature columns (NaN
    allowed). Only rows that are synthetic train rows (split == 'train') are ever chosen by a child.
    inputs_key: the caller's digest of the inputs by content (else the URIs and the features' values
    stand for them); with the settings, k, class_key and seed it makes the state's fingerprint, and a
    state_dir holding another fingerprint is refused.
    real_subset only enters the fingerprint: the reward uses the real val split, which subsets do not cut."""
    unknown = [c for c in class_key if c not in CLASS_FIELDS]
    if unknown or not class_key:
        raise ConfigError(f"rl: class_key={list(class_key)} must list fields of {list(CLASS_FIELDS)}")
    if k < 1:
        raise ConfigError(f"rl: k must be >= 1, got {k}")
    missing = [c for c in ["id", *class_key] if c not in features.columns]
    if missing:
        raise ConfigError(f"rl features lack column(s) {missing} (class_key={list(class_key)}; "
                          f"columns: {list(features.columns)})")
    if features["id"].duplicated().any():
        raise ConfigError(f"rl features hold id {features.loc[features['id'].duplicated(), 'id'].iloc[0]} twice")
    features = features.reset_index(drop=True)
    fp = fingerprint(settings, k, class_key, features, synthetic, real, real_subset, seed, redistribute, inputs_key)
    state = load_state(state_dir, fp, opts)
    start = 0 if state is None else int(state["episode"])

    # The pool: rows of `features` that are synthetic train rows.
    from synthfar_ray.scorers import train_ids

    train = train_ids(synthetic, opts)
    in_pool = np.isin(features["id"].to_numpy(np.int64), train)
    if not in_pool.any():
        raise ConfigError(f"rl: no id of the features is a split=='train' row of synthetic={synthetic}")
    if (~in_pool).any():
        logger.info("rl: %d feature rows are not synthetic train rows; scored, never chosen by a child",
                    int((~in_pool).sum()))
    fm = prepare_features(features, in_pool)
    policy = Policy(fm.x.shape[1], settings)
    if state is not None:
        policy.load_state_dict(state["policy"])
    if start >= settings.episodes:
        logger.info("rl: %s already holds %d episodes (>= episodes=%d); returning its policy", state_dir, start,
                    settings.episodes)
        return pd.DataFrame({"id": fm.ids, "score": policy.logits(fm.x)})

    import ray

    from synthfar_ray.raycluster import check_request, ensure_ray

    ensure_ray()
    check_request("rl: each child", {"CPU": settings.cpus_per_child})
    t0 = time.time()
    pool_features = features.loc[in_pool].reset_index(drop=True)
    pool_x = fm.x[in_pool]
    pool = read_pool(synthetic, pool_features["id"].to_numpy(np.int64), settings, opts)
    wanted = pool_features["id"].to_numpy(np.int64)
    if not np.array_equal(pool.ids, np.sort(wanted)):
        raise ConfigError(f"rl: synthetic={synthetic} changed while reading (ids of the train rows differ)")
    pos = np.searchsorted(pool.ids, wanted)  # pool row of each pool_features row (`pool` is sorted by id)
    val = read_val(real, settings, opts, seed)
    logger.info("rl: pool %d synthetic train rows, %d real val rows at %d px, %d features (%s); %.1f s to read",
                len(pool.ids), len(val.ids), settings.image_size, fm.x.shape[1], ", ".join(fm.names), time.time() - t0)
    pool_ref, labels_ref = ray.put(pool.images), ray.put(pool.labels)
    val_ref, val_labels_ref = ray.put(val.images), ray.put(val.labels)
    task = ray.remote(num_cpus=settings.cpus_per_child, max_retries=1)(train_child)
    table = pool_features[["id", *class_key]]
    # select_top_k warns about unknown labels and short classes; say it once, not per child.
    if not select_top_k(table.assign(score=0.0), k, list(class_key), redistribute)["chosen"].any():
        raise ConfigError(f"rl: no synthetic train row of the features has a known {'/'.join(class_key)} label")
    selection_logger = logging.getLogger("synthfar_ray.selection")

    def chosen_rows(scores: np.ndarray) -> np.ndarray:
        """Pool positions (into `pool`) of the top-K per class of `scores` (one per pool row)."""
        level = selection_logger.level
        selection_logger.setLevel(logging.ERROR)
        try:
            sel = select_top_k(table.assign(score=scores), k, list(class_key), redistribute)
        finally:
            selection_logger.setLevel(level)
        return pos[np.flatnonzero(np.isin(table["id"].to_numpy(np.int64), sel.loc[sel["chosen"], "id"].to_numpy()))]

    if state is None:
        t1 = time.time()
        ids = table["id"].to_numpy(np.int64)
        sels = [chosen_rows(random_scores(ids, (seed + REFERENCE_SALT + j) & 0xFFFFFFFF))
                for j in range(settings.reference_children)]
        ref = run_children(task, pool_ref, labels_ref, val_ref, val_labels_ref, sels,
                           [child_seed(seed, -1, j) for j in range(settings.reference_children)], settings)
        state = {"version": STATE_VERSION, "fingerprint": fp, "episode": 0, "history": [],
                 "reference": float(np.mean([r["reward_raw"] for r in ref])), "reference_children": ref,
                 "features": fm.names}
        logger.info("rl: random reference accuracy %.4f (%d children, %.1f s)", state["reference"], len(ref),
                    time.time() - t1)
    else:
        logger.info("rl: resuming %s at episode %d of %d", state_dir, start, settings.episodes)

    from torch.utils.tensorboard import SummaryWriter

    tb_dir = tempfile.mkdtemp(prefix="synthfar-rl-tb-")
    writer = SummaryWriter(tb_dir)
    try:
        for episode in range(start, settings.episodes):
            t1 = time.time()
            eps = episode_noise(seed, episode, settings.children_per_episode, fm.x.shape[1])
            weights = policy.sample(eps)
            sels = [chosen_rows(pool_x.astype(np.float64) @ w.astype(np.float64)) for w in weights]
            results = run_children(task, pool_ref, labels_ref, val_ref, val_labels_ref, sels,
                                   [child_seed(seed, episode, c) for c in range(len(sels))], settings)
            rewards = np.array([r["reward_raw"] for r in results]) - state["reference"]
            stats = policy.update(weights, rewards)
            record = {"episode": episode, "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
                      "rewards": rewards.tolist(), **stats,
                      "accuracy": {h: float(np.mean([r[f"acc_{h}"] for r in results]))
                                   for h in HEADS if f"acc_{h}" in results[0]},
                      "mu": policy.mu.detach().tolist(), "seconds": round(time.time() - t1, 2)}
            state["history"].append(record)
            state["episode"] = episode + 1
            state["policy"] = policy.state_dict()
            save_state(state_dir, state, opts)
            for name in ("reward_mean", "reward_max", "value", "advantage", "entropy", "std"):
                writer.add_scalar(f"rl/{name}", record[name], episode)
            writer.flush()
            upload_tensorboard(tb_dir, state_dir, opts)
            top = np.argsort(-np.abs(policy.mu.detach().numpy()))[:3]
            logger.info("rl: episode %d/%d reward %+.4f (max %+.4f) value %+.4f adv %+.4f std %.3f in %.1f s; "
                        "top weights %s", episode + 1, settings.episodes, record["reward_mean"], record["reward_max"],
                        stats["value"], stats["advantage"], stats["std"], record["seconds"],
                        ", ".join(f"{fm.names[i]}={policy.mu[i].item():+.2f}" for i in top))
    finally:
        writer.close()
        shutil.rmtree(tb_dir, ignore_errors=True)
    return pd.DataFrame({"id": fm.ids, "score": policy.logits(fm.x)})
