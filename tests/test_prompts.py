"""Attribute sampling and prompt rendering: determinism, balance, target proportions, vocab checks."""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter

import numpy as np
import pytest
import yaml

from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.labels import AGE_BIN_NAMES, ETHNICITIES, GENDERS, age_to_bin
from synthfar_ray.prompts import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_TEMPLATE,
    FaceAttributes,
    PromptConfig,
    TargetDistribution,
    age_bands,
    balanced_order,
    gender_phrase,
    label_grid,
    load_vocab,
    render_prompt,
    sample_attributes,
    sample_labels,
)


def _packaged_vocab_data() -> dict:
    import importlib.resources

    return yaml.safe_load((importlib.resources.files("synthfar_ray") / "data" / "vocab.yaml").read_text())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_and_id_give_same_attributes_and_prompt():
    cfg = PromptConfig()
    for i in (0, 1, 57, 10_000):
        a, b = sample_attributes(7, i, cfg), sample_attributes(7, i, cfg)
        assert a == b
        assert render_prompt(a, cfg) == render_prompt(b, cfg)


def test_different_seed_gives_different_sequence():
    cfg = PromptConfig()
    run_a = [sample_attributes(1, i, cfg) for i in range(40)]
    run_b = [sample_attributes(2, i, cfg) for i in range(40)]
    assert sum(a != b for a, b in zip(run_a, run_b)) >= 35
    # Within a run ids differ from one another too.
    assert len({render_prompt(a, cfg) for a in run_a}) == 40


@pytest.mark.parametrize("distribution", ["balanced", "target"])
def test_each_id_is_pure(distribution):
    target = {"ethnicity": {"white": 2, "black": 1, "asian": 1}} if distribution == "target" else None
    cfg = PromptConfig(distribution=distribution, target=target)
    in_loop = [sample_attributes(11, i, cfg) for i in range(120)]
    # A fresh config object and out-of-order calls must not change the answer for id 57.
    fresh = PromptConfig(distribution=distribution, target=target)
    for i in (119, 3, 200, 57):
        sample_attributes(11, i, fresh)
    assert sample_attributes(11, 57, fresh) == in_loop[57]
    assert sample_attributes(11, 100, cfg) == in_loop[100]


def test_negative_seed_or_id_rejected():
    with pytest.raises(ValueError, match="must be >= 0"):
        sample_attributes(-1, 0, PromptConfig())


# ---------------------------------------------------------------------------------- balance


def _cell_counts(attrs: list[FaceAttributes]) -> Counter:
    return Counter((a.ethnicity, a.gender, int(age_to_bin(a.age))) for a in attrs)


def test_balanced_cells_equal_when_n_divisible():
    cfg = PromptConfig()
    bands = age_bands(cfg.min_age, cfg.max_age)
    n_cells = len(ETHNICITIES) * len(GENDERS) * len(bands)
    assert n_cells == 90
    attrs = [sample_attributes(3, i, cfg) for i in range(3 * n_cells)]
    counts = _cell_counts(attrs)
    assert len(counts) == n_cells
    assert set(counts.values()) == {3}
    assert all(cfg.min_age <= a.age < cfg.max_age for a in attrs)


def test_balanced_within_one_for_any_n_and_clipped_ages():
    cfg = PromptConfig(min_age=18, max_age=65)
    bands = age_bands(18, 65)
    assert [(b.lo, b.hi) for b in bands] == [(18, 20), (20, 30), (30, 40), (40, 50), (50, 60), (60, 65)]
    n_cells = 5 * 2 * len(bands)
    attrs = [sample_attributes(5, i, cfg) for i in range(2 * n_cells + 37)]
    counts = _cell_counts(attrs)
    assert len(counts) == n_cells
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(18 <= a.age < 65 for a in attrs)
    # Marginals are then balanced too.
    eth = Counter(a.ethnicity for a in attrs)
    assert max(eth.values()) - min(eth.values()) <= len(bands) * 2


def test_balanced_ages_cover_each_band():
    cfg = PromptConfig()
    ages = [sample_attributes(9, i, cfg).age for i in range(900)]
    for band in age_bands(0, 85):
        in_band = [a for a in ages if band.lo <= a < band.hi]
        assert len(in_band) == 100
        if band.hi - band.lo >= 3:  # ages are spread inside the band, not one value
            assert len(set(in_band)) >= 3


