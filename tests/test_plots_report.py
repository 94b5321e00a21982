"""plots.py and report.py on small real Parquet sets, metrics.json files and a Tune trial table."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthfar_ray import cli, plots, storage
from synthfar_ray.images import encode_jpeg
from synthfar_ray.labels import AGE_BIN_NAMES, CORE_FIELDS, ETHNICITIES, GENDERS, age_to_bin
from synthfar_ray.report import MISSING, PAPER_COLUMNS, ReportError, build_report, markdown_table

SCHEMA = pa.schema(CORE_FIELDS)


def colour_of(i: int) -> tuple[int, int, int]:
    """A distinct, non-white colour per id, so a grid tile can be traced back to its image."""
    return ((i * 53) % 200 + 20, (i * 97) % 200 + 20, (i * 31) % 200 + 20)


def make_rows(ids, rng, source="synthetic", with_age=True, size=24):
    rows = []
    for i in ids:
        img = np.zeros((size, size + 8, 3), np.uint8) + np.array(colour_of(i), np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        age = float(rng.integers(0, 85))
        rows.append({"id": int(i), "image": encode_jpeg(img), "width": size + 8, "height": size,
                     "age": age if with_age else None, "age_bin": int(age_to_bin(age)),
                     "gender": int(rng.integers(0, 2)), "ethnicity": int(rng.integers(0, 5)),
                     "source": source, "split": "train"})
    return rows


def write_dataset(folder, rows, parts=2):
    """Rows spread over several Parquet files in shuffled id order, plus a manifest to ignore."""
    os.makedirs(folder, exist_ok=True)
    for p in range(parts):
        pq.write_table(pa.Table.from_pylist(rows[p::parts], schema=SCHEMA), os.path.join(folder, f"part-{p}.parquet"))
    with open(os.path.join(folder, "_manifest.json"), "w") as f:
        json.dump({"rows": len(rows)}, f)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    synth_ids = rng.permutation(np.arange(100, 140))  # shuffled: the grid must sort by id
    synth = make_rows(synth_ids, rng)
    real = make_rows(range(25), rng, source="fairface", with_age=False)
    return {
        "synthetic": write_dataset(root / "synthetic", synth),
        "real": write_dataset(root / "real", real, parts=1),
        "synthetic_rows": synth,
        "real_rows": real,
    }


def test_read_labels_counts_and_columns(data):
    df = plots.read_labels(data["synthetic"])
    assert list(df.columns) == ["age", "age_bin", "gender", "ethnicity"]
    assert len(df) == 40
    rows = data["synthetic_rows"]
    assert np.bincount(df["gender"], minlength=2).tolist() == np.bincount([r["gender"] for r in rows], minlength=2).tolist()
    assert np.bincount(df["ethnicity"], minlength=5).tolist() == np.bincount([r["ethnicity"] for r in rows], minlength=5).tolist()
    real = plots.read_labels(data["real"])
    assert len(real) == 25 and real["age"].isna().all() and real["age_bin"].notna().all()
    with pytest.raises(ValueError, match="no column"):
        plots.read_labels(data["real"], columns=("age", "pose_yaw"))


def test_read_labels_from_s3(data, s3_bucket):
    bucket, opts = s3_bucket
    fs, path = storage.resolve(bucket + "/sets/synthetic", opts)
    fs.create_dir(path)
    for name in os.listdir(data["synthetic"]):
        storage.write_bytes(f"{bucket}/sets/synthetic/{name}", open(os.path.join(data["synthetic"], name), "rb").read(), opts)
    df = plots.read_labels(f"{bucket}/sets/synthetic", opts)
    assert len(df) == 40
    assert sorted(df["age"].tolist()) == sorted(r["age"] for r in data["synthetic_rows"])
    # the whole report can read from and write to object storage
    storage.write_bytes(f"{bucket}/run/eval/a/metrics.json",
                        json.dumps({"checkpoint": "c", "datasets": RUNS["mix_0.5"]}).encode(), opts)
    result = build_report(f"{bucket}/run", datasets={"synthetic": f"{bucket}/sets/synthetic"}, storage=opts)
    assert result.markdown_path == f"{bucket}/run/report/report.md"
    md = storage.read_bytes(result.markdown_path, opts).decode()
    assert "| eval/a | **5.02** |" in md
    assert storage.exists(f"{bucket}/run/report/plots/grid_synthetic.png", opts)


def test_sample_grid_size_order_and_tiles(data, tmp_path):
    out = plots.sample_grid(data["synthetic"], str(tmp_path / "g" / "grid.png"), n=6, columns=4, tile=40)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cell_h = 40 + plots.CAPTION_HEIGHT
    assert img.shape == (2 * cell_h, 4 * 40, 3)  # 6 images in rows of 4 -> 2 rows
    first_ids = sorted(r["id"] for r in data["synthetic_rows"])[:6]
    for k, i in enumerate(first_ids):
        y, x = (k // 4) * cell_h, (k % 4) * 40
        centre = img[y + 15:y + 25, x + 15:x + 25].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(colour_of(i))).max() < 12, (k, i, centre)  # the k-th smallest id
        caption = img[y + 40:y + cell_h, x:x + 40]
        assert (caption < 128).any(), "caption text missing"
    assert (img[cell_h + 10:cell_h + 30, 2 * 40 + 5:4 * 40 - 5] == 255).all()  # empty slots stay blank

    no_cap = plots.sample_grid(data["real"], str(tmp_path / "nocap.png"), n=16, columns=5, caption=False, tile=32)
    assert Image.open(no_cap).size == (5 * 32, 4 * 32)  # 16 images -> 4 rows of 5, no caption band


def test_caption_text():
    assert plots.caption_for({"age": 34.4, "age_bin": 4, "gender": 1, "ethnicity": 2}) == "34 / female / asian"
    assert plots.caption_for({"age": None, "age_bin": 8, "gender": 0, "ethnicity": 3}) == f"{AGE_BIN_NAMES[8]} / male / indian"


def test_distribution_plots(data, tmp_path):
    out = plots.distribution_plots({"synthetic": data["synthetic"], "fairface": data["real"]}, str(tmp_path / "d.png"))
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 800
    dists = plots.label_distributions({"s": plots.read_labels(data["synthetic"])})
    expected = np.bincount([r["ethnicity"] for r in data["synthetic_rows"]], minlength=5) / 40
    np.testing.assert_allclose(dists["ethnicity"]["s"].to_numpy(), expected)
    assert list(dists["ethnicity"].index) == list(ETHNICITIES) and list(dists["gender"].index) == list(GENDERS)


def test_markdown_table_escapes():
    md = markdown_table(["a", "b"], [["x|y", "1"]])
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| x\\|y | 1 |"]
    with pytest.raises(ValueError):
        markdown_table(["a"], [["1", "2"]])


# ----------------------------------------------------------------------------- report

RUNS = {
    "real_only": {"utkface:test": {"age_mae": 5.31, "ethnicity_acc": 0.801, "gender_acc": 0.912, "n": 90},
                  "fairface:test": {"age_bin_acc": 0.55, "ethnicity_acc": 0.70, "gender_acc": 0.90, "n": 80}},
    "synth_only": {"utkface:test": {"age_mae": 7.02, "ethnicity_acc": 0.652, "gender_acc": 0.85, "n": 90}},
    "pretrain_finetune": {"utkface:test": {"age_mae": 4.87, "ethnicity_acc": 0.823, "gender_acc": 0.905, "n": 90},
                          "fairface:test": {"age_bin_acc": 0.58, "ethnicity_acc": 0.69, "gender_acc": 0.93, "n": 80}},
    "mix_0.5": {"utkface:test": {"age_mae": 5.02, "ethnicity_acc": 0.815, "gender_acc": 0.93, "n": 90},
                "fairface:test": {"age_bin_acc": 0.57, "ethnicity_acc": 0.72, "gender_acc": 0.91, "n": 80}},
}


def write_run_dir(root, data=None):
    for name, datasets in RUNS.items():
        d = root / "eval" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"checkpoint": f"/ckpt/{name}", "datasets": datasets}))
    # a metrics.json of another kind must not become a row
    (root / "train").mkdir()
    (root / "train" / "metrics.json").write_text(json.dumps({"loss": 0.3}))
    if data:
        (root / "report.yaml").write_text(json.dumps({"title": "Test report",
                                                      "datasets": {"synthetic": data["synthetic"], "fairface": data["real"]}}))
    return str(root)


def parse_md_table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows[0], rows[2:]


def cell_value(cell: str) -> tuple[float | None, str]:
    style = "bold" if cell.startswith("**") else "italic" if cell.startswith("*") else ""
    text = cell.strip("*")
    return (None if text == MISSING else float(text)), style


def test_report_table_matches_metrics(data, tmp_path):
    run_dir = write_run_dir(tmp_path / "run", data)
    result = build_report(run_dir)
    md = open(result.markdown_path, encoding="utf-8").read()
    headers, rows = parse_md_table(md, "run")
    assert headers == ["run"] + [c.header for c in PAPER_COLUMNS]
    assert sorted(r[0] for r in rows) == sorted(f"eval/{n}" for n in RUNS)
    by_run = {r[0].removeprefix("eval/"): r[1:] for r in rows}
    for j, col in enumerate(PAPER_COLUMNS):
        shown = {}
        for name, cells in by_run.items():
            value, style = cell_value(cells[j])
            truth = RUNS[name].get(f"{col.dataset}:test", {}).get(col.metric)
            if truth is None:
                assert cells[j] == MISSING and value is None
                continue
            scale = 100 if col.percent else 1
            assert value == pytest.approx(truth * scale, abs=0.005), (name, col.metric)
            shown[name] = (truth, style)
        # best / second best from the metrics files themselves
        order = sorted(shown, key=lambda n: shown[n][0], reverse=not col.lower_is_better)
        assert shown[order[0]][1] == "bold", (col.header, order)
        assert shown[order[1]][1] == "italic", (col.header, order)
        assert all(shown[n][1] == "" for n in order[2:]), (col.header, order)
    # MAE: lower is better, so pretrain_finetune's 4.87 is bold, mix's 5.02 italic
    assert by_run["pretrain_finetune"][0] == "**4.87**" and by_run["mix_0.5"][0] == "*5.02*"
    assert by_run["synth_only"][3] == MISSING  # no FairFace evaluation
    assert {r[0] for r in result.rows} == {r[0] for r in rows}
    assert result.values["eval/real_only"]["utkface.age_mae"] == 5.31
    # sources listed, the non-evaluation metrics.json skipped
    for name in RUNS:
        assert os.path.join(run_dir, "eval", name, "metrics.json") in md
    assert "train/metrics.json" not in md
    # datasets from report.yaml
    assert "# Test report" in md and "plots/distributions.png" in md and "plots/grid_synthetic.png" in md
    assert os.path.getsize(os.path.join(run_dir, "report", "plots", "distributions.png")) > 1000
    assert data["synthetic"] in md


def test_html_is_self_contained(data, tmp_path):
    run_dir = write_run_dir(tmp_path / "run", data)
    result = build_report(run_dir, out_dir=str(tmp_path / "out"))
    page = open(result.html_path, encoding="utf-8").read()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<link" not in page and "<script" not in page
    srcs = re.findall(r"""<img[^>]*src="([^"]+)""", page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # distributions + 2 grids
    assert "<b>4.87</b>" in page and "<i>5.02</i>" in page


def test_explicit_runs_and_missing_dataset(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"checkpoint": "c", "datasets": RUNS["synth_only"]}))
    (tmp_path / "b.json").write_text(json.dumps({"checkpoint": "d", "datasets": RUNS["real_only"]}))
    result = build_report(str(tmp_path), out_dir=str(tmp_path / "o"),
                          runs={"synthetic": str(tmp_path / "a"), "real": str(tmp_path / "b.json")})
    assert [r[0] for r in result.rows] == ["synthetic", "real"]
    assert result.rows[0][4:] == [MISSING] * 3
    assert result.rows[1][4:] == ["55.00", "70.00", "90.00"]


def test_tune_section_best_first(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    csv = tmp_path / "trials.csv"
    rng = np.random.default_rng(1)
    lines = ["trial_id,mix_ratio,sampler,top_k,lr,val_score,metric"]
    scores = {}
    for k, (sampler, ratio, top_k) in enumerate([(s, r, t) for s in ("random", "cl-sam", "cr-sam")
                                                   for r in (0.25, 0.5) for t in (1, 2, 5)]):
        score = round(float(rng.uniform(0.5, 0.9)), 4)
        scores[f"t{k}"] = score
        lines.append(f"t{k},{ratio},{sampler},{top_k},1e-05,{score},val_score")
    csv.write_text("\n".join(lines) + "\n")
    result = build_report(str(run_dir), tune_csv=str(csv))
    md = open(result.markdown_path, encoding="utf-8").read()
    assert "## Tune results" in md and str(csv) in md
    headers, rows = parse_md_table(md, "rank")
    assert headers == ["rank", "trial_id", "mix_ratio", "sampler", "top_k", "lr", "val_score"]
    best = max(scores, key=scores.get)
    assert rows[0][1] == best and rows[0][-1] == f"**{scores[best]:.4f}**"
    shown = [float(r[-1].strip("*")) for r in rows]
    assert shown == sorted(shown, reverse=True) and len(rows) == 18
    assert os.path.getsize(os.path.join(str(run_dir), "report", "plots", "tune_0.png")) > 1000
    # a lower-is-better metric puts the smallest first
    csv.write_text("trial_id,mix_ratio,sampler,top_k,lr,val_age_mae\na,0.5,random,1,1e-4,6.0\nb,0.5,cl-sam,2,1e-4,4.5\n")
    md = open(build_report(str(run_dir), tune_csv=str(csv), metric="val_age_mae").markdown_path).read()
    assert parse_md_table(md, "rank")[1][0][1] == "b"


def test_cli_report(data, tmp_path, capsys, monkeypatch):
    run_dir = write_run_dir(tmp_path / "run")
    (tmp_path / "run" / "tune_results.csv").write_text(
        "trial_id,mix_ratio,sampler,top_k,lr,val_score\nx,0.25,cl-sam,1,1e-5,0.6\ny,0.75,cl-sam,2,1e-5,0.8\n")
    out = tmp_path / "rep"
    code = cli.main(["report", run_dir, "--out", str(out), "--dataset", f"synthetic={data['synthetic']}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and str(out / "report.html") in printed
    md = (out / "report.md").read_text()
    assert "plots/grid_synthetic.png" in md and "## Tune results" in md
    assert parse_md_table(md, "rank")[1][0][1] == "y"
    # a bad --runs argument is a clean error, not a traceback
    assert cli.main(["report", run_dir, "--runs", "nopath"]) == 2


# ----------------------------------------------------------------------------- evaluation by group

def _by_group_metrics():
    """A metrics.json with per-group results, hand-made: by ethnicity white/black/asian have rows
    (asian only 3: flagged), indian and other none; black's age MAE is null (never ranked)."""
    ethnicity = {"groups": {"white": {"n": 40, "age_mae": 4.0, "ethnicity_acc": 0.9, "gender_acc": 0.95},
                            "black": {"n": 30, "age_mae": None, "ethnicity_acc": 0.6, "gender_acc": 0.85},
                            "asian": {"n": 3, "age_mae": 9.0, "ethnicity_acc": 0.0, "gender_acc": 0.33},
                            "indian": {"n": 20, "age_mae": 6.5, "ethnicity_acc": 0.75, "gender_acc": 0.9}},
                 "absent": ["other"], "few": ["asian"], "min_rows": 5,
                 # what the file says is not what the report shows: it recomputes from the groups
                 "worst": {"ethnicity_acc": {"group": "asian", "value": 0.0}}, "gap": {"ethnicity_acc": 0.9}}
    gender = {"groups": {"male": {"n": 50, "age_mae": 5.0, "ethnicity_acc": 0.8, "gender_acc": 0.92},
                         "female": {"n": 43, "age_mae": 5.5, "ethnicity_acc": 0.7, "gender_acc": 0.88}},
              "absent": [], "few": [], "min_rows": 5}
    confusion = {"gender": {"classes": ["male", "female"], "matrix": [[46, 4], [5, 38]]},
                 "ethnicity": {"classes": list(ETHNICITIES),
                               "matrix": [[36, 2, 1, 1, 0], [8, 18, 2, 2, 0], [1, 1, 0, 1, 0], [3, 1, 1, 15, 0], [0] * 5]}}
    return {"checkpoint": "/ckpt/g", "datasets": RUNS["real_only"],
            "by_group": {"utkface:test": {"ethnicity": ethnicity, "gender": gender}},
            "confusion": {"utkface:test": confusion}}


