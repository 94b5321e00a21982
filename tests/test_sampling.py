"""Sampling stage: top-K per class, random / cl-sam / cr-sam scores, the Ray Data scoring job and
the selection files training reads."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfar_ray.config import ConfigError, load_config
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import CORE_FIELDS, age_to_bin
from synthfar_ray.discriminator import load_discriminator, realism_scores
from synthfar_ray.sampling import (SELECTION_FILE, class_quotas, fit_discriminator,
                                   random_scores, run_sample, select_top_k)
from synthfar_ray.sampling_config import SampleConfig, ScorerTrain
from synthfar_ray.selection import read_selection_ids


# ---------------------------------------------------------------------------------------------
# Fixture datasets (the shared row schema, tiny JPEGs)

def face_rows(n: int, seed: int, start_id: int = 0, split: str = "train", domain: str = "coded",
              size: int = 32) -> dict:
    """Rows whose pixels depend on the domain: "coded" = colour encodes gender (red) and ethnicity
    (green), so a tiny net learns them in a few steps; "bright" / "dark" = noise of two brightness
    ranges (two visibly different domains)."""
    rng = np.random.default_rng(seed)
    eth, gen = rng.integers(0, 5, n), rng.integers(0, 2, n)
    age = rng.uniform(0, 85, n).astype(np.float32)
    images = []
    for e, g in zip(eth, gen):
        if domain == "bright":
            im = rng.integers(150, 256, (size, size, 3))
        elif domain == "dark":
            im = rng.integers(0, 90, (size, size, 3))
        else:
            im = np.array([50 + 150 * g, 30 + 45 * e, 120]) + rng.integers(-15, 16, (size, size, 3))
        images.append(encode_jpeg(np.clip(im, 0, 255).astype(np.uint8)))
    return {"id": np.arange(start_id, start_id + n, dtype=np.int64), "image": images,
            "width": np.full(n, size, np.int32), "height": np.full(n, size, np.int32), "age": age,
            "age_bin": age_to_bin(age).astype(np.int8), "gender": gen.astype(np.int8),
            "ethnicity": eth.astype(np.int8), "source": ["fixture"] * n, "split": [split] * n}


def write_dataset(path: str, parts: list[dict], subsets: bool = False, part: int = 0) -> str:
    cols = {f.name: [v for p in parts for v in p[f.name]] for f in CORE_FIELDS}
    fields = list(CORE_FIELDS)
    arrays = [pa.array(cols[f.name], type=f.type) for f in fields]
    if subsets:
        n = len(cols["id"])
        fields.append(pa.field("subset", pa.int8()))
        arrays.append(pa.array(np.array([25, 50, 75, 100], np.int8)[np.arange(n) % 4]))
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), os.path.join(path, f"part-{part:06d}.parquet"))
    if part == 0:
        with open(os.path.join(path, "_manifest.json"), "w") as f:
            json.dump({"rows": len(cols["id"])}, f)
    return path


# ---------------------------------------------------------------------------------------------
# select_top_k (pure)

def _scores(rows: list[tuple[int, float, int, int]]) -> pd.DataFrame:
    """(id, score, ethnicity, gender) rows; age_bin constant."""
    return pd.DataFrame(rows, columns=["id", "score", "ethnicity", "gender"]).assign(age_bin=3)


def test_select_top_k_exact_ids_per_class():
    # white/male: 6 rows, black/female: 5 rows, asian/male: 4 rows; K=9 -> 3 per class.
    rows = [(i, s, 0, 0) for i, s in zip(range(0, 6), [0.1, 0.9, 0.5, 0.7, 0.3, 0.8])]
    rows += [(i, s, 1, 1) for i, s in zip(range(10, 15), [0.2, 0.2, 0.9, 0.1, 0.2])]  # tie at 0.2: ids 10, 11, 14
    rows += [(i, s, 2, 0) for i, s in zip(range(20, 24), [0.4, 0.3, 0.2, 0.1])]
    out = select_top_k(_scores(rows), 9, ["ethnicity", "gender"])
    chosen = out[out["chosen"]]
    by_class = {c: sorted(g["id"]) for c, g in chosen.groupby("class")}
    assert by_class == {"white/male": [1, 3, 5], "black/female": [10, 11, 12], "asian/male": [20, 21, 22]}
    assert len(out) == len(rows) and chosen.shape[0] == 9
    # rank 1 is the best of its class; ties broken by id
    black = out[out["class"] == "black/female"].sort_values("rank")
    assert black["id"].tolist() == [12, 10, 11, 14, 13]
    assert black["rank"].tolist() == [1, 2, 3, 4, 5]


def test_select_top_k_splits_remainder_and_class_key():
    rows = [(i, 1.0 - i / 100, i % 2, 0) for i in range(40)]  # ethnicity 0 / 1 alternate
    out = select_top_k(_scores(rows), 7, ["ethnicity"])
    counts = out[out["chosen"]].groupby("class").size().to_dict()
    assert counts == {"black": 3, "white": 4} or counts == {"black": 4, "white": 3}
    assert sum(counts.values()) == 7
    # one class key only: gender is constant, so all rows form one class
    assert select_top_k(_scores(rows), 7, ["gender"])["chosen"].sum() == 7


def test_short_class_warns_with_numbers_and_keeps_all(caplog):
    rows = [(i, 0.5, 0, 1) for i in range(10)] + [(100 + i, 0.5, 4, 1) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="synthfar_ray.selection"):
        out = select_top_k(_scores(rows), 8, ["ethnicity", "gender"])
    assert "class other/female: 2 rows < 4 wanted" in caplog.text
    kept = out[out["chosen"]].groupby("class").size().to_dict()
    assert kept == {"other/female": 2, "white/female": 4}  # shortfall not moved by default

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synthfar_ray.selection"):
        out = select_top_k(_scores(rows), 8, ["ethnicity", "gender"], redistribute=True)
    assert "redistributed" in caplog.text
    assert out[out["chosen"]].groupby("class").size().to_dict() == {"other/female": 2, "white/female": 6}


def test_class_quotas_water_filling():
    kept, wanted = class_quotas({"a": 1, "b": 10, "c": 3}, 10, redistribute=True)
    assert sum(kept.values()) == 10 and kept["a"] == 1 and kept["c"] == 3 and kept["b"] == 6
    kept, _ = class_quotas({"a": 1, "b": 2}, 10, redistribute=True)
    assert kept == {"a": 1, "b": 2}  # never more than available


def test_unknown_labels_are_never_chosen():
    df = _scores([(1, 0.9, -1, 0), (2, 0.1, 0, 0), (3, 0.5, 0, 0)])
    out = select_top_k(df, 2, ["ethnicity"])
    assert out.set_index("id").loc[1, "class"] == "unknown"
    assert sorted(out[out["chosen"]]["id"]) == [2, 3]


def test_random_scores_pure_in_seed_and_id():
    ids = np.arange(1000, dtype=np.int64)
    a = random_scores(ids, seed=7)
    # same (seed, id) -> same score, whatever order or batch the id arrives in
    perm = np.random.default_rng(0).permutation(ids)
    np.testing.assert_array_equal(random_scores(perm, 7), a[perm])
    np.testing.assert_array_equal(np.concatenate([random_scores(ids[:300], 7), random_scores(ids[300:], 7)]), a)
    b = random_scores(ids, seed=8)
    assert not np.allclose(a, b)
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.05
    assert np.corrcoef(a, b)[0, 1] < 0.1


def test_config_k_or_multiple(tmp_path):
    cfg = SampleConfig(synthetic="s", real="r", k=500)
    assert cfg.k == 500 and cfg.k_multiple is None
    assert SampleConfig(synthetic="s", real="r").k_multiple == 1.0
    path = tmp_path / "c.yaml"
    path.write_text("synthetic: s\nreal: r\nk: 10\nk_multiple: 2.0\n")
    with pytest.raises(ConfigError, match="exactly one of k"):
        load_config(SampleConfig, str(path))
    with pytest.raises(ConfigError, match="class_key"):
        load_config(SampleConfig, None, ["synthetic=s", "real=r", "class_key=[gender, gender]"])
    with pytest.raises(ConfigError, match="method"):
        load_config(SampleConfig, None, ["synthetic=s", "real=r", "method=top"])


# ---------------------------------------------------------------------------------------------
# With Ray

def test_discriminator_separates_domains(ray_cluster, tmp_path):
    real = write_dataset(str(tmp_path / "real"), [face_rows(96, 1, domain="bright")])
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(96, 2, domain="dark")])
    settings = ScorerTrain(backbone="tiny", image_size=32, steps=40, batch_size=32, lr=3e-3, augment=False)
    model, size, crop = load_discriminator(fit_discriminator(real, syn, settings, seed=0))
    assert size == 32 and crop is None
    rng = np.random.default_rng(123)  # images the discriminator never saw
    held_real = rng.integers(150, 256, (40, 32, 32, 3)).astype(np.uint8)
    held_syn = rng.integers(0, 90, (40, 32, 32, 3)).astype(np.uint8)
    p_real, p_syn = realism_scores(model, held_real), realism_scores(model, held_syn)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(np.r_[np.ones(40), np.zeros(40)], np.r_[p_real, p_syn])
    assert auc > 0.9, auc
    assert p_real.mean() - p_syn.mean() > 0.3, (p_real.mean(), p_syn.mean())


def test_run_sample_cl_sam_end_to_end(ray_cluster, tmp_path, caplog):
    """cl-sam with a classifier the stage trains (train.py) on coded real images; synthetic rows
    whose gender label contradicts the image must rank low, and the selection is what training reads."""
    real = write_dataset(str(tmp_path / "real"), [face_rows(96, 1, 0, "train"), face_rows(16, 2, 1000, "val")],
                         subsets=True)
    syn_rows = face_rows(90, 3, 0, "train")
    wrong = np.zeros(90, dtype=bool)
    wrong[::3] = True  # every third row: label says the other gender than its pixels show
    syn_rows["gender"] = np.where(wrong, 1 - syn_rows["gender"], syn_rows["gender"]).astype(np.int8)
    # val rows (ids 500..) are never scored or chosen: training reads the train split only
    syn = write_dataset(str(tmp_path / "syn"), [syn_rows, face_rows(12, 4, 500, "val")])

    cfg = load_config(SampleConfig, None, [
        f"synthetic={syn}", f"real={real}", "method=cl-sam", "k=40", "class_key=[gender]",
        "scorer_train.backbone=tiny", "scorer_train.image_size=32", "scorer_train.steps=40",
        "scorer_train.batch_size=16", "scorer_train.lr=0.005", "scorer_train.augment=false",
        "scorer_train.cpus_per_worker=0.5", "scorer_train.data_cpus=0.25", "batch_size=32", "num_actors=1"])
    result = run_sample(cfg)
    assert result.k == 40 and result.chosen == 40
    assert result.output == os.path.join(syn, "_selections", "cl-sam-40")

    sel = pq.read_table(os.path.join(result.output, SELECTION_FILE)).to_pandas()
    assert list(sel.columns) == ["id", "score", "class", "chosen", "rank", "method"]
    assert len(sel) == 90 and sel["chosen"].sum() == 40 and set(sel["method"]) == {"cl-sam"}
    manifest = json.loads(open(os.path.join(result.output, "_manifest.json")).read())
    labels = np.where(syn_rows["gender"] == 1, "female", "male")
    assert manifest["chosen"] == 40 and manifest["k"] == 40
    assert manifest["classes"] == {c: {"available": int((labels == c).sum()), "kept": 20} for c in ("female", "male")}

    chosen_ids = sel.loc[sel["chosen"], "id"].to_numpy()
    precision = 1 - wrong[chosen_ids].mean()
    assert precision >= 0.9, f"{precision:.2f} of chosen rows have consistent labels (chance {1 - wrong.mean():.2f})"
    scores = sel.set_index("id")["score"].sort_index().to_numpy()
    assert scores[~wrong].mean() > scores[wrong].mean() + 0.3

    # the one reader of selections (what training keeps)
    assert read_selection_ids(result.output, cfg.storage).tolist() == sorted(chosen_ids.tolist())
    assert chosen_ids.max() < 90  # no val row

    # A different K reuses the cached scores: no second classifier, same scores.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthfar_ray.sampling"):
        again = run_sample(cfg.model_copy(update={"k": 10}))
    assert "using cached scores" in caplog.text and again.scores_uri == result.scores_uri
    assert again.chosen == 10 and again.output.endswith("cl-sam-10")


def test_cli_random_k_multiple_with_short_class(ray_cluster, tmp_path, capsys):
    from synthfar_ray.cli import main

    real = write_dataset(str(tmp_path / "real"), [face_rows(20, 1, 0, "train"), face_rows(8, 2, 100, "val")],
                         subsets=True)
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(30, 3)])
    out = str(tmp_path / "sel")
    # 1x of the 25 % subset (5 real train rows) ... 2x -> K = 10 over the ethnicities present
    config = tmp_path / "sample.yaml"
    config.write_text(f"synthetic: {syn}\nreal: {real}\nmethod: cl-sam\nclass_key: [ethnicity]\n")
    rc = main(["sample", str(config), "method=random", "real_subset=25", "k_multiple=2.0",
               "redistribute=true", f"output={out}", "seed=3"])
    assert rc == 0, capsys.readouterr().err
    real_train_25 = sum(1 for i in range(20) if [25, 50, 75, 100][i % 4] <= 25)
    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert manifest["real_train_rows"] == real_train_25 and manifest["k"] == 2 * real_train_25
    sel = pq.read_table(os.path.join(out, SELECTION_FILE)).to_pandas()
    assert sel["chosen"].sum() == 2 * real_train_25
    # random scores are the seeded hash of the id
    np.testing.assert_allclose(sel.sort_values("id")["score"].to_numpy(), random_scores(np.arange(30), 3))
    assert "kept 10 rows" in capsys.readouterr().out


def test_random_selection_on_s3(s3_bucket, tmp_path):
    """Scores cache, selection and manifest on object storage (moto's S3 server)."""
    from synthfar_ray import storage as st

    bucket, opts = s3_bucket
    for name, parts, subsets in (("real", [face_rows(12, 1, 0, "train")], True), ("syn", [face_rows(24, 2)], False)):
        local = write_dataset(str(tmp_path / name), parts, subsets)
        for f in os.listdir(local):
            st.write_bytes(f"{bucket}/{name}/{f}", open(os.path.join(local, f), "rb").read(), opts)
    cfg = SampleConfig(synthetic=f"{bucket}/syn", real=f"{bucket}/real", method="random", k_multiple=1.0,
                       class_key=["gender"], redistribute=True, storage=opts)
    result = run_sample(cfg)
    assert result.output == f"{bucket}/syn/_selections/random-12" and result.chosen == 12
    assert st.exists(result.scores_uri, opts) and st.exists(f"{result.output}/_manifest.json", opts)
    assert len(read_selection_ids(result.output, opts)) == 12
    # the synthetic folder still reads as the dataset alone: score/selection files are skipped
    from synthfar_ray.sampling import open_dataset

    assert open_dataset(f"{bucket}/syn", opts).count_rows() == 24


# ---------------------------------------------------------------------------------------------
# Score cache keyed by content; train split only; errors that name the setting


def _read_sel(output: str) -> pd.DataFrame:
    return pq.read_table(os.path.join(output, SELECTION_FILE)).to_pandas()


def test_score_key_follows_content_not_settings_only(tmp_path):
    from synthfar_ray.sampling import dataset_content, score_key

    real = write_dataset(str(tmp_path / "real"), [face_rows(8, 1)])
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(8, 2)])
    cfgs = {m: SampleConfig(synthetic=syn, real=real, method=m, k=4) for m in ("random", "cr-sam")}

    def keys():
        s, r = dataset_content(syn, None, "synthetic"), dataset_content(real, None, "real")
        return {m: score_key(c, s, r) for m, c in cfgs.items()}

    before = keys()
    assert keys() == before  # stable
    write_dataset(real, [face_rows(4, 3, 100)], part=1)  # the real set grows
    after_real = keys()
    assert after_real["random"] == before["random"]  # random does not depend on the real set
    assert after_real["cr-sam"] != before["cr-sam"]
    write_dataset(syn, [face_rows(4, 4, 100)], part=1)  # the synthetic set grows
    after_syn = keys()
    assert all(after_syn[m] != after_real[m] for m in cfgs)
    assert dataset_content(syn, None).rows == 12
    # a generator's manifest fingerprint is part of the key; other manifest fields are not
    with open(os.path.join(syn, "_manifest.json"), "w") as f:
        json.dump({"rows": 12, "fingerprint": "abc", "seconds": 1.0}, f)
    fp_abc = keys()["random"]
    assert fp_abc != after_syn["random"]
    with open(os.path.join(syn, "_manifest.json"), "w") as f:
        json.dump({"rows": 12, "fingerprint": "abc", "seconds": 2.0}, f)
    assert keys()["random"] == fp_abc