# Every projection of (ethnicity, gender, age band): the marginals, the pairs, the cell.
PROJECTIONS = {"ethnicity": (0,), "gender": (1,), "age_bin": (2,), "ethnicity x gender": (0, 1),
               "ethnicity x age_bin": (0, 2), "gender x age_bin": (1, 2), "cell": (0, 1, 2)}
# One (min_age, max_age) per number of age bands, 9 down to 1.
BAND_RANGES = [(0, 85), (3, 85), (10, 85), (20, 85), (30, 85), (40, 85), (50, 85), (60, 85), (70, 85)]


def _label_cells(seed: int, n: int, cfg: PromptConfig) -> list[tuple[int, int, int]]:
    """(ethnicity, gender, band position) index triples of ids 0..n-1."""
    band_pos = {b.bin_index: i for i, b in enumerate(age_bands(cfg.min_age, cfg.max_age))}
    cells = []
    for i in range(n):
        e, g, band = sample_labels(seed, i, cfg)
        cells.append((ETHNICITIES.index(e), GENDERS.index(g), band_pos[band.bin_index]))
    return cells


def _prefix_spreads(cells, sizes, checkpoints):
    """For each checkpoint N: {projection: (max - min count, max |count - N/k|)} over ids 0..N-1."""
    counts = {name: np.zeros([sizes[a] for a in axes], dtype=int) for name, axes in PROJECTIONS.items()}
    out = {}
    for n, cell in enumerate(cells, start=1):
        for name, axes in PROJECTIONS.items():
            counts[name][tuple(cell[a] for a in axes)] += 1
        if n in checkpoints:
            out[n] = {name: (int(c.max() - c.min()), float(np.abs(c - n / c.size).max())) for name, c in counts.items()}
    return out


@pytest.mark.parametrize("min_age,max_age", BAND_RANGES)
def test_balanced_on_every_marginal_and_pair_at_every_n(min_age, max_age):
    """Every N from 1 to 1000 and a few large N: each marginal, pair and cell within one of equal."""
    cfg = PromptConfig(min_age=min_age, max_age=max_age)
    sizes, loose = label_grid(cfg)
    large = [4_321, 12_345] if sizes[2] in (9, 6, 5) else []
    checkpoints = set(range(1, 1001)) | set(large)
    spreads = _prefix_spreads(_label_cells(11, max(checkpoints), cfg), sizes, checkpoints)
    for n, by_projection in spreads.items():
        for name, (spread, off) in by_projection.items():
            assert off <= 1, (n, name, off)  # within one of N/k
            if not (name == "ethnicity" and loose):
                assert spread <= 1, (n, name, spread)  # and within one of each other
    assert loose == ((0,) if sizes[2] == 5 else ())  # the documented exception: 5 bands


def test_balanced_labels_are_mixed_along_ids_and_seeded():
    """Datasets written in label order ruin training batches: consecutive ids and every shard must
    hold mixed labels, in the whole set's proportions; the id -> cell map is seeded per block."""
    cfg = PromptConfig()
    cells = _label_cells(3, 1024, cfg)
    n_cells = 90
    assert sorted(cells[:n_cells]) == sorted(itertools.product(range(5), range(2), range(9)))  # a block: each cell once
    eth = [c[0] for c in cells]
    assert max(len(list(run)) for _, run in itertools.groupby(eth)) <= 2  # no runs of one ethnicity
    for start in range(0, 1024, 64):  # shards of 64 ids: label spread like the whole set's
        shard = cells[start:start + 64]
        for name, axes in PROJECTIONS.items():
            if len(axes) == 1:
                k = (5, 2, 9)[axes[0]]
                counts = Counter(c[axes[0]] for c in shard)
                assert all(abs(counts[v] - 64 / k) <= 2 for v in range(k)), (start, name, counts)
    # Seeded: other seeds, and other blocks of the same seed, visit the cells in other orders.
    orders = {tuple(_label_cells(seed, n_cells, cfg)) for seed in range(5)}
    assert len(orders) == 5
    assert cells[:n_cells] != cells[n_cells:2 * n_cells]
    # The same ids always get the same labels (pure per id).
    ids = (900, 5, 77)
    assert [sample_labels(3, i, cfg) for i in ids] == [sample_labels(3, i, PromptConfig()) for i in ids]