def test_report_by_group_table_and_confusion_plot(tmp_path):
    root = tmp_path / "run"
    (root / "eval" / "grouped").mkdir(parents=True)
    (root / "eval" / "grouped" / "metrics.json").write_text(json.dumps(_by_group_metrics()))
    (root / "eval" / "old").mkdir()  # a file from before per-group evaluation: a row, no group section
    (root / "eval" / "old" / "metrics.json").write_text(json.dumps({"checkpoint": "c", "datasets": RUNS["mix_0.5"]}))
    result = build_report(str(root))
    md = open(result.markdown_path, encoding="utf-8").read()
    # the paper table is what it was: the per-group extras change no cell
    assert {r[0]: r[1:] for r in result.rows}["eval/grouped"] == ["5.31", "80.10", "91.20", "55.00", "70.00", "90.00"]

    assert "## Evaluation by group" in md and "### eval/grouped: utkface:test" in md
    headers, rows = parse_md_table(md, "metric")
    assert headers == ["metric", "worst ethnicity", "ethnicity gap", "worst gender", "gender gap"]
    table = {r[0]: r[1:] for r in rows}
    assert list(table) == ["age MAE (years) ↓", "ethnicity acc (%)", "gender acc (%)"]  # no age-bin numbers: no row
    # asian (3 rows) is flagged, not ranked; black's null MAE is not ranked; MAE: the highest is worst
    assert table["ethnicity acc (%)"] == ["black 60.00", "30.00", "female 70.00", "10.00"]
    assert table["age MAE (years) ↓"] == ["indian 6.50", "2.50", "female 5.50", "0.50"]
    assert table["gender acc (%)"] == ["black 85.00", "10.00", "female 88.00", "4.00"]
    assert not any(c.startswith("*") for r in rows for c in r)  # nothing bold or italic: not ranked across runs
    assert "No rows (absent, not ranked): ethnicity: other." in md
    assert "Fewer than 5 rows (flagged, not ranked): ethnicity: asian (3)." in md
    assert "No per-group results in the metrics.json of: eval/old" in md
    t = result.groups["eval/grouped"]["utkface:test"]["ethnicity"]
    assert t.worst["ethnicity_acc"] == {"group": "black", "value": 0.6} and t.gap["ethnicity_acc"] == pytest.approx(0.3)
    assert "age_mae" not in t.groups["black"]

    png = [p for p in os.listdir(root / "report" / "plots") if p.startswith("confusion_")]
    assert png == ["confusion_0_eval_grouped_utkface_test.png"]
    img = Image.open(root / "report" / "plots" / png[0])
    assert img.format == "PNG" and img.size[0] > 500
    assert f"plots/{png[0]}" in md
    page = open(result.html_path, encoding="utf-8").read()
    assert len(re.findall(r"<img[^>]*src=\"data:image/png;base64,", page)) == 1