def test_random_rescored_when_synthetic_grows_and_val_rows_never_chosen(ray_cluster, tmp_path, caplog):
    real = write_dataset(str(tmp_path / "real"), [face_rows(10, 1)])
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(20, 2, 0, "train"), face_rows(15, 3, 1000, "val")])
    cfg = SampleConfig(synthetic=syn, real=real, method="random", k=20, class_key=["gender"], redistribute=True)
    first = run_sample(cfg)
    sel = _read_sel(first.output)
    # only the 20 train rows are scored, and all K=20 chosen rows are train rows
    assert len(sel) == 20 and first.chosen == 20 and sel["id"].max() < 20
    scores = pq.read_table(first.scores_uri).to_pandas()
    assert sorted(scores["id"]) == list(range(20))

    with caplog.at_level(logging.INFO, logger="synthfar_ray.sampling"):
        assert run_sample(cfg).scores_uri == first.scores_uri
    assert "using cached scores" in caplog.text

    # the synthetic set grows: new train rows (ids 100..) are scored and can be chosen
    write_dataset(syn, [face_rows(30, 4, 100, "train")], part=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthfar_ray.sampling"):
        grown = run_sample(cfg.model_copy(update={"k": 50}))
    assert "using cached scores" not in caplog.text and grown.scores_uri != first.scores_uri
    sel = _read_sel(grown.output)
    assert len(sel) == 50 and grown.chosen == 50
    assert set(sel.loc[sel["chosen"], "id"]) == set(range(20)) | set(range(100, 130))
    # K larger than the train rows: never filled up with val rows
    assert run_sample(cfg.model_copy(update={"k": 60})).chosen == 50


def _write_classifier(path: str, seed: int) -> str:
    """A checkpoint folder as train.py writes it (model.pt state_dict + meta.json), untrained."""
    import torch

    from synthfar_ray.model import MultiTaskNet

    torch.manual_seed(seed)
    net = MultiTaskNet("tiny", None, "both")
    os.makedirs(path, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(path, "model.pt"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"format": 1, "backbone": "tiny", "age_mode": "both", "image_size": 32, "center_crop": None,
                   "synthetic_center_crop": None, "run": "clf", "plan": "real"}, f)
    return path


def test_cl_sam_cache_not_reused_when_classifier_replaced(ray_cluster, tmp_path, caplog):
    real = write_dataset(str(tmp_path / "real"), [face_rows(10, 1)])
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(24, 2)])
    clf = _write_classifier(str(tmp_path / "clf"), seed=0)
    cfg = SampleConfig(synthetic=syn, real=real, method="cl-sam", k=8, classifier=clf, class_key=["gender"],
                       num_actors=1, batch_size=16)
    first = run_sample(cfg)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthfar_ray.sampling"):
        assert run_sample(cfg).scores_uri == first.scores_uri
    assert "using cached scores" in caplog.text
    manifest = json.loads(open(os.path.join(os.path.dirname(first.scores_uri), "_manifest.json")).read())
    assert manifest["classifier"] == clf and manifest["classifier_digest"]

    _write_classifier(clf, seed=1)  # retrained in place: same path, same meta, other weights
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthfar_ray.sampling"):
        second = run_sample(cfg)
    assert "using cached scores" not in caplog.text and second.scores_uri != first.scores_uri
    a = pq.read_table(first.scores_uri).to_pandas()["score"].to_numpy()
    b = pq.read_table(second.scores_uri).to_pandas()["score"].to_numpy()
    assert not np.allclose(a, b)