def test_balanced_order_is_a_deterministic_permutation():
    for b in range(1, 10):
        order = balanced_order((5, 2, b), (0,) if b == 5 else ())
        assert sorted(order) == sorted(itertools.product(range(5), range(2), range(b)))
        assert balanced_order.__wrapped__((5, 2, b), (0,) if b == 5 else ()) == order


# ---------------------------------------------------------------------------------- target


def test_target_proportions_tracked():
    target = {
        "ethnicity": {"white": 0.4, "black": 0.1, "asian": 0.2, "indian": 0.2, "other": 0.1},
        "gender": {"male": 0.3, "female": 0.7},
        "age_bin": {"20-29": 0.5, "30-39": 0.3, "60-69": 0.2},
    }
    cfg = PromptConfig(distribution="target", target=target)
    n = 2000
    attrs = [sample_attributes(21, i, cfg) for i in range(n)]
    eth = Counter(a.ethnicity for a in attrs)
    gen = Counter(a.gender for a in attrs)
    age = Counter(AGE_BIN_NAMES[int(age_to_bin(a.age))] for a in attrs)
    for name, p in target["ethnicity"].items():
        assert abs(eth[name] / n - p) < 0.02, (name, eth)
    for name, p in target["gender"].items():
        assert abs(gen[name] / n - p) < 0.02, (name, gen)
    for name, p in target["age_bin"].items():
        assert abs(age[name] / n - p) < 0.02, (name, age)
    assert set(age) == set(target["age_bin"])  # zero-weight bins never drawn
    # Attributes are not correlated with each other: women are ~70 % within every ethnicity.
    for e in ETHNICITIES:
        group = [a for a in attrs if a.ethnicity == e]
        assert abs(sum(a.gender == "female" for a in group) / len(group) - 0.7) < 0.08, e


def test_target_missing_marginal_is_uniform():
    cfg = PromptConfig(distribution="target", target={"gender": {"female": 1}})
    attrs = [sample_attributes(4, i, cfg) for i in range(900)]
    assert {a.gender for a in attrs} == {"female"}
    eth = Counter(a.ethnicity for a in attrs)
    assert all(abs(c / 900 - 0.2) < 0.02 for c in eth.values()) and len(eth) == 5
    bins = Counter(int(age_to_bin(a.age)) for a in attrs)
    assert len(bins) == 9 and all(abs(c / 900 - 1 / 9) < 0.02 for c in bins.values())


def test_target_distribution_normalises_and_validates():
    t = TargetDistribution(ethnicity={"white": 3, "black": 1})
    assert t.ethnicity == {"white": 0.75, "black": 0.25, "asian": 0.0, "indian": 0.0, "other": 0.0}
    # Re-validating normalised proportions (a JSON round trip to the actors) changes nothing.
    thirds = PromptConfig(distribution="target", target={"ethnicity": {"white": 1, "black": 1, "asian": 1}})
    again = PromptConfig.model_validate_json(thirds.model_dump_json())
    assert again == thirds
    assert [sample_attributes(0, i, again) for i in range(30)] == [sample_attributes(0, i, thirds) for i in range(30)]
    with pytest.raises(ValueError, match="unknown ethnicity 'martian'"):
        TargetDistribution(ethnicity={"martian": 1})
    with pytest.raises(ValueError, match="unknown age_bin '0-5'"):
        TargetDistribution(age_bin={"0-5": 1})
    with pytest.raises(ValueError, match=">= 0"):
        TargetDistribution(gender={"male": -0.1, "female": 1})
    with pytest.raises(ValueError, match="all be zero"):
        TargetDistribution(gender={"male": 0, "female": 0})


# ---------------------------------------------------------------------------------- config


def test_invalid_configs_rejected():
    with pytest.raises(ValueError, match="needs a `target`"):
        PromptConfig(distribution="target")
    with pytest.raises(ValueError, match="only used with distribution: target"):
        PromptConfig(target={"gender": {"male": 1}})
    with pytest.raises(ValueError, match="max_age"):
        PromptConfig(min_age=40, max_age=40)
    with pytest.raises(ValueError, match="outside"):
        PromptConfig(distribution="target", max_age=50, target={"age_bin": {"70+": 1, "20-29": 1}})
    with pytest.raises(ValueError, match=r"unknown template placeholder \$eye_color"):
        PromptConfig(template="face of $name with $eye_color eyes")
    with pytest.raises(ValueError, match="malformed"):
        PromptConfig(template="price $5")
    with pytest.raises(ValueError, match="Extra inputs"):
        PromptConfig(distrib="balanced")


