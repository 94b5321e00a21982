"""`synthfar report RUN_DIR`: the paper's results table, label distributions, sample grids and Tune
results, as report.md plus a self-contained report.html (images embedded, no external files).

Every number shown is read from a file the report names under its table: evaluation
`metrics.json` files, dataset Parquet folders, a Tune `tune_results.csv`.

Inputs found in RUN_DIR (all optional, overridable from the command line):
- `**/metrics.json` from `synthfar evaluate`, one table row each (run = folder relative to RUN_DIR),
  and, where the file has them, a per-group table (worst group and gap per metric, by ethnicity,
  gender and age bin) and a confusion-matrix figure per run and dataset;
- `report.yaml`: `{title: ..., datasets: {name: uri}}` for the distribution plots and grids;
- `**/tune_results.csv`: one row per trial (trial_id, mix_ratio, sampler, top_k, lr, metric column).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import yaml

from synthfar_ray.errors import UserError
from synthfar_ray import storage as st
from synthfar_ray.config import ConfigError, StrictModel, validate
from synthfar_ray.metrics import rank_groups
from synthfar_ray.report_groundtruth import groundtruth_blocks
from synthfar_ray.storage import StorageOptions

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


class ReportError(UserError, ValueError):
    """An input of the report that cannot be used (names the file or argument)."""


METRICS_FILE = "metrics.json"
TUNE_FILE = "tune_results.csv"
SPEC_FILE = "report.yaml"
MISSING = "–"  # en dash: a run not evaluated on that dataset


@dataclass(frozen=True)
class Column:
    dataset: str  # key prefix in metrics.json "datasets" ("utkface" matches "utkface:test" or "utkface")
    metric: str
    header: str
    lower_is_better: bool = False
    percent: bool = True  # accuracies are shown in %, MAE in years

    def format(self, value: float) -> str:
        return f"{value * 100:.2f}" if self.percent else f"{value:.2f}"


# The paper's table, in its column order.
PAPER_COLUMNS: tuple[Column, ...] = (
    Column("utkface", "age_mae", "UTKFace age MAE ↓", lower_is_better=True, percent=False),
    Column("utkface", "ethnicity_acc", "UTKFace ethnicity acc (%)"),
    Column("utkface", "gender_acc", "UTKFace gender acc (%)"),
    Column("fairface", "age_bin_acc", "FairFace age-bin acc (%)"),
    Column("fairface", "ethnicity_acc", "FairFace ethnicity acc (%)"),
    Column("fairface", "gender_acc", "FairFace gender acc (%)"),
)
TUNE_COLUMNS: tuple[str, ...] = ("trial_id", "mix_ratio", "sampler", "top_k", "lr")


class ReportSpec(StrictModel):
    """RUN_DIR/report.yaml."""

    title: str | None = None
    datasets: dict[str, str] = {}


@dataclass
class ReportResult:
    markdown_path: str
    html_path: str
    headers: list[str]  # the paper table: "run" then PAPER_COLUMNS headers
    rows: list[list[str]]  # its cells as shown, without bold/italic marks ("–" where missing)
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)  # run -> "utkface.age_mae" -> value
    sources: list[str] = field(default_factory=list)  # every file the report read
    groups: dict[str, dict[str, dict[str, GroupTable]]] = field(default_factory=dict)  # run -> dataset -> grouping


# ----------------------------------------------------------------------------- document model
# The report is built once as a list of blocks and rendered twice (markdown, HTML), so both
# always show the same numbers.

@dataclass
class Cell:
    text: str
    style: str = ""  # "", "bold" or "italic"


@dataclass
class Block:
    kind: str  # heading | text | table | image | sources
    text: str = ""
    level: int = 2
    headers: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    image: bytes = b""
    image_name: str = ""


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table; `|` and newlines inside cells are escaped."""
    def esc(cell: Any) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row has {len(row)} cells, headers {len(headers)}: {row}")
        lines.append("| " + " | ".join(esc(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(cell: Cell) -> str:
    if cell.style == "bold":
        return f"**{cell.text}**"
    if cell.style == "italic":
        return f"*{cell.text}*"
    return cell.text


def render_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}\n"]
    for b in blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.text}\n")
        elif b.kind == "text":
            out.append(b.text + "\n")
        elif b.kind == "table":
            out.append(markdown_table(b.headers, [[_md_cell(c) for c in row] for row in b.rows]))
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.image_name})\n")
        elif b.kind == "sources":
            out.append("Sources:\n\n" + "".join(f"- `{s}`\n" for s in b.text.split("\n")))
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.sources{font-size:.85em;color:#555}code{background:#f6f6f6;padding:0 3px}"""


def render_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif b.kind == "text":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr></thead><tbody>")
            for row in b.rows:
                tds = []
                for c in row:
                    text = e(c.text)
                    text = f"<b>{text}</b>" if c.style == "bold" else f"<i>{text}</i>" if c.style == "italic" else text
                    tds.append(f"<td>{text}</td>")
                out.append("<tr>" + "".join(tds) + "</tr>")
            out.append("</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(b.image).decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}"><figcaption>{e(b.text)}</figcaption></figure>')
        elif b.kind == "sources":
            out.append('<div class="sources">Sources:<ul>' + "".join(f"<li><code>{e(s)}</code></li>" for s in b.text.split("\n")) + "</ul></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- inputs

def _walk(run_dir: str, opts: StorageOptions | None, names: tuple[str, ...]) -> dict[str, list[str]]:
    """URIs of files under run_dir (recursively) whose base name is in `names`, sorted."""
    fs, path = st.resolve(run_dir, opts)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found: dict[str, list[str]] = {n: [] for n in names}
    for info in infos:
        base = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and base in found:
            rel = posixpath.relpath(info.path, path)
            found[base].append(st.join(run_dir, rel))
    return {n: sorted(v) for n, v in found.items()}


def _run_name(run_dir: str, metrics_uri: str) -> str:
    parent = posixpath.dirname(metrics_uri.replace(os.sep, "/"))
    root = run_dir.replace(os.sep, "/").rstrip("/")
    rel = posixpath.relpath(parent, root) if parent.startswith(root) else posixpath.basename(parent)
    return posixpath.basename(root) if rel in (".", "") else rel


def load_metrics(uri: str, opts: StorageOptions | None = None) -> dict[str, dict[str, float | None]]:
    """An evaluation metrics.json -> {dataset key: {metric: value}}; errors name the file and key."""
    try:
        data = json.loads(st.read_bytes(uri, opts))
    except json.JSONDecodeError as e:
        raise ReportError(f"{uri} is not valid JSON: {e}") from e
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, dict):
        raise ReportError(f"{uri} has no \"datasets\" mapping (not an evaluation metrics.json)")
    out: dict[str, dict[str, float | None]] = {}
    for key, metrics in datasets.items():
        if not isinstance(metrics, dict):
            raise ReportError(f"{uri}: datasets.{key} must be a mapping of metric -> number")
        clean: dict[str, float | None] = {}
        for name, value in metrics.items():
            if value is not None and not isinstance(value, (int, float)):
                continue  # non-numeric extras (per-class lists ...) are not table material
            clean[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        out[key] = clean
    return out


def _lookup(metrics: dict[str, dict[str, float | None]], col: Column) -> float | None:
    for key in (f"{col.dataset}:test", col.dataset):
        if key in metrics:
            return metrics[key].get(col.metric)
    return None


def _rank_styles(values: list[float | None], lower_is_better: bool) -> list[str]:
    """bold for the best shown value (ties share it), italic for the next distinct one."""
    distinct = sorted({v for v in values if v is not None}, reverse=not lower_is_better)
    styles = []
    for v in values:
        if v is None:
            styles.append("")
        elif v == distinct[0]:
            styles.append("bold")
        elif len(distinct) > 1 and v == distinct[1]:
            styles.append("italic")
        else:
            styles.append("")
    return styles


def paper_table(runs: dict[str, dict[str, dict[str, float | None]]]) -> tuple[list[str], list[list[Cell]], dict]:
    headers = ["run"] + [c.header for c in PAPER_COLUMNS]
    names = list(runs)
    values = {n: {f"{c.dataset}.{c.metric}": _lookup(runs[n], c) for c in PAPER_COLUMNS} for n in names}
    grid: list[list[Cell]] = [[Cell(n)] for n in names]
    for col in PAPER_COLUMNS:
        key = f"{col.dataset}.{col.metric}"
        shown = [col.format(values[n][key]) if values[n][key] is not None else None for n in names]
        # rank on the shown (rounded) numbers so equal-looking cells get the same mark
        styles = _rank_styles([float(s) if s is not None else None for s in shown], col.lower_is_better)
        for row, text, style in zip(grid, shown, styles):
            row.append(Cell(text if text is not None else MISSING, style))
    return headers, grid, values


# ----------------------------------------------------------------------------- evaluation by group

# metrics.json grouping key -> its name in the report, in the order shown.
GROUP_TITLES: tuple[tuple[str, str], ...] = (("ethnicity", "ethnicity"), ("gender", "gender"), ("age_bin", "age bin"))
# The per-group table's rows: the paper's metrics, shown like its columns (MAE in years, accuracies in %).
GROUP_COLUMNS: tuple[Column, ...] = (
    Column("", "age_mae", "age MAE (years) ↓", lower_is_better=True, percent=False),
    Column("", "age_bin_acc", "age-bin acc (%)"),
    Column("", "ethnicity_acc", "ethnicity acc (%)"),
    Column("", "gender_acc", "gender acc (%)"),
)


@dataclass
class GroupTable:
    """One dataset's results by one grouping, as read from metrics.json; worst/gap recomputed from
    the groups' numbers with metrics.rank_groups (a missing value is never ranked)."""

    groups: dict[str, dict[str, float]]  # group -> metric -> value (missing values dropped)
    absent: list[str]
    few: list[str]
    min_rows: int | None
    worst: dict[str, dict]
    gap: dict[str, float]


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReportError(f"{where} must be a list of group names")
    return value


def _group_table(summary: Any, where: str) -> GroupTable:
    if not isinstance(summary, dict) or not isinstance(summary.get("groups"), dict):
        raise ReportError(f"{where} must be a mapping with a \"groups\" mapping (group -> metric -> number)")
    groups: dict[str, dict[str, float]] = {}
    for name, metrics in summary["groups"].items():
        if not isinstance(metrics, dict):
            raise ReportError(f"{where}.groups.{name} must be a mapping of metric -> number")
        for metric, value in metrics.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ReportError(f"{where}.groups.{name}.{metric} must be a number or null, got {value!r}")
        groups[name] = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    few = _string_list(summary.get("few"), f"{where}.few")
    min_rows = summary.get("min_rows")
    worst, gap = rank_groups(groups, exclude=few)
    return GroupTable(groups, _string_list(summary.get("absent"), f"{where}.absent"), few,
                      int(min_rows) if isinstance(min_rows, (int, float)) else None, worst, gap)


def _confusion(value: Any, where: str) -> dict:
    classes, matrix = (value.get("classes"), value.get("matrix")) if isinstance(value, dict) else (None, None)
    k = len(classes) if isinstance(classes, list) else -1
    if not (k > 0 and isinstance(matrix, list) and len(matrix) == k and all(
            isinstance(row, list) and len(row) == k and all(isinstance(c, int) and c >= 0 for c in row) for row in matrix)):
        raise ReportError(f"{where} must be {{\"classes\": [names], \"matrix\": [[counts]]}} with a square "
                          f"matrix of non-negative integer counts, one row and column per class")
    return {"classes": [str(c) for c in classes], "matrix": matrix}


def groups_from(data: dict, uri: str) -> tuple[dict[str, dict[str, GroupTable]], dict[str, dict[str, dict]]]:
    """An evaluation metrics.json's "by_group" and "confusion" -> ({dataset: {grouping: GroupTable}},
    {dataset: {attribute: {"classes", "matrix"}}}); both empty for a file from before per-group
    evaluation. Errors name the file and the key."""
    by_group, confusion = data.get("by_group") or {}, data.get("confusion") or {}
    for key, value in (("by_group", by_group), ("confusion", confusion)):
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ReportError(f"{uri}: {key} must map each dataset to a mapping")
    tables = {ds: {by: _group_table(s, f"{uri}: by_group.{ds}.{by}") for by, s in groupings.items()}
              for ds, groupings in by_group.items()}
    matrices = {ds: {attr: _confusion(c, f"{uri}: confusion.{ds}.{attr}") for attr, c in attrs.items()}
                for ds, attrs in confusion.items()}
    return tables, matrices


def load_groups(uri: str, opts: StorageOptions | None = None
                ) -> tuple[dict[str, dict[str, GroupTable]], dict[str, dict[str, dict]]]:
    """groups_from() of the metrics.json at uri."""
    try:
        data = json.loads(st.read_bytes(uri, opts))
    except json.JSONDecodeError as e:
        raise ReportError(f"{uri} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ReportError(f"{uri} is not an evaluation metrics.json (no mapping at the top level)")
    return groups_from(data, uri)


def group_rows(tables: dict[str, GroupTable]) -> tuple[list[str], list[list[Cell]]]:
    """The per-group table of one dataset: a row per metric, per grouping its worst group (with the
    value) and the gap max - min. Nothing is bold: these are not ranked across runs."""
    shown = [(by, title) for by, title in GROUP_TITLES if by in tables]
    headers = ["metric"] + [h for _, title in shown for h in (f"worst {title}", f"{title} gap")]
    rows = []
    for col in GROUP_COLUMNS:
        if not any(col.metric in g for t in tables.values() for g in t.groups.values()):
            continue
        row = [Cell(col.header)]
        for by, _ in shown:
            worst, gap = tables[by].worst.get(col.metric), tables[by].gap.get(col.metric)
            row += [Cell(f"{worst['group']} {col.format(worst['value'])}" if worst else MISSING),
                    Cell(col.format(gap) if gap is not None else MISSING)]
        rows.append(row)
    return headers, rows


def _group_notes(tables: dict[str, GroupTable]) -> str:
    absent = [f"{title}: {', '.join(tables[by].absent)}" for by, title in GROUP_TITLES if by in tables and tables[by].absent]
    few = [f"{title}: " + ", ".join(f"{g} ({tables[by].groups.get(g, {}).get('n', 0):.0f})" for g in tables[by].few)
           for by, title in GROUP_TITLES if by in tables and tables[by].few]
    min_rows = next((t.min_rows for t in tables.values() if t.min_rows), None)
    notes = [f"No rows (absent, not ranked): {'; '.join(absent)}." if absent else "Every group has rows."]
    if few:
        notes.append(f"Fewer than {min_rows or 'the minimum'} rows (flagged, not ranked): {'; '.join(few)}.")
    return " ".join(notes)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def group_section(run_groups: dict[str, tuple[dict, dict]], tmp: str, images: list[tuple[str, bytes]]) -> list[Block]:
    """Blocks of the "Evaluation by group" section: per run and evaluated dataset, the per-group
    table, its absent/few groups and a confusion-matrix figure (appended to `images`)."""
    from synthfar_ray import plots  # matplotlib: only when a report is drawn

    blocks = [Block("heading", "Evaluation by group"),
              Block("text", "Per run and dataset: the worst group and the gap (max - min between groups) of each "
                            "metric, by ethnicity, gender and age bin, over groups with enough rows; accuracies and "
                            f"gaps in % points, MAE in years; {MISSING} = fewer than two groups to compare.")]
    without = [name for name, (tables, matrices) in run_groups.items() if not tables and not matrices]
    for i, (run, (tables, matrices)) in enumerate(run_groups.items()):
        for ds in sorted(set(tables) | set(matrices)):
            blocks.append(Block("heading", f"{run}: {ds}", level=3))
            if tables.get(ds):
                headers, rows = group_rows(tables[ds])
                blocks.append(Block("table", headers=headers, rows=rows))
                blocks.append(Block("text", _group_notes(tables[ds])))
            if matrices.get(ds):
                png = plots.confusion_plots(matrices[ds], os.path.join(tmp, f"confusion_{i}_{_safe(ds)}.png"),
                                            title=f"{run}: {ds}")
                images.append((f"plots/confusion_{i}_{_safe(run)}_{_safe(ds)}.png", _read(png)))
                blocks.append(Block("image", f"{run}, {ds}: confusion matrices (rows: true class, colour: share "
                                             "of the true class, numbers: counts)", image=images[-1][1],
                                    image_name=images[-1][0]))
    if without:
        blocks.append(Block("text", f"No per-group results in the metrics.json of: {', '.join(without)} "
                                    "(evaluated before per-group evaluation existed)."))
    return blocks


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ReportError(f"--{what} expects name=path, got {item!r}")
        out[name] = value
    return out


def _resolve_metrics_path(uri: str, opts: StorageOptions | None) -> str:
    """A --runs path may name the metrics.json or the folder holding it."""
    fs, path = st.resolve(uri, opts)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return st.join(uri, METRICS_FILE)
    return uri


def _relative_to(base: str, uri: str) -> str:
    """Dataset URIs in report.yaml may be relative to RUN_DIR."""
    if st.is_s3(uri) or "://" in uri or os.path.isabs(uri):
        return uri
    return st.join(base, uri)


def load_spec(run_dir: str, opts: StorageOptions | None) -> tuple[ReportSpec, str | None]:
    uri = st.join(run_dir, SPEC_FILE)
    if not st.exists(uri, opts):
        return ReportSpec(), None
    try:
        data = yaml.safe_load(st.read_bytes(uri, opts)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{uri} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{uri} must hold a mapping at the top level")
    spec = validate(ReportSpec, data, uri)
    spec.datasets = {k: _relative_to(run_dir, v) for k, v in spec.datasets.items()}
    return spec, uri


def load_tune(uri: str, opts: StorageOptions | None, metric: str | None, mode: str | None) -> tuple[pd.DataFrame, str, str]:
    """Read a trial table; returns (trials sorted best first, metric column, mode)."""
    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(st.read_bytes(uri, opts)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportError(f"{uri} is not a readable CSV: {e}") from e
    if metric is None:
        named = df["metric"].dropna().unique().tolist() if "metric" in df.columns else []
        if len(named) > 1:
            raise ReportError(f"{uri}: column 'metric' names several metrics {named}; pass --metric")
        metric = str(named[0]) if named else "val_score"
    missing = [c for c in (*TUNE_COLUMNS, metric) if c not in df.columns]
    if missing:
        raise ReportError(f"{uri} lacks column(s) {missing}; it has {list(df.columns)}")
    if mode is None:
        modes = df["mode"].dropna().unique().tolist() if "mode" in df.columns else []
        lower = any(w in metric.lower() for w in ("mae", "loss", "error"))
        mode = str(modes[0]) if len(modes) == 1 else ("min" if lower else "max")
    if mode not in ("min", "max"):
        raise ReportError(f"{uri}: mode must be min or max, got {mode!r}")
    df[metric] = pd.to_numeric(df[metric], errors="coerce")
    df = df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable").reset_index(drop=True)
    return df, metric, mode


# Shown in the Tune table when the trial table has them (older tables do not).
TUNE_OPTIONAL_COLUMNS = ("effective_mix_ratio", "status", "error")


def _failed_trials(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials with no number to rank: an error status, or a missing metric."""
    bad = trials[metric].isna()
    if "status" in trials.columns:
        bad |= trials["status"].isin(["ERROR", "NO_RESULT"])
    return trials[bad]


def tune_rows(trials: pd.DataFrame, metric: str, extra: list[str]) -> list[list[Cell]]:
    """Ranked rows: a rank and bold only where there is a number; failed trials last, unranked."""
    failed = set(_failed_trials(trials, metric).index)
    rows, rank = [], 0
    for i, t in trials.iterrows():
        ok = i not in failed
        rank += ok
        rows.append([Cell(str(rank) if ok else MISSING), *[Cell(_fmt(t[c])) for c in TUNE_COLUMNS],
                     Cell(_fmt_metric(t[metric]) if ok else MISSING, "bold" if ok and rank == 1 else ""),
                     *[Cell(_fmt(t[c])) for c in extra]])
    return rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_metric(value: Any) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.4f}"


# ----------------------------------------------------------------------------- the report

def build_report(run_dir: str, out_dir: str | None = None, runs: dict[str, str] | None = None,
                 datasets: dict[str, str] | None = None, tune_csv: str | None = None,
                 metric: str | None = None, storage: StorageOptions | None = None,
                 title: str | None = None, mode: str | None = None, grid_images: int = 16) -> ReportResult:
    """Write report.md and report.html (plus plots/*.png) to out_dir (default RUN_DIR/report).

    runs: name -> metrics.json (or its folder); default: every metrics.json under run_dir.
    datasets: name -> Parquet dataset URI; default: report.yaml's `datasets`.
    tune_csv: a trial table; default: every tune_results.csv under run_dir.
    metric / mode: the Tune metric column and min|max; default: the CSV's `metric` / `mode`
    columns, else val_score, max (min for names with mae/loss/error).
    """
    out_dir = out_dir or st.join(run_dir, "report")
    sources: list[str] = []
    blocks: list[Block] = []
    spec, spec_uri = load_spec(run_dir, storage)
    if spec_uri:
        sources.append(spec_uri)
    found = _walk(run_dir, storage, (METRICS_FILE, TUNE_FILE))
    # Only now that RUN_DIR is known to exist: matplotlib, pandas and the quality stage take ~1.5 s.
    from synthfar_ray import plots
    from synthfar_ray.quality import report_blocks as quality_blocks

    # --- the paper's table
    run_metrics: dict[str, dict[str, dict[str, float | None]]] = {}
    run_files: dict[str, str] = {}
    run_info: dict[str, dict] = {}
    if runs:
        for name, path in runs.items():
            uri = _resolve_metrics_path(path, storage)
            run_metrics[name] = load_metrics(uri, storage)
            run_files[name] = uri
    else:
        for uri in found[METRICS_FILE]:
            try:
                metrics = load_metrics(uri, storage)
            except ValueError as e:
                logger.warning("skipping %s", e)
                continue
            name = _run_name(run_dir, uri)
            run_metrics[name], run_files[name] = metrics, uri
    run_groups: dict[str, tuple[dict, dict]] = {}
    for name, uri in run_files.items():
        data = json.loads(st.read_bytes(uri, storage))
        run_info[name] = {"checkpoint": data.get("checkpoint"),
                          **{k: v.get("n") for k, v in data["datasets"].items() if isinstance(v, dict)}}
        run_groups[name] = groups_from(data, uri)

    blocks.append(Block("heading", "Results (paper table)"))
    headers, grid, values = paper_table(run_metrics)
    if run_metrics:
        blocks.append(Block("text", "Best per column in bold, second best in italic; age MAE in years "
                                    f"(lower is better), accuracies in % (higher is better); {MISSING} = not evaluated."))
        blocks.append(Block("table", headers=headers, rows=grid))
        eval_sets = sorted({k for info in run_info.values() for k in info if k != "checkpoint"})
        blocks.append(Block("table", headers=["run", "checkpoint", *[f"n {k}" for k in eval_sets]],
                            rows=[[Cell(n), Cell(_fmt(run_info[n]["checkpoint"])),
                                   *[Cell(_fmt(run_info[n].get(k))) for k in eval_sets]] for n in run_files]))
        blocks.append(Block("sources", "\n".join(run_files.values())))
        sources += list(run_files.values())
    else:
        blocks.append(Block("text", f"No evaluation {METRICS_FILE} found under {run_dir}."))
    blocks += groundtruth_blocks(run_dir, storage)  # selection precision, Tune vs runs (when present)

    # --- datasets: distributions and sample grids
    datasets = dict(datasets) if datasets else dict(spec.datasets)
    images: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="synthfar-report-") as tmp:
        if run_groups:
            blocks += group_section(run_groups, tmp, images)
        blocks += quality_blocks(run_dir, tmp, images, storage)  # when the pipeline ran `synthfar quality`
        if datasets:
            blocks.append(Block("heading", "Datasets"))
            frames = {n: plots.read_labels(u, storage) for n, u in datasets.items()}
            rows = []
            for n, df in frames.items():
                rows.append([Cell(n), Cell(str(len(df))), Cell(str(int(df["age"].notna().sum()))),
                             *[Cell(f"{p * 100:.1f}") for p in plots.label_distributions({n: df})["gender"][n]]])
            blocks.append(Block("table", headers=["dataset", "images", "with exact age",
                                                  *[f"{g} (%)" for g in plots.GENDERS]], rows=rows))
            png = plots.distribution_plots(datasets, os.path.join(tmp, "distributions.png"), storage)
            images.append(("plots/distributions.png", _read(png)))
            blocks.append(Block("image", "Label distributions (proportions per dataset)", image=images[-1][1],
                                image_name=images[-1][0]))
            for n, uri in datasets.items():
                safe = _safe(n)
                png = plots.sample_grid(uri, os.path.join(tmp, f"grid_{safe}.png"), storage, n=grid_images)
                images.append((f"plots/grid_{safe}.png", _read(png)))
                blocks.append(Block("image", f"{n}: first {grid_images} images by id (age / gender / ethnicity)",
                                    image=images[-1][1], image_name=images[-1][0]))
            blocks.append(Block("sources", "\n".join(datasets.values())))
            sources += list(datasets.values())

        # --- Tune
        tune_files = [tune_csv] if tune_csv else found[TUNE_FILE]
        if tune_files:
            blocks.append(Block("heading", "Tune results"))
        for i, uri in enumerate(tune_files):
            trials, tmetric, tmode = load_tune(uri, storage, metric, mode)
            if len(tune_files) > 1:
                blocks.append(Block("heading", _run_name(run_dir, uri), level=3))
            blocks.append(Block("text", f"{len(trials)} trials sorted by {tmetric} "
                                        f"({'higher' if tmode == 'max' else 'lower'} is better), best first."))
            shown = [c for c in TUNE_OPTIONAL_COLUMNS if c in trials.columns and trials[c].notna().any()]
            extra = [c for c in trials.columns if c not in (*TUNE_COLUMNS, *shown, tmetric, "metric", "mode")]
            blocks.append(Block("table", headers=["rank", *TUNE_COLUMNS, tmetric, *shown],
                                rows=tune_rows(trials, tmetric, shown)))
            failed = _failed_trials(trials, tmetric)
            if len(failed):
                blocks.append(Block("text", f"{len(failed)} of {len(trials)} trials FAILED and are not ranked: " + "; ".join(
                    f"{t['trial_id']} ({_fmt(t.get('status'))}: {_fmt(t.get('error'))})" for t in failed.to_dict("records"))))
            if extra:
                blocks.append(Block("text", f"Other columns in the file: {', '.join(map(str, extra))}."))
            png = plots.tune_plots(trials, tmetric, os.path.join(tmp, f"tune_{i}.png"), tmode)
            images.append((f"plots/tune_{i}.png", _read(png)))
            blocks.append(Block("image", f"{tmetric} vs mixing ratio and top-K, per sampler (best trial per point)",
                                image=images[-1][1], image_name=images[-1][0]))
            blocks.append(Block("sources", uri))
            sources.append(uri)

    # --- write
    title = title or spec.title or f"SynthFAR report: {posixpath.basename(run_dir.rstrip('/')) or run_dir}"
    for rel, data in images:
        st.write_bytes(st.join(out_dir, rel), data, storage)
    md_uri, html_uri = st.join(out_dir, "report.md"), st.join(out_dir, "report.html")
    st.write_bytes(md_uri, render_markdown(title, blocks).encode("utf-8"), storage)
    st.write_bytes(html_uri, render_html(title, blocks).encode("utf-8"), storage)
    logger.info("report with %d runs, %d datasets, %d tune tables -> %s", len(run_files), len(datasets), len(tune_files), out_dir)
    return ReportResult(markdown_path=md_uri, html_path=html_uri, headers=headers,
                        rows=[[c.text for c in row] for row in grid], values=values, sources=sources,
                        groups={run: tables for run, (tables, _) in run_groups.items()})


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- CLI

def _run_cli(args: argparse.Namespace) -> int:
    result = build_report(
        args.run_dir, out_dir=args.out, runs=_parse_pairs(args.runs, "runs") or None,
        datasets=_parse_pairs(args.dataset, "dataset") or None, tune_csv=args.tune, metric=args.metric,
        mode=args.mode, title=args.title,
        storage=StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None,
    )
    print(f"report: {result.markdown_path}\n        {result.html_path}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import stage_parser

    p = stage_parser(subparsers, "report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder (local or s3://) holding the runs' outputs")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--runs", nargs="+", action="extend", metavar="NAME=PATH",
                   help="table rows from these metrics.json files (or their folders) instead of discovering them")
    p.add_argument("--dataset", nargs="+", action="extend", metavar="NAME=URI",
                   help="datasets to plot instead of report.yaml's (e.g. synthetic=s3://b/synth utkface=data/utk)")
    p.add_argument("--tune", metavar="PATH", help="Tune trial table (default: tune_results.csv files under RUN_DIR)")
    p.add_argument("--metric", help="Tune metric column (default: the CSV's `metric` column, else val_score)")
    p.add_argument("--mode", choices=("min", "max"), help="whether lower or higher --metric is better")
    p.add_argument("--title", help="report title (default: report.yaml's title)")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO ...); credentials come from the AWS environment")
    p.set_defaults(func=_run_cli)