def test_errors_name_the_setting(ray_cluster, tmp_path):
    real_val_only = write_dataset(str(tmp_path / "real"), [face_rows(6, 1, 0, "val")])
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(6, 2)])
    with pytest.raises(ConfigError, match=r"k_multiple=1 needs real training rows, but real=.*real has none "
                                          r"with split=='train'"):
        run_sample(SampleConfig(synthetic=syn, real=real_val_only, method="random"))
    syn_val = write_dataset(str(tmp_path / "syn_val"), [face_rows(6, 3, 0, "val")])
    with pytest.raises(ConfigError, match=r"synthetic=.*syn_val has no rows with split=='train'"):
        run_sample(SampleConfig(synthetic=syn_val, real=real_val_only, method="random", k=2))
    from synthfar_ray.storage import StorageError

    with pytest.raises(StorageError, match=r"^synthetic: .*nowhere"):
        run_sample(SampleConfig(synthetic=str(tmp_path / "nowhere"), real=real_val_only, method="random", k=2))
    with pytest.raises(ConfigError, match=r"classifier=.*missing"):
        run_sample(SampleConfig(synthetic=syn, real=real_val_only, method="cl-sam", k=2,
                                classifier=str(tmp_path / "missing")))
    real = write_dataset(str(tmp_path / "real_train"), [face_rows(6, 4)])
    tiny = write_dataset(str(tmp_path / "syn_tiny"), [face_rows(2, 5)])
    with pytest.raises(ConfigError, match=r"scorer_train.cross_fit_folds=5 is too many for synthetic="):
        run_sample(SampleConfig(synthetic=tiny, real=real, method="cr-sam", k=1,
                                scorer_train=ScorerTrain(backbone="tiny", cross_fit_folds=5, use_gpu=False)))


