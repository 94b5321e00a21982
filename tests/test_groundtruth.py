"""The science on the ground-truth face domain: `make demo`'s pipeline config, run as shipped.

The demo (configs/pipeline/demo.yaml) runs every stage on procedural faces whose labels are known
(synthfar_ray/faces.py): a synthetic-style set with 20 % label noise, photo-style stand-ins for
UTKFace and FairFace written in their file layouts and ingested, a cl-sam selection and a random
one, the paper's runs at a 25 % real subset, a mixing-ratio x sampler sweep, evaluation on both
test splits and the report. One module-scoped run (the shipped config, from another working
directory) serves every test here; each asserts one effect the project exists to show, with the
tolerance stated. Scores are on held-out photo-style data (ingest's test splits of both layouts).

Training is seeded, and since `train.preserve_order` (default true) Ray Data hands the rows over in
the seeded file order, so a rerun on the same machine trains on the same batches. Before that, block
order followed whichever read finished first and a rerun moved a score (mean of 6 accuracies over
~820 held-out test images) by up to 0.03: each margin below sits under the differences measured in
three demo runs of that time (stated per test), and a fourth run missed effect 3's margin (+0.017
for pretraining), which is what led to fixing the order. The accuracy gap of effect 2 first had a
0.03 margin, which a third run (0.027) missed, so it now also asserts the age-MAE gap, which is
larger and steadier. Another machine (other thread counts) may still draw other numbers.

`SYNTHFAR_DEMO_RUN_DIR=runs/demo pytest tests/test_groundtruth.py` checks an existing demo run
instead of running the pipeline (the edit-test loop; CI always runs it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# The demo takes 10-13 minutes on 2 cores alone, 25-47 beside the other xdist worker; the fixture runs
# inside the first test's timeout. The timeout only guards against a hang: CI's run of 2026-12-07
# had every stage done after 44 minutes and was cut off in the last one (evaluate) at 45.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(4200)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ("utkface:test", "fairface:test")


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """The shipped demo pipeline, run from a directory that is not the repo root."""
    from synthfar_ray.cli import main

    if os.environ.get("SYNTHFAR_DEMO_RUN_DIR"):
        return Path(os.environ["SYNTHFAR_DEMO_RUN_DIR"]).resolve()
    cwd = tmp_path_factory.mktemp("demo_cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["pipeline", os.path.join(ROOT, "configs", "pipeline", "demo.yaml")]) == 0
    finally:
        os.chdir(old)
    return cwd / "runs" / "demo"


def metrics(run_dir, run: str) -> dict[str, dict[str, float]]:
    return json.loads((run_dir / "eval" / run / "metrics.json").read_text())["datasets"]


def score(run_dir, run: str) -> float:
    """Mean of gender, ethnicity and age-bin accuracy over both photo-style test splits."""
    m = metrics(run_dir, run)
    return float(np.mean([m[t][k] for t in TESTS for k in ("gender_acc", "ethnicity_acc", "age_bin_acc")]))


def balanced_accuracy(matrix: list[list[int]]) -> float:
    """Mean recall over the classes present (rows: true class): chance is 1 / classes, whatever the
    split's class balance (the stand-in splits are drawn at random, so they are not exactly balanced)."""
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(axis=1)
    return float(np.mean(np.diag(m)[rows > 0] / rows[rows > 0]))