@pytest.mark.parametrize("bad,match", [
    ({"by_group": {"utkface:test": {"gender": {"groups": {"male": {"gender_acc": "high"}}}}}},
     r"by_group\.utkface:test\.gender\.groups\.male\.gender_acc"),
    ({"by_group": {"utkface:test": {"gender": {"groups": []}}}}, r"by_group\.utkface:test\.gender"),
    ({"by_group": {"utkface:test": {"gender": {"groups": {}, "few": "male"}}}}, r"gender\.few"),
    ({"confusion": {"utkface:test": {"gender": {"classes": ["male", "female"], "matrix": [[1, 2]]}}}},
     r"confusion\.utkface:test\.gender"),
    ({"confusion": [1]}, r"confusion must map"),
])
def test_bad_by_group_names_file_and_key(tmp_path, bad, match):
    uri = tmp_path / "metrics.json"
    uri.write_text(json.dumps({"checkpoint": "c", "datasets": RUNS["real_only"], **bad}))
    with pytest.raises(ReportError, match=match) as e:
        build_report(str(tmp_path), runs={"x": str(uri)})
    assert str(uri) in str(e.value)


def test_confusion_plots_and_row_shares(tmp_path):
    shares = plots.row_shares(np.array([[3, 1], [0, 0]]))
    assert shares[0].tolist() == [0.75, 0.25] and shares.mask[1].all() and not shares.mask[0].any()
    out = plots.confusion_plots({"gender": {"classes": ["male", "female"], "matrix": [[3, 1], [0, 0]]}},
                                str(tmp_path / "c" / "conf.png"), title="t")
    assert Image.open(out).format == "PNG"
    with pytest.raises(ValueError):
        plots.confusion_plots({}, str(tmp_path / "none.png"))