def test_paths_are_absolute_and_torchvision_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SampleConfig(synthetic="syn", real="real", classifier="clf", output="out",
                       scorer_train=ScorerTrain(pretrained="w.pth"))
    assert cfg.synthetic == str(tmp_path / "syn") and cfg.real == str(tmp_path / "real")
    assert cfg.classifier == str(tmp_path / "clf") and cfg.output == str(tmp_path / "out")
    assert cfg.scorer_train.pretrained == str(tmp_path / "w.pth")
    assert ScorerTrain(pretrained="torchvision").pretrained == "torchvision"
    assert SampleConfig(synthetic="s3://b/syn", real="s3://b/real").synthetic == "s3://b/syn"


# ---------------------------------------------------------------------------------------------
# cr-sam cross-fit


def test_cr_sam_cross_fit_never_scores_rows_a_discriminator_saw(ray_cluster, tmp_path):
    from synthfar_ray.discriminator import load_discriminator_meta
    from synthfar_ray.scorers import fold_of
    from synthfar_ray.transforms import decode_resize

    real = write_dataset(str(tmp_path / "real"), [face_rows(48, 1, 0, "train", "bright"),
                                                  face_rows(8, 2, 1000, "val", "bright")])
    # synthetic: 40 dark rows and 20 real-looking (bright) ones, plus val rows that must not be scored
    syn = write_dataset(str(tmp_path / "syn"), [face_rows(40, 3, 0, "train", "dark"),
                                                face_rows(20, 4, 40, "train", "bright"),
                                                face_rows(10, 5, 500, "val", "bright")])
    folds = 3
    cfg = SampleConfig(synthetic=syn, real=real, method="cr-sam", k=20, class_key=["gender"], redistribute=True,
                       seed=5, num_actors=1, batch_size=16,
                       scorer_train=ScorerTrain(backbone="tiny", image_size=32, steps=40, batch_size=32, lr=3e-3,
                                                augment=False, cross_fit_folds=folds, use_gpu=False))
    result = run_sample(cfg)
    scores = pq.read_table(result.scores_uri).to_pandas()
    train_ids = np.arange(60)
    assert scores["id"].tolist() == train_ids.tolist()  # train rows only, each once
    np.testing.assert_array_equal(scores["fold"].to_numpy(), fold_of(train_ids, folds, 5))
    assert set(scores["fold"]) == set(range(folds))

    folder = os.path.dirname(result.scores_uri)
    manifest = json.loads(open(os.path.join(folder, "_manifest.json")).read())
    cross = manifest["cross_fit"]
    assert cross["folds"] == folds and len(cross["discriminators"]) == folds
    assert sum(d["scored_rows"] for d in cross["discriminators"]) == 60
    for rec in cross["discriminators"]:
        f = rec["fold"]
        seen = pq.read_table(rec["trained_on"]).to_pandas()
        syn_seen = set(seen.loc[seen["domain"] == "synthetic", "id"])
        in_fold = set(scores.loc[scores["fold"] == f, "id"])
        assert in_fold and not (syn_seen & in_fold), f"fold {f} discriminator saw rows it scored"
        assert syn_seen == set(train_ids) - in_fold  # all other folds' train rows (max_rows not reached)
        assert set(seen.loc[seen["domain"] == "real", "id"]) == set(range(48))  # real train rows only
        assert rec["scored_rows"] == rec["fold_rows"] == len(in_fold)
        # the stored model of fold f is the one that scored fold f
        model, meta = load_discriminator_meta(open(rec["model"], "rb").read())
        assert (meta["fold"], meta["folds"], meta["fold_seed"]) == (f, folds, 5)
        rows = scores[scores["fold"] == f].sort_values("id")
        table = pq.read_table(os.path.join(syn, "part-000000.parquet")).to_pandas().set_index("id")
        images = np.stack([decode_resize(table.loc[i, "image"], 32) for i in rows["id"]])
        np.testing.assert_allclose(realism_scores(model, images), rows["score"].to_numpy(), rtol=1e-4, atol=1e-5)

    # realism: the real-looking synthetic rows rank first
    sel = _read_sel(result.output)
    chosen = sel.loc[sel["chosen"], "id"].to_numpy()
    assert len(chosen) == 20 and (chosen >= 40).mean() >= 0.8, sorted(chosen)