def test_load_config_yaml_with_target(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"distribution": "target", "target": {"ethnicity": {"asian": 1}}}))
    cfg = load_config(PromptConfig, str(path), ["min_age=10", "max_age=30"])
    attrs = [sample_attributes(0, i, cfg) for i in range(50)]
    assert {a.ethnicity for a in attrs} == {"asian"}
    assert all(10 <= a.age < 30 for a in attrs)
    with pytest.raises(ConfigError, match=r"gen\.yaml"):
        load_config(PromptConfig, str(path), ["distribution=balanced"])


# --------------------------------------------------------------------------- gender phrase


@pytest.mark.parametrize(
    "age,gender,expected",
    [
        (0, "female", "infant girl"), (5, "male", "infant boy"),
        (6, "female", "little girl"), (10, "male", "little boy"),
        (11, "female", "teen age girl"), (15, "male", "teen age boy"),
        (16, "female", "college age woman"), (25, "male", "college age man"),
        (26, "female", "young adult woman"), (30, "male", "young adult man"),
        (31, "female", "adult woman"), (45, "male", "adult man"),
        (46, "female", "middle age woman"), (60, "male", "middle age man"),
        (61, "female", "grandmother"), (84, "male", "grandfather"),
    ],
)
def test_gender_phrase_band_edges(age, gender, expected):
    assert gender_phrase(age, gender) == expected


def test_gender_phrase_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown gender"):
        gender_phrase(30, "other")
    with pytest.raises(ValueError, match="age"):
        gender_phrase(-1, "male")


# -------------------------------------------------------------------------------- rendering


def test_prompt_fills_every_placeholder():
    cfg = PromptConfig()
    fields = set(string.Template(DEFAULT_TEMPLATE).get_identifiers())
    assert fields == {"age", "gender", "country", "name", "hair_length", "hair_style", "hair_color", "suffix"}
    for i in range(200):
        a = sample_attributes(13, i, cfg)
        prompt = render_prompt(a, cfg)
        assert "$" not in prompt
        assert prompt.startswith("close-up photorealistic, raw photo, amateur photo, face, ")
        assert f"({a.age} y.o) ({gender_phrase(a.age, a.gender)}) (from {a.country}) named {a.name}," in prompt
        assert f"{a.hair_length} {a.hair_style} {a.hair_color} hair, " in prompt
        assert prompt.endswith(", ".join([a.profession, *a.descriptors]))
        assert 1 <= len(a.descriptors) <= 4


def test_custom_template_uses_extra_fields():
    cfg = PromptConfig(template="$ethnicity $profession | $descriptors | $$literal")
    a = sample_attributes(0, 0, cfg)
    assert render_prompt(a, cfg) == f"{a.ethnicity} {a.profession} | {', '.join(a.descriptors)} | $literal"


def test_negative_prompt_has_weighted_groups():
    neg = DEFAULT_NEGATIVE_PROMPT
    assert neg.startswith("(hands), ")
    groups = re.findall(r"\(([^()]*):(\d+(?:\.\d+)?)\)", neg)
    weighted = {w: [t.strip() for t in body.split(",")] for body, w in groups}
    assert set(weighted) == {"1.4"}
    bodies = [set(t.strip() for t in body.split(",")) for body, _ in groups]
    assert any({"3d", "render", "cgi", "doll", "painting"} <= b for b in bodies)
    assert any({"worst quality", "low quality"} <= b for b in bodies)
    terms = {t.strip() for t in neg.split(",")}
    assert {"monochrome", "deformed", "watermark", "text"} <= terms
    assert neg.count("(") == neg.count(")")
    assert PromptConfig().negative_prompt == neg


# ---------------------------------------------------------------------------- attribute sense


