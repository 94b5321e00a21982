"""Face attributes sampled per image id, and the text prompts built from them.

Every image id gets its attributes from `sample_attributes(run_seed, image_id, cfg)`, a pure
function: no global state and no dependence on how many images the run makes, so any id can be
regenerated on its own (a retried shard, one bad image) and gets the same face description.

Two ways to choose the labelled attributes (ethnicity, gender, age):
- `balanced`: over ids 0..N-1, for ANY N, every marginal (ethnicity, gender, age band), every pair
  (ethnicity x gender, ethnicity x band, gender x band) and every cell of the three are balanced:
  counts differ by at most one. Ids are grouped in blocks of `n_cells` (5 x 2 x bands); a block
  visits every cell once, in `balanced_order` (an order whose every prefix is balanced on all
  projections; found by a deterministic search), with the values of each attribute renamed by
  permutations seeded by (run_seed, block). So consecutive ids, and every shard, hold mixed labels
  in the proportions of the whole set, never runs of one label. The age is then a uniform integer
  inside the cell's band. The bands are FairFace's 9 age bins clipped to [min_age, max_age).
  One exception, with exactly 5 bands (as many as ethnicities): no order was found that keeps the
  ethnicity counts within one of each other at every prefix together with everything else, so
  there ethnicity alone is held to within one of N/5 (|count - N/5| <= 1).
- `target`: given marginal proportions (a missing marginal is uniform; for age, uniform over the
  bands). Each attribute is read off a randomly shifted low-discrepancy (R3 / Kronecker) sequence at
  position `image_id` through the inverse CDF of its proportions, so empirical proportions over any
  run of consecutive ids track the target to O(log N / N), and the three attributes are jointly
  spread (no correlation between them).

The descriptive attributes (country, name, hair, profession, descriptors) come from a separate
random stream, so editing the vocabulary never changes the labels of a run.

With `races7` (off by default) each id first draws one of FairFace's 7 races folded into its
labelled class (uniformly, from a stream of its own) and then a country of that race (the vocab
gives each country a `race7`; Middle Eastern countries sit in `races7_countries`, drawn only with
the option). Off, no draw moves: every prompt and label is what it was before the option existed.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import logging
import math
import string
from dataclasses import dataclass
from typing import Literal

import numpy as np
import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, StrictModel, validate
from synthfar_ray.labels import (AGE_BIN_EDGES, AGE_BIN_NAMES, ETHNICITIES, FAIRFACE_RACE_TO_ETHNICITY,
                                 FAIRFACE_RACES7, GENDERS, RACES7_OF_ETHNICITY)
from synthfar_ray.paths import InputPath

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "close-up photorealistic, raw photo, amateur photo, face, ($age y.o) ($gender) (from $country) "
    "named $name, $hair_length $hair_style $hair_color hair, $suffix"
)

# The paper's negative prompt, in A1111 weight syntax (`(a, b:1.4)` weights the whole group).
DEFAULT_NEGATIVE_PROMPT = (
    "(hands), (3d, render, cgi, doll, painting, fake, cartoon, 3d modeling:1.4), "
    "(worst quality, low quality:1.4), monochrome, deformed, malformed, deformed face, bad teeth, "
    "bad hands, bad fingers, bad eyes, long body, blurry, duplicate, cloned, duplicate body parts, "
    "disfigured, extra limbs, fused fingers, extra fingers, twisted, distorted, malformed hands, "
    "mutated hands and fingers, conjoined, missing limbs, bad anatomy, bad proportions, logo, "
    "watermark, text, copyright, signature, lowres, mutated, mutilated, artifacts, gross, ugly"
)

# Placeholders a template may use (string.Template `$name` syntax).
TEMPLATE_FIELDS: frozenset[str] = frozenset({
    "age", "gender", "country", "name", "hair_length", "hair_style", "hair_color", "suffix",
    "ethnicity", "profession", "descriptors",
})

# (inclusive upper age, phrase for female, phrase for male): the paper's age bands.
_GENDER_BANDS: tuple[tuple[float, str, str], ...] = (
    (5, "infant girl", "infant boy"),
    (10, "little girl", "little boy"),
    (15, "teen age girl", "teen age boy"),
    (25, "college age woman", "college age man"),
    (30, "young adult woman", "young adult man"),
    (45, "adult woman", "adult man"),
    (60, "middle age woman", "middle age man"),
    (math.inf, "grandmother", "grandfather"),
)

# Tags that keep the random streams of one (seed, id) apart.
_TAG_BLOCK = 0x5F01
_TAG_AGE = 0x5F02
_TAG_DETAILS = 0x5F03
_TAG_TARGET_SHIFT = 0x5F04
_TAG_RACE7 = 0x5F05  # races7 only: a stream of its own, so with the option off no draw moves

# R3 sequence (Roberts 2018): alpha_k = 1 / phi_3^k with phi_3 the real root of x^4 = x + 1.
_PHI3 = 1.2207440846057596
_R3_ALPHAS = np.array([_PHI3**-1, _PHI3**-2, _PHI3**-3])


# --------------------------------------------------------------------------------------- vocab


class _Frozen(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CountryNames(_Frozen):
    male: tuple[str, ...] = Field(min_length=1)
    female: tuple[str, ...] = Field(min_length=1)


def races7_of(ethnicity: str) -> tuple[str, ...]:
    """FairFace's races folded into a 5-class ethnicity, e.g. 'asian' -> (East Asian, Southeast Asian)."""
    return tuple(FAIRFACE_RACES7[i] for i in RACES7_OF_ETHNICITY[ETHNICITIES.index(ethnicity)])


