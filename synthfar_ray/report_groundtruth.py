"""Report sections that only a run on the ground-truth face domain has (see faces.py, pipeline.py):

- the label precision of the sample stage's selection vs a random pick of the same K
  (`run_dir/selection_precision.json`, written by the pipeline when the synthetic set carries the
  procedural generator's render_* truth);
- the agreement between the Tune sweep's ranking and the separately trained runs
  (`run_dir/tune_agreement.json`: pairs and their Spearman correlation);
- domain adaptation (`run_dir/adaptation.json`, written when a run adapts): every run's accuracies
  on each evaluated split, synthetic style and photo style side by side (Synthesis AI's table).

Each section is absent when its file is; a missing number is shown as "n/a", never ranked.
"""

from __future__ import annotations

import json
import math
from typing import Any

from synthfar_ray import storage
from synthfar_ray.storage import StorageOptions

SELECTION_PRECISION = "selection_precision.json"
TUNE_AGREEMENT = "tune_agreement.json"
ADAPTATION = "adaptation.json"
ADAPTATION_METRICS = ("ethnicity_acc", "gender_acc", "age_bin_acc")
PRECISION_FIELDS = ("all", "age_bin", "gender", "ethnicity")


def _read(run_dir: str, name: str, opts: StorageOptions | None) -> dict[str, Any] | None:
    uri = storage.join(run_dir, name)
    if not storage.exists(uri, opts):
        return None
    return json.loads(storage.read_bytes(uri, opts))


def _num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def precision_rows(sel: dict[str, Any]) -> list[list[str]]:
    """Rows: the sample stage method's chosen rows, the other methods' picks of the same K, a random
    pick, every scored row."""
    chosen = sel.get("precision", {}).get("chosen", {})
    random = (sel.get("random_precision") or {}).get("chosen", {})
    pool = sel.get("precision", {}).get("pool", {})
    others = [(f"{m} (K={sel.get('k')})", (p or {}).get("chosen", {})) for m, p in (sel.get("others") or {}).items()]
    return [[label, *(_num(p.get(f)) for f in PRECISION_FIELDS)]
            for label, p in ((f"{sel.get('method')} (K={sel.get('k')})", chosen), *others,
                             (f"random (K={sel.get('k')})", random), ("all scored rows", pool))]


def groundtruth_blocks(run_dir: str, opts: StorageOptions | None = None) -> list:
    from synthfar_ray.report import Block, Cell

    blocks: list = []
    sel = _read(run_dir, SELECTION_PRECISION, opts)
    if sel is not None:
        blocks += [
            Block("heading", "Selection: label precision"),
            Block("text", "Share of synthetic rows whose picture shows what their labels say (the procedural "
                          "generator's render_* ground truth; age compared by age bin). A selection method "
                          "earns its keep by beating a random pick of the same K."),
            Block("table", headers=["rows", "all three labels", "age bin", "gender", "ethnicity"],
                  rows=[[Cell(c) for c in row] for row in precision_rows(sel)]),
        ]
    agreement = _read(run_dir, TUNE_AGREEMENT, opts)
    if agreement is not None:
        rho = agreement.get("spearman")
        blocks += [
            Block("heading", "Tune vs separately trained runs"),
            Block("text", f"Spearman rank correlation of the sweep's {agreement.get('metric')} and the same "
                          f"configuration trained as a pipeline run: {_num(rho, 2)} over "
                          f"{len(agreement.get('pairs', []))} pairs."),
            Block("table", headers=["mix ratio", "sampler", "trial", "trial score", "run", "run score"],
                  rows=[[Cell(_num(p["mix_ratio"], 2)), Cell(str(p["sampler"])), Cell(str(p["trial"])),
                         Cell(_num(p["trial_score"])), Cell(str(p["run"])), Cell(_num(p["run_score"]))]
                        for p in agreement.get("pairs", [])]),
        ]
    adaptation = _read(run_dir, ADAPTATION, opts)
    if adaptation is not None:
        splits = list(adaptation.get("splits") or [])
        blocks += [
            Block("heading", "Domain adaptation"),
            Block("text", "Accuracy (ethnicity / gender / age bin) of each run on each evaluated split; "
                          "synthetic-style and photo-style test data side by side. Adaptation methods train on "
                          "synthetic labels and see the real train rows without their labels."),
            Block("table", headers=["run", "training", *splits],
                  rows=[[Cell(str(r.get("run"))), Cell(str(r.get("training"))),
                         *(Cell(" / ".join(_num((r.get("datasets") or {}).get(sp, {}).get(k))
                                           for k in ADAPTATION_METRICS)) for sp in splits)]
                        for r in adaptation.get("rows", [])]),
        ]
    return blocks