def test_attributes_come_from_vocab_and_respect_age_and_gender():
    cfg = PromptConfig()
    vocab = load_vocab()
    for i in range(900):
        a = sample_attributes(17, i, cfg)
        eth = vocab.ethnicities[a.ethnicity]
        assert a.country in eth.countries
        assert a.name in getattr(eth.countries[a.country], a.gender)
        assert a.profession in vocab.profession_options(a.age)
        assert len(set(a.descriptors)) == len(a.descriptors)
        groups = [g for g in vocab.descriptors if any(d in g.options for d in a.descriptors)]
        assert all(g.applies(a.age, a.gender) for g in groups)
        if a.age <= 2:
            assert a.profession in {"baby", "toddler", "newborn"}
        if a.gender == "female" or a.age < 18:
            assert not {"beard", "stubble", "mustache", "goatee", "full beard"} & set(a.descriptors)


def test_grey_hair_grows_with_age():
    cfg = PromptConfig()
    grey = set(load_vocab().hair.grey_colors)
    attrs = [sample_attributes(23, i, cfg) for i in range(1800)]
    young = [a for a in attrs if a.age < 30]
    old = [a for a in attrs if a.age >= 70]
    assert not any(a.hair_color in grey for a in young)
    assert sum(a.hair_color in grey for a in old) / len(old) > 0.5


# -------------------------------------------------------------------------------------- vocab


def test_packaged_vocab_is_rich_and_cached():
    vocab = load_vocab()
    assert load_vocab() is vocab
    assert set(vocab.ethnicities) == set(ETHNICITIES)
    for eth, ev in vocab.ethnicities.items():
        assert len(ev.countries) >= 5, eth
        for country, names in ev.countries.items():
            assert len(set(names.male)) >= 4 and len(set(names.female)) >= 4, country
    assert {"Nigeria", "Kenya", "Ghana", "Ethiopia"} <= set(vocab.ethnicities["black"].countries)
    assert {"India", "Nepal", "Pakistan", "Bangladesh", "Sri Lanka"} <= set(vocab.ethnicities["indian"].countries)
    assert {"Mexico", "Brazil", "Colombia"} <= set(vocab.ethnicities["other"].countries)


def _write_vocab(tmp_path, data: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_vocab_validation_names_missing_key_and_country(tmp_path):
    data = _packaged_vocab_data()
    del data["ethnicities"]["black"]["countries"]["Kenya"]["female"]
    with pytest.raises(ConfigError, match=r"ethnicities\.black\.countries\.Kenya\.female: Field required"):
        load_vocab(_write_vocab(tmp_path, data, "no_female.yaml"))

    data = _packaged_vocab_data()
    del data["ethnicities"]["indian"]
    with pytest.raises(ConfigError, match="missing ethnicity 'indian'"):
        load_vocab(_write_vocab(tmp_path, data, "no_indian.yaml"))

    data = _packaged_vocab_data()
    data["ethnicities"]["asian"]["countries"]["Japan"]["male"] = []
    with pytest.raises(ConfigError, match=r"no_names\.yaml.*\n.*ethnicities\.asian\.countries\.Japan\.male"):
        load_vocab(_write_vocab(tmp_path, data, "no_names.yaml"))

    data = _packaged_vocab_data()
    data["professions"][-1]["max_age"] = 99
    with pytest.raises(ConfigError, match="max_age: null"):
        load_vocab(_write_vocab(tmp_path, data, "professions.yaml"))

    with pytest.raises(ConfigError, match="cannot read vocab"):
        load_vocab(str(tmp_path / "absent.yaml"))
    # PromptConfig checks a local vocab up front.
    with pytest.raises(ValueError, match="missing ethnicity 'indian'"):
        PromptConfig(vocab=str(tmp_path / "no_indian.yaml"))


def test_user_vocab_replaces_packaged(tmp_path):
    data = _packaged_vocab_data()
    for eth in data["ethnicities"].values():
        eth["countries"] = {"Atlantis": {"male": ["Zed"], "female": ["Zora"]}}
    path = _write_vocab(tmp_path, data, "atlantis.yaml")
    cfg = PromptConfig(vocab=path)
    attrs = [sample_attributes(0, i, cfg) for i in range(30)]
    assert {a.country for a in attrs} == {"Atlantis"}
    assert {a.name for a in attrs} == {"Zed", "Zora"}
    # Labels do not depend on the vocabulary.
    default = [sample_attributes(0, i, PromptConfig()) for i in range(30)]
    assert [(a.age, a.gender, a.ethnicity) for a in attrs] == [(a.age, a.gender, a.ethnicity) for a in default]
