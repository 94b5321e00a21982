"""The RL sampler (synthfar_ray/rl_sampler.py): policy pieces without Ray, then the learned
selection on the ground-truth domain of the quality tests, then resuming a run."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pandas as pd
import pytest

from synthfar_ray.config import ConfigError
from synthfar_ray.rl_sampler import (REWARDS_FILE, STATE_FILE, TENSORBOARD_DIR, Policy, episode_noise,
                                     gaussian_log_prob, prepare_features, rl_scores)
from synthfar_ray.sampling_config import RLSettings
from synthfar_ray.selection import label_precision, random_scores, select_top_k

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


class Lines(logging.Handler):
    """The rl_sampler log lines of a block (pytest runs here with -p no:logging: no caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("synthfar_ray.rl_sampler")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "Lines":
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


# ---------------------------------------------------------------------------------------------
# Pure pieces (no Ray)


def test_gaussian_log_prob_matches_the_density():
    torch = pytest.importorskip("torch")
    w = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    mu, log_std = torch.tensor([0.1, -1.0]), torch.log(torch.tensor([0.5, 2.0]))
    std = torch.exp(log_std)
    brute = [float(np.prod([np.exp(-0.5 * ((w[i, j] - mu[j]) / std[j]) ** 2) / (std[j] * np.sqrt(2 * np.pi))
                             for j in range(2)])) for i in range(2)]
    assert np.allclose(torch.exp(gaussian_log_prob(w, mu, log_std)).numpy(), brute, rtol=1e-6)


def test_episode_noise_is_mirrored_and_counter_based():
    a = episode_noise(7, 3, 5, 4)
    assert a.shape == (5, 4)
    assert np.allclose(a[0], -a[1]) and np.allclose(a[2], -a[3])
    assert np.array_equal(a, episode_noise(7, 3, 5, 4))  # a resumed run draws the same
    assert not np.allclose(a, episode_noise(7, 4, 5, 4))


def test_update_raises_logits_of_rows_the_reward_favours():
    """Reward = mean feature x of the top half of the rows by the sampled weight: one REINFORCE step
    must give high-x rows higher logits than low-x rows (before it, all logits are 0). The critic
    moves toward the mean reward."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 2)).astype(np.float32)
    policy = Policy(2, RLSettings(policy_lr=0.1, critic_lr=0.01))
    assert np.allclose(policy.logits(x), 0.0)
    weights = policy.sample(episode_noise(0, 0, 16, 2))
    rewards = []
    for w in weights:
        top = np.argsort(-(x @ w))[:100]
        rewards.append(1.0 + float(x[top, 0].mean()))  # +1: a mean reward the critic must move toward
    stats = policy.update(weights, np.array(rewards))
    logits = policy.logits(x)
    high, low = x[:, 0] > 1.0, x[:, 0] < -1.0
    assert logits[high].mean() > logits[low].mean() + 0.1
    mu = policy.mu.detach().numpy()
    assert mu[0] == pytest.approx(0.1, rel=1e-3)  # Adam's first step: lr in the gradient's direction
    assert stats["value"] == 0.0 and float(policy.value.detach()) == pytest.approx(0.01, rel=1e-3)


def test_prepare_features_imputes_and_standardises():
    f = pd.DataFrame({
        "id": pd.array([1, 2, 3, 4, 5], dtype="int64[pyarrow]"),
        "ethnicity": [0, 1, -1, 2, 0],
        "p": pd.array([0.1, None, 0.5, 0.9, 0.3], dtype="float[pyarrow]"),
        "q": [1.0, 2.0, np.inf, 4.0, 5.0],
        "flag": [True, False, True, True, False],
        "const": [3.0] * 5,
        "gone": [np.nan] * 5,
    })
    fm = prepare_features(f)
    assert fm.names == ["p", "p_missing", "q", "q_missing", "flag"]  # const and gone carry nothing
    assert np.isfinite(fm.x).all()
    assert np.allclose(fm.x.mean(axis=0), 0.0, atol=1e-6) and np.allclose(fm.x.std(axis=0), 1.0, atol=1e-5)
    # the missing p is imputed with the mean of the known ones: its standardised value equals theirs
    p_known_mean = (np.array([0.1, 0.5, 0.9, 0.3]).mean() - fm.mean[0]) / fm.std[0]
    assert fm.x[1, 0] == pytest.approx(p_known_mean, abs=1e-6)
    assert list(fm.ids) == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="'name'"):
        prepare_features(f.assign(name=["a"] * 5))


# ---------------------------------------------------------------------------------------------
# Ground-truth domain


def synthetic_train_features(synthetic: str, quality_folder: str) -> pd.DataFrame:
    """The quality columns of the synthetic train rows, as `synthfar sample method=rl` gives the policy."""
    from synthfar_ray.quality import read_quality
    from synthfar_ray.sampling import rl_features
    from synthfar_ray.scorers import train_ids

    q = read_quality(quality_folder)
    return rl_features(q[q["id"].isin(train_ids(synthetic, None))].reset_index(drop=True))


def truth_rows(synthetic: str) -> pd.DataFrame:
    import pyarrow.dataset as pads

    cols = ["id", "age", "gender", "ethnicity", "render_age", "render_gender", "render_ethnicity"]
    return pads.dataset(synthetic).to_table(columns=cols).to_pandas()


def precision_of(scores: pd.DataFrame, features: pd.DataFrame, truth: pd.DataFrame, k: int) -> dict[str, float]:
    sel = select_top_k(features[["id", "ethnicity"]].merge(scores, on="id"), k, ["ethnicity"])
    return label_precision(truth[truth["id"].isin(sel.loc[sel["chosen"], "id"])])


def test_rl_selection_beats_random_on_ground_truth(ray_cluster, quality_sets, quality_assessed, tmp_path):
    """8 episodes x 4 children x 150 child steps at 32 px, K=200 by ethnicity, sampler seed 0.

    Measured on 2 cores: top-K ethnicity label precision 0.86, 0.875, 0.875 (three test sessions
    with the same code path; the fixture is rebuilt per session, which likely explains the 0.015)
    vs 0.705 for a random pick;
    all three labels 0.435-0.45 vs 0.33. Sampler seeds 1-4 (same data, standalone): 0.840 / 0.865 /
    0.830 / 0.885 vs 0.715 / 0.700 / 0.690 / 0.735 for random with the same seed: margins 0.125-0.165,
    all three labels +0.105..+0.155. p_ethnicity had the largest mean weight in the runs where it was
    printed (seeds 0-2). 30-72 s measured here (Ray
    workers warm from the fixture), 60-70 s from a cold cluster.
    Why the margin is robust: three child seeds on one selection span 0.01-0.04 of reward, while the
    top-K by p_ethnicity scores +0.03 over random and the bottom-K -0.07 (mean val accuracy of the
    three heads; gender and age stay near chance at this budget, ethnicity carries the signal)."""
    from synthfar_ray.sampling import run_sample
    from synthfar_ray.sampling_config import SampleConfig
    from synthfar_ray.selection import read_parquet, selection_file

    synthetic, real = quality_sets
    _, result = quality_assessed
    features = synthetic_train_features(synthetic, result.folder)
    settings = RLSettings(episodes=8, children_per_episode=4, reference_children=4, child_steps=150, image_size=32)
    t0 = time.time()  # through the sample stage, as `synthfar sample method=rl` runs it
    sampled = run_sample(SampleConfig(synthetic=synthetic, real=real, method="rl", k=200, class_key=["ethnicity"],
                                      seed=0, rl=settings, quality={"folder": result.folder},
                                      output=str(tmp_path / "selection")))
    seconds = time.time() - t0
    state_dir = sampled.scores_uri
    assert sampled.chosen == 200 and "/_scores/rl-" in state_dir
    selection = read_parquet(selection_file(sampled.output), None)
    scores = selection[["id", "score"]]
    assert len(scores) == len(features) and np.isfinite(scores["score"]).all()

    truth = truth_rows(synthetic)
    rl = precision_of(scores, features, truth, 200)
    assert rl == pytest.approx(sampled.precision["chosen"])  # the stage's own precision file says the same
    rnd = precision_of(pd.DataFrame({"id": features["id"], "score": random_scores(features["id"].to_numpy(), 0)}),
                       features, truth, 200)
    print(f"rl precision {rl}, random {rnd}, {seconds:.1f} s")
    assert rl["ethnicity"] >= rnd["ethnicity"] + 0.08, (rl, rnd)
    assert rl["all"] >= rnd["all"] + 0.05, (rl, rnd)

    history = json.loads(open(os.path.join(state_dir, REWARDS_FILE)).read())
    assert [r["episode"] for r in history] == list(range(8))
    for r in history:
        assert {"reward_mean", "value", "advantage", "entropy", "std", "rewards"} <= set(r)
        assert len(r["rewards"]) == 4
    import torch

    state = torch.load(os.path.join(state_dir, STATE_FILE), weights_only=False)
    mu = state["policy"]["mu"].numpy()
    names = state["features"]
    assert mu[names.index("p_ethnicity")] > 0
    assert names.index("p_ethnicity") in np.argsort(-np.abs(mu))[:3], dict(zip(names, mu.round(2)))
    events = [f for f in os.listdir(os.path.join(state_dir, TENSORBOARD_DIR)) if f.startswith("events.out.tfevents")]
    assert events


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_continues_and_refuses_other_settings(ray_cluster, quality_sets, quality_assessed, tmp_path):
    """Small budget (2 children, 30 child steps): episodes=2, then the same (returns at once, same
    scores, no child runs), then episodes=3 (only episode 2 runs; episodes 0-1 are kept as they were)
    and the result equals an uninterrupted 3-episode run (counter-based draws, restored Adam state).
    Other settings, or another k, on the same state_dir are refused naming it."""
    synthetic, real = quality_sets
    _, result = quality_assessed
    features = synthetic_train_features(synthetic, result.folder)
    small = dict(children_per_episode=2, reference_children=2, child_steps=30, image_size=32)
    state_dir = str(tmp_path / "rl")

    def run(episodes: int, directory: str = state_dir, k: int = 100, **extra) -> tuple[pd.DataFrame, list[str]]:
        settings = RLSettings(episodes=episodes, **small, **extra)
        with Lines() as lines:
            out = rl_scores(synthetic, real, features, k, ["ethnicity"], settings, directory, seed=3)
        return out, lines.lines

    first, lines = run(2)
    assert any("random reference" in ln for ln in lines)
    before = json.loads(open(os.path.join(state_dir, REWARDS_FILE)).read())
    assert [r["episode"] for r in before] == [0, 1]

    t0 = time.time()
    again, lines = run(2)
    assert time.time() - t0 < 10
    pd.testing.assert_frame_equal(again, first)
    assert not any("episode" in ln and "/" in ln and "reward" in ln for ln in lines), lines
    assert any("already holds 2 episodes" in ln for ln in lines)

    more, lines = run(3)
    ran = [ln for ln in lines if ln.startswith("rl: episode ")]
    assert len(ran) == 1 and ran[0].startswith("rl: episode 3/3"), ran
    assert not any("random reference" in ln for ln in lines)
    assert any("resuming" in ln and "at episode 2" in ln for ln in lines)
    after = json.loads(open(os.path.join(state_dir, REWARDS_FILE)).read())
    assert [r["episode"] for r in after] == [0, 1, 2]
    assert after[:2] == before  # incl. per-child rewards and seconds: not rerun

    straight, _ = run(3, str(tmp_path / "straight"))
    assert np.allclose(straight["score"], more["score"], atol=1e-5)

    with pytest.raises(ConfigError, match=state_dir):
        run(3, child_lr=1e-2)
    with pytest.raises(ConfigError, match=state_dir):
        run(3, k=120)


def test_state_on_object_storage(ray_cluster, quality_sets, quality_assessed, s3_bucket):
    """state_dir on s3:// (moto): state, rewards.json and the TensorBoard events land in the bucket,
    and a re-run with the same budget returns the stored policy."""
    from synthfar_ray import storage as st

    synthetic, real = quality_sets
    _, result = quality_assessed
    bucket, opts = s3_bucket
    features = synthetic_train_features(synthetic, result.folder)
    settings = RLSettings(episodes=1, children_per_episode=2, reference_children=1, child_steps=10, image_size=16)
    state_dir = f"{bucket}/rl/state"
    first = rl_scores(synthetic, real, features, 60, ["ethnicity"], settings, state_dir, opts, seed=1)
    assert st.exists(st.join(state_dir, STATE_FILE), opts)
    assert len(json.loads(st.read_bytes(st.join(state_dir, REWARDS_FILE), opts))) == 1
    assert any(n.startswith("events.out.tfevents") for n in st.list_files(st.join(state_dir, TENSORBOARD_DIR), opts))
    with Lines() as lines:
        again = rl_scores(synthetic, real, features, 60, ["ethnicity"], settings, state_dir, opts, seed=1)
    pd.testing.assert_frame_equal(again, first)
    assert any("already holds 1 episodes" in ln for ln in lines.lines)