def test_each_head_learns_on_photo_data(demo):
    """Effect 1: real-only training is well above chance on held-out photo data, for every head:
    balanced ethnicity accuracy >= chance (0.2) + 0.25, balanced gender accuracy >= chance (0.5) +
    0.05 (the weakest head: photo-style gender cues at 64 px reach about 0.60-0.65 with the tiny
    net), age MAE <= the MAE of predicting the training median - 3 years (UTKFace: exact ages)."""
    import pyarrow.dataset as pads

    data = json.loads((demo / "eval" / "real_only" / "metrics.json").read_text())
    for test in TESTS:
        confusion = data["confusion"][test]
        assert balanced_accuracy(confusion["gender"]["matrix"]) >= 0.5 + 0.05, (test, confusion["gender"])
        assert balanced_accuracy(confusion["ethnicity"]["matrix"]) >= 0.2 + 0.25, (test, confusion["ethnicity"])
    rows = pads.dataset(str(demo / "real_utkface"), format="parquet").to_table(columns=["split", "age"]).to_pandas()
    median = rows.loc[rows["split"] == "train", "age"].median()
    baseline = float((rows.loc[rows["split"] == "test", "age"] - median).abs().mean())
    assert data["datasets"]["utkface:test"]["age_mae"] <= baseline - 3.0, (data["datasets"]["utkface:test"], baseline)


def test_domain_gap(demo):
    """Effect 2: synthetic-only (synthetic style, 20 % label noise) scores lower on photo data than
    real-only trained on the same number of images: UTKFace age MAE higher by >= 2 years (measured
    3.4 / 3.7 / 4.4 in three demo runs) and the mean accuracy lower by >= 0.01 (measured 0.027 /
    0.050 / 0.060: the synthetic-only accuracy varies most between reruns)."""
    gen = json.loads((demo / "synthetic" / "_manifest.json").read_text())
    real = json.loads((demo / "real_utkface" / "_manifest.json").read_text())
    assert abs(gen["images_present"] * 0.9 - real["counts"]["train"]) / real["counts"]["train"] < 0.1
    synthetic, real_only = metrics(demo, "synthetic_only"), metrics(demo, "real_only")
    assert synthetic["utkface:test"]["age_mae"] >= real_only["utkface:test"]["age_mae"] + 2.0
    assert score(demo, "synthetic_only") <= score(demo, "real_only") - 0.01


def test_synthetic_data_pays_when_real_data_is_scarce(demo):
    """Effect 3 (the paper's claim): with only the 25 % real subset, pretraining on every synthetic
    row then finetuning beats real-only on that subset, and so does mixing the cl-sam selection into
    every batch; each by >= 0.02 (measured: pretraining +0.038 / +0.052 / +0.056, mixing +0.042 /
    +0.047 / +0.054 in three demo runs)."""
    base = score(demo, "real_25")
    assert score(demo, "synthetic_to_real_25") >= base + 0.02, (score(demo, "synthetic_to_real_25"), base)
    assert score(demo, "mix_25") >= base + 0.02, (score(demo, "mix_25"), base)