class Country(CountryNames):
    # The FairFace race (labels.FAIRFACE_RACES7) prompts naming this country ask for, used by
    # PromptConfig.races7. Unset: the class's only race (black, indian, other); white and asian
    # countries need it to be drawn with races7 (each of those classes folds two races).
    race7: str | None = None
    # Natural hair colours of the country, replacing the class's (a "blonde" Iranian would pull
    # the image towards White); unset = the class's hair_colors.
    hair_colors: tuple[str, ...] | None = Field(default=None, min_length=1)


class EthnicityVocab(_Frozen):
    # The option-off draw picks among these (by sorted name); races7 draws from both lists.
    countries: dict[str, Country] = Field(min_length=1)
    # Countries drawn only with PromptConfig.races7 (e.g. Middle Eastern ones under white): kept out
    # of `countries` so that adding them leaves the option-off draw, and so every existing dataset's
    # prompts, exactly as they were.
    races7_countries: dict[str, Country] = Field(default_factory=dict)
    # Natural hair colours typical of the group; unset = hair.colors. Keeps prompts coherent
    # (a conflicting "blonde" can pull the image away from the labelled ethnicity).
    hair_colors: tuple[str, ...] | None = Field(default=None, min_length=1)
    hair_styles: CountryNames | None = None  # per gender; unset = hair.styles


class HairVocab(_Frozen):
    lengths: tuple[str, ...] = Field(min_length=1)
    styles: CountryNames  # same shape: a list per gender
    colors: tuple[str, ...] = Field(min_length=1)
    grey_colors: tuple[str, ...] = Field(min_length=1)
    grey_from_age: float = Field(default=40, ge=0)
    grey_full_age: float = Field(default=75, ge=0)

    @model_validator(mode="after")
    def _ages(self) -> HairVocab:
        if self.grey_full_age <= self.grey_from_age:
            raise ValueError(f"grey_full_age ({self.grey_full_age}) must exceed grey_from_age ({self.grey_from_age})")
        return self


class ProfessionGroup(_Frozen):
    max_age: int | None  # inclusive; None = no upper limit (the last group)
    options: tuple[str, ...] = Field(min_length=1)


class DescriptorGroup(_Frozen):
    name: str
    options: tuple[str, ...] = Field(min_length=1)
    min_age: int | None = None  # inclusive limits on who may get this group
    max_age: int | None = None
    gender: Literal["male", "female"] | None = None

    def applies(self, age: int, gender: str) -> bool:
        return ((self.min_age is None or age >= self.min_age) and (self.max_age is None or age <= self.max_age)
                and (self.gender is None or gender == self.gender))


