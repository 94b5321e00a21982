"""prompts.races7: each prompt draws one of FairFace's 7 races folded into its class, then a country
of that race; diffusion rows record it in render_race7. Off, nothing moves (pinned digests)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_generate import make_cfg  # the tiny-random diffusion config of the generate tests

from synthfar_ray.config import ConfigError, dump_config, load_config
from synthfar_ray.labels import ETHNICITIES, FAIRFACE_RACE_TO_ETHNICITY, FAIRFACE_RACES7
from synthfar_ray.prompts import (PromptConfig, _packaged_vocab_text, load_vocab, races7_pools, render_prompt,
                                  sample_attributes)

MIDDLE_EASTERN = {"Iran", "Lebanon", "Egypt", "Saudi Arabia", "Turkey", "Jordan", "Iraq", "Syria", "Morocco"}


def _digest(cfg: PromptConfig, seed: int = 5, n: int = 200) -> str:
    h = hashlib.sha256()
    for i in range(n):
        a = sample_attributes(seed, i, cfg)
        h.update(f"{a.ethnicity}|{a.gender}|{a.age}|{render_prompt(a, cfg)}\n".encode())
    return h.hexdigest()


def _vocab_file(tmp_path, data: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------- option off


@pytest.mark.parametrize("kw, digest", [
    ({}, "55109652c54e88e9c61a613f19df46d45b5ca8d41505065d23781740d587fc16"),
    ({"distribution": "target", "target": {"ethnicity": {"white": 2, "asian": 1, "black": 1}}},
     "f894c4ed604e2e6035fca416c340e5d56bb6421b301fc475951ef6783d74df79"),
])
def test_option_off_gives_the_prompts_of_before_the_option(kw, digest):
    """Digests computed on the code before races7 and the Middle Eastern countries existed (89781e5):
    the default draw never picks a races7-only country, and no random stream moved."""
    cfg = PromptConfig(**kw)
    assert _digest(cfg) == digest
    attrs = [sample_attributes(5, i, cfg) for i in range(200)]
    assert all(a.race7 is None and a.country not in MIDDLE_EASTERN for a in attrs)
    assert "races7" not in dump_config(cfg)  # so the generate fingerprint of earlier datasets holds
    assert dump_config(PromptConfig(**kw, races7=True))["races7"] is True


# -------------------------------------------------------------------------------- option on


def test_every_race_appears_folds_into_its_class_and_names_its_country():
    on, off = PromptConfig(races7=True), PromptConfig()
    vocab = load_vocab()
    attrs = [sample_attributes(3, i, on) for i in range(700)]
    by_class: dict[str, Counter] = {}
    for i, a in enumerate(attrs):
        assert FAIRFACE_RACE_TO_ETHNICITY[a.race7] == a.ethnicity
        ev = vocab.ethnicities[a.ethnicity]
        entry = {**ev.countries, **ev.races7_countries}[a.country]
        assert a.country in vocab.race7_countries(a.ethnicity, a.race7)
        assert (a.race7 == "Middle Eastern") == (a.country in MIDDLE_EASTERN)
        assert a.name in getattr(entry, a.gender)
        if entry.hair_colors:  # Middle Eastern: dark natural colours, or grey
            assert a.hair_color in set(entry.hair_colors) | set(vocab.hair.grey_colors)
        assert f"(from {a.country})" in render_prompt(a, on)
        # The labels never depend on the option.
        b = sample_attributes(3, i, off)
        assert (a.age, a.gender, a.ethnicity) == (b.age, b.gender, b.ethnicity)
        by_class.setdefault(a.ethnicity, Counter())[a.race7] += 1
    assert {r for c in by_class.values() for r in c} == set(FAIRFACE_RACES7)
    for eth in ("white", "asian"):  # 140 ids per class, two races: uniform within a wide margin
        counts = by_class[eth]
        assert min(counts.values()) > 0.35 * sum(counts.values()), (eth, counts)
    assert {a.country for a in attrs if a.race7 == "Middle Eastern"} == MIDDLE_EASTERN


def test_races7_is_pure_per_seed_and_id():
    cfg = PromptConfig(races7=True)
    in_loop = [sample_attributes(11, i, cfg) for i in range(60)]
    assert sample_attributes(11, 41, PromptConfig(races7=True)) == in_loop[41]
    other = [sample_attributes(12, i, cfg) for i in range(60)]
    assert [a.race7 for a in other] != [a.race7 for a in in_loop]


# ------------------------------------------------------------------------------------ vocab


def test_vocab_race_without_country_fails_at_config_naming_race_and_file(tmp_path):
    data = yaml.safe_load(_packaged_vocab_text())
    del data["ethnicities"]["white"]["races7_countries"]
    path = _vocab_file(tmp_path, data, "no_middle_east.yaml")
    PromptConfig(vocab=path)  # fine without the option
    with pytest.raises(ConfigError, match=r"no_middle_east\.yaml.*race 'Middle Eastern' has no country"):
        load_config(PromptConfig, None, [f"vocab={path}", "races7=true"])
    with pytest.raises(ConfigError, match="race 'Middle Eastern' has no country"):
        races7_pools(path)

    data = yaml.safe_load(_packaged_vocab_text())
    del data["ethnicities"]["asian"]["countries"]["Japan"]["race7"]
    path = _vocab_file(tmp_path, data, "japan.yaml")
    with pytest.raises(ValueError, match=r"japan\.yaml: ethnicities\.asian\.countries\.Japan needs a race7 "
                                         r"\(East Asian or Southeast Asian\)"):
        PromptConfig(vocab=path, races7=True)


def test_vocab_race7_must_fold_into_its_class(tmp_path):
    data = yaml.safe_load(_packaged_vocab_text())
    data["ethnicities"]["asian"]["countries"]["Japan"]["race7"] = "White"
    with pytest.raises(ConfigError, match=r"asian\.countries\.Japan\.race7: 'White' is not folded into 'asian'"):
        load_vocab(_vocab_file(tmp_path, data, "japan_white.yaml"))
    data["ethnicities"]["asian"]["countries"]["Japan"]["race7"] = "Martian"
    with pytest.raises(ConfigError, match="'Martian' is not a FairFace race of 'asian'"):
        load_vocab(_vocab_file(tmp_path, data, "japan_martian.yaml"))
    data = yaml.safe_load(_packaged_vocab_text())
    data["ethnicities"]["white"]["countries"]["Iran"] = data["ethnicities"]["white"]["races7_countries"]["Iran"]
    with pytest.raises(ConfigError, match="'Iran' is in both countries and races7_countries"):
        load_vocab(_vocab_file(tmp_path, data, "iran_twice.yaml"))


def test_procedural_refuses_country_hair_colours_it_cannot_draw():
    from synthfar_ray.faces import VocabError, check_vocab

    vocab = load_vocab()
    check_vocab(vocab)
    iran = vocab.ethnicities["white"].races7_countries["Iran"].model_copy(update={"hair_colors": ("neon green",)})
    white = vocab.ethnicities["white"].model_copy(update={"races7_countries": {"Iran": iran}})
    with pytest.raises(VocabError, match="neon green"):
        check_vocab(vocab.model_copy(update={"ethnicities": {**vocab.ethnicities, "white": white}}))


# --------------------------------------------------------------------------------- generate


def test_fingerprint_without_the_option_is_unchanged(tmp_path):
    """a727a1deab492d36: test_generate.make_cfg's diffusion config, fingerprinted before the option."""
    from synthfar_ray.generate import fingerprint

    off = make_cfg(str(tmp_path))
    assert fingerprint(off) == "a727a1deab492d36"
    assert fingerprint(make_cfg(str(tmp_path), **{"prompts.races7": True})) != "a727a1deab492d36"