def test_selection_selects(demo):
    """Effect 4: cl-sam's chosen rows, and the RL sampler's, have clearly higher label precision (share
    whose picture shows all three labels) than a random pick of the same K (>= +0.05 and >= +0.03),
    and a model trained on them is better at the attributes whose labels the selection cleaned.

    Which attributes those are is read from the precision measurement itself, before any model is
    scored: every attribute whose precision the method raised by >= 0.05 over random. In every demo
    run so far that is ethnicity alone (cl-sam 0.916, rl 0.899 vs 0.807); gender and age bin gain
    about a point, so their downstream differences are pure training noise (one run: gender -9
    points, ethnicity +8). Earlier versions of this test averaged all six accuracies and the Tune
    trials' val score, which diluted the effect with that noise: +0.004 / +0.005 / +0.024 / -0.0002
    over four runs, a coin flip in CI. The model effect is asserted on balanced accuracy (chance =
    1 / classes, whatever a split's class balance), averaged over both photo-style test splits:
    method > random. Measured for rl (8 episodes x 4 children; its policy weighs p(stated ethnicity)
    most): all three labels 0.548 vs 0.507, balanced ethnicity accuracy 0.558 vs 0.517 (cl-sam 0.591).
    That +0.04 did not last: 8 episodes gave 0.527 (+0.020, CI at 85437ee and here), likely because
    cl-sam's scorer, whose columns are the RL's features, trains slightly differently now (its own
    precision 0.583 -> 0.592; not verified). Over sampler seeds 0-3 on that demo's pool, 8 episodes
    beat their random picks by +0.020/+0.030/+0.065/+0.086, 16 by +0.039..+0.091, 24 by
    +0.049/+0.061/+0.091/+0.097: Adam moves every weight ~0.1 per episode, so in 8 episodes the
    noise weights grow as large as p_ethnicity's. The demo runs 24."""
    sel = json.loads((demo / "selection_precision.json").read_text())
    assert sel["method"] == "cl-sam" and set(sel["others"]) == {"rl", "quality"}
    random = sel["random_precision"]["chosen"]
    assert abs(random["all"] - sel["precision"]["pool"]["all"]) < 0.05  # random is the pool's precision, give or take

    def balanced(run: str, attribute: str) -> float:
        confusion = json.loads((demo / "eval" / run / "metrics.json").read_text())["confusion"]
        return float(np.mean([balanced_accuracy(confusion[t][attribute]["matrix"]) for t in TESTS]))

    for method, run, margin in (("cl-sam", "cl_sam_selected", 0.05), ("rl", "rl_selected", 0.03),
                                ("quality", "quality_selected", 0.03)):
        chosen = (sel["precision"] if method == "cl-sam" else sel["others"][method])["chosen"]
        assert chosen["all"] >= random["all"] + margin, (method, sel)
        cleaned = [a for a in ("ethnicity", "gender", "age_bin") if chosen[a] >= random[a] + 0.05]
        assert cleaned, (method, sel)
        gains = {a: balanced(run, a) - balanced("random_selected", a) for a in cleaned}
        assert all(g > 0 for g in gains.values()), (method, gains, sel)


def test_test_time_label_maps_improve_frozen_models_on_the_fairface_layout(demo, tmp_path):
    """`synthfar evaluate --adapt-on fairface:train`: maps fitted on the FairFace stand-in's train
    labels, with the nets frozen, raise the mean of the three FairFace-test accuracies of a
    synthetic-only and of a scarce-real model. Measured (demo at 608374e): synthetic_only age bin /
    ethnicity / gender 20.2 / 54.0 / 58.3 % -> 21.5 / 56.7 / 61.0 % (mean +2.3 points), real_25
    18.8 / 45.8 / 53.4 % -> 30.0 / 51.0 / 60.0 % (+7.6); asserted: +1 point each. The same maps on
    the UTKFace stand-in's test split moved gender by -5.3 / -10.4 points: they are for the split
    they were fitted on (README)."""
    from synthfar_ray.cli import main

    keys = ("age_bin_acc", "ethnicity_acc", "gender_acc")
    for run in ("synthetic_only", "real_25"):
        out = tmp_path / run
        assert main(["evaluate", str(demo / "train" / run), "--on", "fairface:test", "--data",
                     f"fairface={demo / 'real_fairface'}", "--adapt-on", "fairface:train", "--out", str(out)]) == 0
        report = json.loads((out / "metrics.json").read_text())
        before = np.mean([report["datasets"]["fairface:test"][k] for k in keys])
        after = np.mean([report["adapted"]["datasets"]["fairface:test"][k] for k in keys])
        assert report["adapted"]["rows"]["ethnicity"] == 2000 and "label maps" in (out / "metrics.md").read_text()
        assert after >= before + 0.01, (run, report["datasets"], report["adapted"])