class Vocab(_Frozen):
    ethnicities: dict[str, EthnicityVocab]
    hair: HairVocab
    professions: tuple[ProfessionGroup, ...] = Field(min_length=1)
    descriptors: tuple[DescriptorGroup, ...] = Field(min_length=1)

    @field_validator("ethnicities")
    @classmethod
    def _all_ethnicities(cls, v: dict[str, EthnicityVocab]) -> dict[str, EthnicityVocab]:
        unknown = sorted(set(v) - set(ETHNICITIES))
        if unknown:
            raise ValueError(f"unknown ethnicity {unknown[0]!r} (known: {', '.join(ETHNICITIES)})")
        missing = [e for e in ETHNICITIES if e not in v]
        if missing:
            raise ValueError(f"missing ethnicity {missing[0]!r}: every one of {', '.join(ETHNICITIES)} needs countries")
        for eth, ev in v.items():
            _check_country_races(eth, ev)
        return v

    @field_validator("professions")
    @classmethod
    def _profession_ages(cls, v: tuple[ProfessionGroup, ...]) -> tuple[ProfessionGroup, ...]:
        limits = [g.max_age for g in v]
        if limits[-1] is not None:
            raise ValueError("the last profession group must have max_age: null (covers every older age)")
        bounded = limits[:-1]
        if any(m is None for m in bounded) or bounded != sorted(set(bounded)):
            raise ValueError(f"profession groups need strictly ascending max_age, got {limits}")
        return v

    def race7_countries(self, ethnicity: str, race: str) -> dict[str, Country]:
        """The countries of `race` in the class `ethnicity` (races7's pool: both country lists)."""
        ev = self.ethnicities[ethnicity]
        return {name: c for name, c in {**ev.countries, **ev.races7_countries}.items()
                if country_race7(ethnicity, c) == race}

    def profession_options(self, age: int) -> tuple[str, ...]:
        for group in self.professions:
            if group.max_age is None or age <= group.max_age:
                return group.options
        raise AssertionError("unreachable: the last group has no max_age")


def country_race7(ethnicity: str, country: Country) -> str | None:
    """A country's FairFace race: its race7, else its class's only race (None: unknown)."""
    folded = races7_of(ethnicity)
    return country.race7 or (folded[0] if len(folded) == 1 else None)


def _check_country_races(ethnicity: str, ev: EthnicityVocab) -> None:
    """Each country's race7, where set, is a FairFace race folded into its class; no country is in
    both lists (which entry would a prompt use?)."""
    folded = races7_of(ethnicity)
    for key, countries in (("countries", ev.countries), ("races7_countries", ev.races7_countries)):
        for name, c in countries.items():
            if c.race7 is not None and c.race7 not in folded:
                what = "not folded into" if c.race7 in FAIRFACE_RACE_TO_ETHNICITY else "not a FairFace race of"
                raise ValueError(f"{ethnicity}.{key}.{name}.race7: {c.race7!r} is {what} {ethnicity!r} "
                                 f"(one of: {', '.join(folded)})")
    both = sorted(set(ev.countries) & set(ev.races7_countries))
    if both:
        raise ValueError(f"{ethnicity}: {both[0]!r} is in both countries and races7_countries")


def _packaged_vocab_text() -> str:
    return (importlib.resources.files("synthfar_ray") / "data" / "vocab.yaml").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=16)