def test_procedural_refuses_prompt_races(tmp_path):
    with pytest.raises(ValueError, match="prompts.races7: the procedural generator draws the race it renders"):
        make_cfg(str(tmp_path), generator="procedural", **{"prompts.races7": True})


def test_diffusion_parts_carry_the_prompted_race(tmp_path):
    """The rows a diffusion actor writes (prompt_rows -> part_bytes, with placeholder images): with
    the option the part gets render_race7, the prompt's race; without it the schema of before."""
    import io

    from synthfar_ray.generate import RACE7_FIELD, SYNTHETIC_SCHEMA, part_bytes, prompt_rows

    def part(cfg) -> pa.Table:
        rows = [{**r, "image": b"jpeg", "model": "preset:tiny-random"} for r in prompt_rows(cfg, range(40))]
        return pq.read_table(io.BytesIO(part_bytes(rows, [])))

    cfg = make_cfg(str(tmp_path), **{"prompts.races7": True})
    table = part(cfg)
    assert table.schema.field("render_race7") == RACE7_FIELD
    for r in table.to_pylist():
        a = sample_attributes(cfg.seed, r["id"], cfg.prompts)
        assert FAIRFACE_RACES7[r["render_race7"]] == a.race7
        assert FAIRFACE_RACE_TO_ETHNICITY[a.race7] == ETHNICITIES[r["ethnicity"]]
        assert r["country"] == a.country and f"(from {a.country})" in r["prompt"]
        assert r["render_ethnicity"] is None  # the procedural truth columns stay null
    assert part(make_cfg(str(tmp_path))).schema.names == SYNTHETIC_SCHEMA.names


@pytest.mark.slow  # ~25 s of CPU: building the tiny pipeline and diffusing one batch
def test_tiny_diffusion_shard_records_the_prompted_race(tmp_path):
    """A tiny-random diffusion shard (4 images, 32 px, one batch) written by the actor class itself,
    without Ray: each row's render_race7 is the race its prompt asked for."""
    from synthfar_ray.generate import ShardGenerator

    out = str(tmp_path / "out")
    os.makedirs(out)
    cfg = make_cfg(out, num_images=4, shard_size=4, **{"prompts.races7": True})
    ShardGenerator(cfg).generate_shard(0, 0, 4)
    rows = sorted(pq.read_table(os.path.join(out, "part-000000.parquet")).to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(4))
    for r in rows:
        a = sample_attributes(cfg.seed, r["id"], cfg.prompts)
        assert FAIRFACE_RACES7[r["render_race7"]] == a.race7 and r["country"] == a.country
        assert r["image"] and r["model"] == "preset:tiny-random"