def test_label_transfer_to_fairfaces_7_races_beats_the_fold_plus_chance(demo, tmp_path):
    """Label transfer 5 -> 7 at test time: the demo's synthetic-only net (5 classes, never shown a
    7-race face) is scored on a FairFace stand-in rendered with `races7` (3000 photo-style faces,
    seed 7, every one in the FairFace layout: 384 test rows). `--adapt-on fairface:train` fits a
    softmax map from the frozen net's 5 ethnicity logits to the 7 races on 2000 train rows; its
    7-race test accuracy must beat the fixed 7->5 fold inverted by chance guessing, both on the
    net's own 5-class predictions and on the affine-adapted ones, by >= 0.03.
    Measured (demo run of /work/main at d1cfb31; of seven runs six passed, the four checked with
    these numbers; the first failed and its output was lost, cause unknown): fold + chance 0.409 (raw) / 0.409 (adapted), transfer 0.456 (L2 1e-3, picked on a
    held-out fifth of the adapt rows). 33-174 s on 2 shared cores (generate 3000 faces, ingest,
    one evaluation)."""
    import pyarrow.dataset as pads

    from synthfar_ray.cli import main
    from synthfar_ray.generate import GenerateConfig, run_generate
    from synthfar_ray.ingest import ingest_fairface
    from synthfar_ray.labels import FAIRFACE_RACES7
    from synthfar_ray.standin import write_layouts
    from synthfar_ray.storage import StorageOptions

    cfg = GenerateConfig(output=str(tmp_path / "rendered"), generator="procedural", num_images=3000, seed=7,
                         val_fraction=0.0, shard_size=500, render={"size": 64, "style": "photo", "races7": True},
                         compute={"num_actors": 1, "cpus_per_actor": 1})
    run_generate(cfg)
    write_layouts(cfg.output, {"fairface": str(tmp_path / "files")}, StorageOptions())
    ingest_fairface(str(tmp_path / "files"), str(tmp_path / "fairface7"), seed=42)
    # The stand-in carries the race each face shows, and all 7 of them.
    rendered = pads.dataset(cfg.output, format="parquet").to_table(columns=["id", "render_race7"]).to_pandas()
    rows = pads.dataset(str(tmp_path / "fairface7"), format="parquet").to_table(columns=["file", "ethnicity7"]).to_pandas()
    truth = rendered.set_index("id").loc[[int(f.split("/")[1][:-4]) for f in rows["file"]], "render_race7"]
    assert truth.tolist() == rows["ethnicity7"].tolist() and set(rows["ethnicity7"]) == set(range(len(FAIRFACE_RACES7)))

    out = tmp_path / "eval"
    assert main(["evaluate", str(demo / "train" / "synthetic_only"), "--on", "fairface:test", "--data",
                 f"fairface={tmp_path / 'fairface7'}", "--adapt-on", "fairface:train", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    raw, adapted = report["datasets"]["fairface:test"], report["adapted"]["datasets"]["fairface:test"]
    assert report["adapted"]["rows"]["race7"] == 2000 and report["adapted"]["race7_transfer"]["inputs"] == ["logits"]
    assert "7-race acc (transfer)" in (out / "metrics.md").read_text()
    assert adapted["race7_acc"] >= raw["race7_fold_acc"] + 0.03, (raw, adapted)
    assert adapted["race7_acc"] >= adapted["race7_fold_acc"] + 0.03, (raw, adapted)


def test_tune_ranks_like_separately_trained_runs(demo):
    """Effect 5: the mixing-ratio x sampler sweep (shorter budget) ranks the configurations it shares
    with the pipeline's runs in the same order: Spearman >= 0.5 over the pairs (3 here)."""
    agreement = json.loads((demo / "tune_agreement.json").read_text())
    trials = pd.read_csv(demo / "tune" / "tune_results.csv")
    assert set(trials["status"]) == {"TERMINATED"}, trials[["trial_id", "status", "error"]]
    assert {p["run"] for p in agreement["pairs"]} == {"mix_25", "cl_sam_selected", "random_selected"}
    assert agreement["spearman"] is not None and agreement["spearman"] >= 0.5, agreement


def test_report_shows_faces_labels_gap_and_precision(demo):
    """The report a newcomer reads: the paper's table for every run, the selection precision of
    cl-sam and random, the rank agreement, grids of every dataset (the stand-ins named as such, the
    diffusion preview as machinery), and the reminder that these are not faces."""
    report = (demo / "report" / "report.md").read_text()
    for run in ("synthetic_only", "real_only", "real_25", "synthetic_to_real_25", "mix_25", "rl_selected",
                "quality_selected"):
        assert run in report, run
    assert "label precision" in report.lower() and "| rl (K=" in report
    assert "procedural stand-in" in report and "random-weight diffusion" in report
    assert "Spearman" in report


def test_adaptation_table_lists_every_run_and_aux_bn_keeps_the_real_statistics(demo, tmp_path):
    """The report's "Domain adaptation" table (the demo has one adapting run, `aux_bn`): every run on
    both photo-style test splits and on synthetic-style val, no number missing. aux_bn's checkpoint
    keeps the BatchNorm statistics (and scale/shift) of the real rows: the table's synthetic:val
    number is that checkpoint's, and the same weights with the synthetic halves swapped in (kept in
    train_state.pt) score higher on synthetic-style val, ethnicity accuracy by >= 0.05. Measured
    paired gaps: +0.071 in the demo (0.540 -> 0.612), +0.103 / +0.098 / +0.138 for training seeds
    1 / 2 / 3. This was first asserted against synthetic-only's number, another net trained on its own:
    that gap was 0.045-0.112 over five runs (CI's of 2026-12-08 missed a 0.05 margin). On 224 val rows
    two independent nets differ by ~0.045 by chance, so only the paired comparison isolates the
    statistics. On the demo's default photo style aux_bn gains nothing (0.533 / 0.540 vs 0.591 / 0.561):
    that style is per-image nuisance, not a shift (README, "Domain adaptation on the ground-truth
    domain"), so no photo-side effect is asserted here; tests/test_adapt.py asserts it on a systematic
    shift."""
    import shutil

    import torch
    import yaml

    from synthfar_ray.adapt import SYNTHETIC_BN
    from synthfar_ray.checkpoints import META_FILE, MODEL_FILE, STATE_FILE
    from synthfar_ray.evaluate import EvaluateConfig, run_evaluations

    runs = list(yaml.safe_load(open(os.path.join(ROOT, "configs", "pipeline", "demo.yaml")))["runs"])
    table = json.loads((demo / "adaptation.json").read_text())
    assert set(TESTS) | {"synthetic:val"} <= set(table["splits"])
    rows = {r["run"]: r for r in table["rows"]}
    assert sorted(rows) == sorted(runs)
    for row in rows.values():
        for split in table["splits"]:
            assert all(v is not None for v in row["datasets"][split].values()), (row["run"], split)
    assert rows["aux_bn"]["training"] == "synthetic + aux_bn"
    report = (demo / "report" / "report.md").read_text()
    assert "## Domain adaptation" in report and "| aux_bn | synthetic + aux_bn |" in report

    checkpoint = Path(json.loads((demo / "train" / "aux_bn" / "result.json").read_text())["checkpoint"])
    plain = torch.load(checkpoint / MODEL_FILE, weights_only=True)
    synthetic_bn = torch.load(checkpoint / STATE_FILE, weights_only=False)["adapt"]["synthetic_bn"]
    swapped = {**plain, **{k.replace(f".{SYNTHETIC_BN}.", "."): v for k, v in synthetic_bn.items()}}
    assert synthetic_bn and swapped.keys() == plain.keys()  # every synthetic half replaces a plain key
    (tmp_path / "swapped").mkdir()
    torch.save(swapped, tmp_path / "swapped" / MODEL_FILE)
    shutil.copy(checkpoint / META_FILE, tmp_path / "swapped")
    cfgs = [EvaluateConfig(checkpoint=str(c), on=["synthetic:val"], data={"synthetic": str(demo / "synthetic")},
                           out=str(tmp_path / f"eval_{i}")) for i, c in enumerate((checkpoint, tmp_path / "swapped"))]
    real_half, synthetic_half = (r["datasets"]["synthetic:val"]["ethnicity_acc"] for r in run_evaluations(cfgs))
    assert real_half == rows["aux_bn"]["datasets"]["synthetic:val"]["ethnicity_acc"]
    assert synthetic_half >= real_half + 0.05, (real_half, synthetic_half)


def test_quality_stage_reads_the_noise_and_the_report_shows_it(demo):
    """The demo's quality stage (cl-sam's classifier, trained on the 25 % real subset): p(stated
    ethnicity) separates rows whose picture shows their ethnicity from the noisy ones (AUC 0.83 in
    the run measured; asserted > 0.7), the 20 % noise shows in the share of true labels, no two
    different faces are called duplicates (the hash alone called 21), and the report has the
    section with its worst/best grids."""
    info = json.loads((demo / "quality.json").read_text())
    summary = json.loads((Path(info["folder"]) / "summary.json").read_text())
    assert summary["rows"] == 2340 and summary["undecodable"] == 0
    ethnicity = summary["label_agreement"]["ethnicity"]
    assert ethnicity["auc_vs_truth"] > 0.7, summary
    assert 0.75 < ethnicity["stated_is_true"] < 0.9, summary  # 20 % noise, some redraws land on the label
    assert summary["near_duplicate_rate"] < 0.002, summary
    report = (demo / "report" / "report.md").read_text()
    assert "## Synthetic data quality" in report and "not FID" in report
    assert (demo / "report" / "plots" / "quality_worst.png").exists()
    assert (demo / "report" / "plots" / "quality_best.png").exists()


def test_readme_demo_sweep_runs_on_the_demo_outputs(demo):
    """The README's stand-alone demo sweep (configs/tune/demo.yaml) runs on the demo's outputs, from
    the same working directory (sizes overridden smaller): every trial finishes with a score."""
    from synthfar_ray.cli import main

    old = os.getcwd()
    os.chdir(demo.parent.parent)
    # The config's paths are relative to the repo's runs/demo; a reused demo elsewhere gets them set.
    paths = [] if demo.parts[-2:] == ("runs", "demo") else [
        f"train.synthetic={demo}/synthetic", f"train.real={demo}/real_utkface", f"storage_path={demo}/tune"]
    try:
        assert main(["tune", os.path.join(ROOT, "configs", "tune", "demo.yaml"), "num_samples=2", "train.steps=4",
                     "train.val_every=2", "train.log_every=2", "sampling.scorer_train.steps=5",
                     "sampling.scorer_train.cross_fit_folds=2", *paths]) == 0
    finally:
        os.chdir(old)
    sweep = pd.read_csv(demo / "tune" / "demo-sweep" / "tune_results.csv")
    assert len(sweep) == 2 and set(sweep["status"]) == {"TERMINATED"} and sweep["val_score"].notna().all()


def test_standins_are_the_rendered_photo_set_in_both_layouts(demo):
    """The stand-ins: every rendered image lands in exactly one layout (even ids UTKFace, odd ids
    FairFace), each folder says it holds no real faces, and the ingested labels are the renderer's
    truth (FairFace's label strings mapped back to the 5 classes)."""
    import pyarrow.dataset as pads

    rendered = pads.dataset(str(demo / "standin_parquet"), format="parquet").to_table(
        columns=["id", "render_gender", "render_ethnicity"]).to_pandas().set_index("id")
    ids = []
    for layout in ("utkface", "fairface"):
        assert "NOT REAL FACES" in (demo / "standin" / layout / "README.txt").read_text()
        rows = pads.dataset(str(demo / f"real_{layout}"), format="parquet").to_table(
            columns=["file", "gender", "ethnicity"]).to_pandas()
        # UTKFace names end in the stamp 2026<id:013d>; FairFace files are <split>/<id>.jpg.
        rows["rid"] = [int(f.split("_")[3][4:17]) if layout == "utkface" else int(f.split("/")[1][:-4])
                       for f in rows["file"]]
        truth = rendered.loc[rows["rid"]]
        assert truth["render_gender"].tolist() == rows["gender"].tolist()
        assert truth["render_ethnicity"].tolist() == rows["ethnicity"].tolist()
        assert set(rows["rid"] % 2) == {0 if layout == "utkface" else 1}
        ids += rows["rid"].tolist()
    assert sorted(ids) == sorted(rendered.index.tolist())