def _load_vocab_cached(path: str | None) -> Vocab:
    source = path or "packaged synthfar_ray/data/vocab.yaml"
    if path is None:
        text = _packaged_vocab_text()
    else:
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except (storage.StorageError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read vocab {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"vocab {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"vocab {source} must hold a mapping at the top level")
    vocab = validate(Vocab, data, f"vocab {source}")
    logger.debug("loaded %s: %d countries", source, sum(len(e.countries) for e in vocab.ethnicities.values()))
    return vocab


@functools.lru_cache(maxsize=16)
def races7_pools(path: str | None) -> dict[tuple[str, str], tuple[str, ...]]:
    """{(ethnicity, race): sorted country names} of a vocab, for PromptConfig.races7. Raises
    ConfigError naming the file and the race when some race has no country, or naming a white/asian
    country without race7 (which race it belongs to decides whether it can be drawn at all)."""
    source = path or "packaged synthfar_ray/data/vocab.yaml"
    vocab = load_vocab(path)
    for eth, ev in vocab.ethnicities.items():
        for key, countries in (("countries", ev.countries), ("races7_countries", ev.races7_countries)):
            unset = [name for name, c in countries.items() if country_race7(eth, c) is None]
            if unset:
                raise ConfigError(f"vocab {source}: ethnicities.{eth}.{key}.{unset[0]} needs a race7 "
                                  f"({' or '.join(races7_of(eth))}) for prompts.races7")
    pools = {(eth, race): tuple(sorted(vocab.race7_countries(eth, race)))
             for eth in ETHNICITIES for race in races7_of(eth)}
    empty = [race for (eth, race), names in pools.items() if not names]
    if empty:
        eth = FAIRFACE_RACE_TO_ETHNICITY[empty[0]]
        raise ConfigError(f"vocab {source}: race {empty[0]!r} has no country (prompts.races7 needs one under "
                          f"ethnicities.{eth}.countries or races7_countries with race7: {empty[0]})")
    return pools


def load_vocab(path: str | None = None) -> Vocab:
    """The packaged vocabulary, or a user YAML (local path or URI) of the same shape.

    Parsed once per process and path (sampling calls this per image); raises ConfigError naming the
    file and the missing/invalid key (e.g. `ethnicities.black.countries.Kenya.female`).
    """
    return _load_vocab_cached(path)


# ------------------------------------------------------------------------------------- configs


class TargetDistribution(StrictModel):
    """Target proportions by label name; each marginal optional (missing = uniform).

    Names missing from a given marginal get proportion 0. Values are normalised to sum to 1.
    """

    ethnicity: dict[str, float] | None = None
    gender: dict[str, float] | None = None
    age_bin: dict[str, float] | None = None  # keys: labels.AGE_BIN_NAMES

    @field_validator("ethnicity", "gender", "age_bin")
    @classmethod
    def _proportions(cls, v: dict[str, float] | None, info) -> dict[str, float] | None:
        if v is None:
            return None
        known = {"ethnicity": ETHNICITIES, "gender": GENDERS, "age_bin": AGE_BIN_NAMES}[info.field_name]
        for name, p in v.items():
            if name not in known:
                raise ValueError(f"unknown {info.field_name} {name!r} (known: {', '.join(known)})")
            if not (p >= 0 and math.isfinite(p)):
                raise ValueError(f"proportion of {name!r} must be a finite number >= 0, got {p}")
        total = sum(v.values())
        if total <= 0:
            raise ValueError("proportions must not all be zero")
        if abs(total - 1.0) < 1e-9:
            total = 1.0  # already normalised: keep values bit-exact so a JSON round trip is stable
        return {name: v.get(name, 0.0) / total for name in known}


class PromptConfig(StrictModel):
    template: str = DEFAULT_TEMPLATE
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    distribution: Literal["balanced", "target"] = "balanced"
    target: TargetDistribution | None = None  # required iff distribution == "target"
    min_age: int = Field(default=0, ge=0, le=150)  # ages are uniform in [min_age, max_age)
    max_age: int = Field(default=85, ge=1, le=151)
    # A user vocab YAML (path or s3:// URI) replacing the packaged one. A local path is checked
    # when the config is validated; on a cluster it must exist on every node (or use s3://).
    vocab: InputPath | None = None
    # Left out of a dumped config when off (exclude_if), so the generate fingerprint of datasets made
    # before the option does not change and they still resume.
    races7: bool = Field(False, exclude_if=lambda v: not v, description="draw each prompt's FairFace race "
                         "(uniformly among those folded into its class) and then a country of that race; "
                         "diffusion rows record it in render_race7")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        tpl = string.Template(v)
        if not tpl.is_valid():
            raise ValueError("template has a malformed $placeholder (write $$ for a literal $)")
        unknown = sorted(set(tpl.get_identifiers()) - TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown template placeholder ${unknown[0]} (known: {', '.join(sorted(TEMPLATE_FIELDS))})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PromptConfig:
        if self.max_age <= self.min_age:
            raise ValueError(f"max_age ({self.max_age}) must be greater than min_age ({self.min_age})")
        if self.distribution == "target" and self.target is None:
            raise ValueError("distribution 'target' needs a `target` (proportions by ethnicity/gender/age_bin)")
        if self.distribution == "balanced" and self.target is not None:
            raise ValueError("`target` is only used with distribution: target (remove it, or set distribution: target)")
        if self.target is not None and self.target.age_bin is not None:
            open_bins = {b.bin_index for b in age_bands(self.min_age, self.max_age)}
            for i, name in enumerate(AGE_BIN_NAMES):
                if self.target.age_bin[name] > 0 and i not in open_bins:
                    raise ValueError(f"target age_bin {name!r} has weight but lies outside [{self.min_age}, {self.max_age})")
        if self.vocab is None or storage.is_local(self.vocab):  # fail at config time, not mid-job
            if self.vocab is not None:
                load_vocab(self.vocab)
            if self.races7:
                races7_pools(self.vocab)
        return self


# --------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class AgeBand:
    bin_index: int  # index into labels.AGE_BIN_NAMES
    lo: int  # inclusive
    hi: int  # exclusive


def age_bands(min_age: int, max_age: int) -> list[AgeBand]:
    """FairFace's age bins clipped to [min_age, max_age), empty ones dropped."""
    lows = (0, *AGE_BIN_EDGES)
    highs = (*AGE_BIN_EDGES, max_age)
    bands = []
    for i, (lo, hi) in enumerate(zip(lows, highs)):
        lo, hi = max(lo, min_age), min(hi, max_age)
        if lo < hi:
            bands.append(AgeBand(i, lo, hi))
    return bands


@dataclass(frozen=True)
class FaceAttributes:
    age: int
    gender: str  # labels.GENDERS
    ethnicity: str  # labels.ETHNICITIES
    country: str
    name: str
    hair_length: str
    hair_style: str
    hair_color: str
    profession: str
    descriptors: tuple[str, ...]
    race7: str | None = None  # labels.FAIRFACE_RACES7 name, with PromptConfig.races7 only


def gender_phrase(age: int | float, gender: str) -> str:
    """Age-dependent words for the person, e.g. (3, female) -> 'infant girl', (70, male) -> 'grandfather'."""
    if gender not in GENDERS:
        raise ValueError(f"unknown gender {gender!r} (known: {', '.join(GENDERS)})")
    if age < 0:
        raise ValueError(f"age must be >= 0, got {age}")
    for upper, female, male in _GENDER_BANDS:
        if age <= upper:
            return female if gender == "female" else male
    raise AssertionError("unreachable: the last band is unbounded")


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


# A bug guard: the label grids used here need a few thousand search steps at most.
_ORDER_SEARCH_LIMIT = 200_000


def _projections(n_axes: int) -> list[tuple[int, ...]]:
    """Every non-empty set of axes: each axis, each pair, ..., the whole cell."""
    return [p for r in range(1, n_axes + 1) for p in itertools.combinations(range(n_axes), r)]


@functools.lru_cache(maxsize=32)
def balanced_order(sizes: tuple[int, ...], loose: tuple[int, ...] = ()) -> tuple[tuple[int, ...], ...]:
    """Every cell of the grid `sizes` exactly once, ordered so that every prefix is balanced on every
    projection (each axis, each set of axes, the cell): counts within one of each other; for the
    single axes listed in `loose`, within one of n/k instead.

    Depth-first search, cells tried in lexicographic order, so the order is a pure function of its
    arguments. Bounding each count by ceil(n/k) at every prefix n is enough for "within one of each
    other": at each multiple of k every count is then exactly n/k.
    """
    cells = list(itertools.product(*(range(s) for s in sizes)))
    projections = _projections(len(sizes))
    widths = [math.prod(sizes[a] for a in p) for p in projections]
    keys = {c: [tuple(c[a] for a in p) for p in projections] for c in cells}
    counts: list[dict[tuple[int, ...], int]] = [dict.fromkeys(itertools.product(*(range(sizes[a]) for a in p)), 0)
                                                for p in projections]
    order: list[tuple[int, ...]] = []
    steps = 0

    def fits(cell: tuple[int, ...], n: int) -> bool:
        for p, k, key, count in zip(projections, widths, keys[cell], counts):
            c = count[key] + 1
            if len(p) == 1 and p[0] in loose:
                if c * k > n + k or any((v + (kk == key)) * k < n - k for kk, v in count.items()):
                    return False
            elif c > -(-n // k):
                return False
        return True

    def add(cell: tuple[int, ...], step: int) -> None:
        for key, count in zip(keys[cell], counts):
            count[key] += step

    def extend() -> bool:
        nonlocal steps
        if len(order) == len(cells):
            return True
        for cell in cells:
            steps += 1
            if steps > _ORDER_SEARCH_LIMIT:
                raise RuntimeError(f"no balanced order of the grid {sizes} (loose axes {loose}) found in "
                                   f"{_ORDER_SEARCH_LIMIT} steps")
            if fits(cell, len(order) + 1):
                add(cell, 1)
                order.append(cell)
                if extend():
                    return True
                order.pop()
                add(cell, -1)
        return False

    if not extend():
        raise RuntimeError(f"the grid {sizes} has no balanced order (loose axes {loose})")
    return tuple(order)


def label_grid(cfg: PromptConfig) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """((ethnicities, genders, age bands), loose axes) of `balanced`: see the module docstring for
    why ethnicity is loose when the band count shares a factor with it (only 5 bands)."""
    sizes = (len(ETHNICITIES), len(GENDERS), len(age_bands(cfg.min_age, cfg.max_age)))
    return sizes, ((0,) if math.gcd(sizes[0], sizes[2]) > 1 else ())


@functools.lru_cache(maxsize=256)
def _block_relabel(run_seed: int, block: int, sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per block, a seeded renaming of each attribute's values: renaming keeps every balance."""
    rng = _rng(run_seed, block, *sizes, _TAG_BLOCK)
    return tuple(tuple(int(v) for v in rng.permutation(n)) for n in sizes)


@functools.lru_cache(maxsize=64)
def _target_shift(run_seed: int) -> np.ndarray:
    return _rng(run_seed, _TAG_TARGET_SHIFT).random(3)


def _inverse_cdf(probs: list[float], u: float) -> int:
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # guard rounding so u < 1 always lands on a category
    return min(int(np.searchsorted(cdf, u, side="right")), len(probs) - 1)


def sample_labels(run_seed: int, image_id: int, cfg: PromptConfig) -> tuple[str, str, AgeBand]:
    """(ethnicity, gender, age band) of one id: a pure function of (run_seed, image_id, cfg)."""
    bands = age_bands(cfg.min_age, cfg.max_age)
    if cfg.distribution == "balanced":
        sizes, loose = label_grid(cfg)
        order = balanced_order(sizes, loose)
        block, position = divmod(image_id, len(order))
        e, g, b = (perm[v] for perm, v in zip(_block_relabel(run_seed, block, sizes), order[position]))
        return ETHNICITIES[e], GENDERS[g], bands[b]
    target = cfg.target
    assert target is not None  # guaranteed by PromptConfig's validator
    u = (_target_shift(run_seed) + (image_id + 1) * _R3_ALPHAS) % 1.0
    eth_p = [target.ethnicity[n] for n in ETHNICITIES] if target.ethnicity else [1.0 / len(ETHNICITIES)] * len(ETHNICITIES)
    gen_p = [target.gender[n] for n in GENDERS] if target.gender else [1.0 / len(GENDERS)] * len(GENDERS)
    if target.age_bin:
        band_p = [target.age_bin[AGE_BIN_NAMES[b.bin_index]] for b in bands]
    else:
        band_p = [1.0 / len(bands)] * len(bands)
    return (ETHNICITIES[_inverse_cdf(eth_p, u[0])], GENDERS[_inverse_cdf(gen_p, u[1])],
            bands[_inverse_cdf(band_p, u[2])])


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_race7(run_seed: int, image_id: int, ethnicity: str) -> str:
    """One of FairFace's races folded into `ethnicity`, uniformly, from the id's races7 stream."""
    races = races7_of(ethnicity)
    u = _rng(run_seed, image_id, _TAG_RACE7).random()
    return races[min(int(u * len(races)), len(races) - 1)]


def sample_attributes(run_seed: int, image_id: int, cfg: PromptConfig) -> FaceAttributes:
    """The face description of one image id: a pure function of (run_seed, image_id, cfg)."""
    if run_seed < 0 or image_id < 0:
        raise ValueError(f"run_seed and image_id must be >= 0, got {run_seed}, {image_id}")
    ethnicity, gender, band = sample_labels(run_seed, image_id, cfg)
    age = int(_rng(run_seed, image_id, _TAG_AGE).integers(band.lo, band.hi))

    vocab = load_vocab(cfg.vocab)
    rng = _rng(run_seed, image_id, _TAG_DETAILS)
    ev = vocab.ethnicities[ethnicity]
    race7 = sample_race7(run_seed, image_id, ethnicity) if cfg.races7 else None
    # The same one draw from `rng` either way, so every later attribute uses the same numbers.
    pool = races7_pools(cfg.vocab)[ethnicity, race7] if race7 else sorted(ev.countries)
    country = _pick(rng, pool)
    entry = ev.countries[country] if country in ev.countries else ev.races7_countries[country]
    name = _pick(rng, getattr(entry, gender))
    hair = vocab.hair
    hair_length = _pick(rng, hair.lengths)
    hair_style = _pick(rng, getattr(ev.hair_styles or hair.styles, gender))
    p_grey = 0.9 * min(max((age - hair.grey_from_age) / (hair.grey_full_age - hair.grey_from_age), 0.0), 1.0)
    natural = entry.hair_colors or ev.hair_colors or hair.colors
    hair_color = _pick(rng, hair.grey_colors if rng.random() < p_grey else natural)
    profession = _pick(rng, vocab.profession_options(age))
    eligible = [g for g in vocab.descriptors if g.applies(age, gender)]
    k = min(int(rng.integers(1, 5)), len(eligible))  # 1-4 descriptive attributes
    chosen = sorted(rng.choice(len(eligible), size=k, replace=False)) if k else []
    descriptors = tuple(_pick(rng, eligible[i].options) for i in chosen)
    return FaceAttributes(age=age, gender=gender, ethnicity=ethnicity, country=country, name=name,
                          hair_length=hair_length, hair_style=hair_style, hair_color=hair_color,
                          profession=profession, descriptors=descriptors, race7=race7)


def render_prompt(attrs: FaceAttributes, cfg: PromptConfig) -> str:
    """Fill the template; suffix = profession plus the descriptive attributes."""
    suffix = ", ".join([attrs.profession, *attrs.descriptors])
    values = {
        "age": str(attrs.age),
        "gender": gender_phrase(attrs.age, attrs.gender),
        "country": attrs.country,
        "name": attrs.name,
        "hair_length": attrs.hair_length,
        "hair_style": attrs.hair_style,
        "hair_color": attrs.hair_color,
        "suffix": suffix,
        "ethnicity": attrs.ethnicity,
        "profession": attrs.profession,
        "descriptors": ", ".join(attrs.descriptors),
    }
    return string.Template(cfg.template).substitute(values)
