"""Pictures of a dataset: label distributions (the paper's Fig. 2), sample grids, Tune curves, and
an evaluation's confusion matrices.

Datasets are Parquet folders in the shared schema (synthfar_ray.labels.CORE_FIELDS), local or on
object storage. Labels are read without the image column, and a grid reads only the images it
shows, so these stay cheap on large sets.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable

import matplotlib
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state
from PIL import Image, ImageDraw, ImageFont, ImageOps

from synthfar_ray.images import decode_image
from synthfar_ray.labels import AGE_BIN_NAMES, ETHNICITIES, GENDERS
from synthfar_ray.storage import StorageOptions, open_parquet_dataset

from synthfar_ray.errors import UserError

logger = logging.getLogger(__name__)


class PlotError(UserError, ValueError):
    """A dataset that cannot be plotted (names the URI)."""


LABEL_COLUMNS: tuple[str, ...] = ("age", "age_bin", "gender", "ethnicity")
# The three panels of the distribution figure: column -> class names on its axis.
PANELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "age_bin": ("Age bin", AGE_BIN_NAMES),
    "gender": ("Gender", GENDERS),
    "ethnicity": ("Ethnicity", ETHNICITIES),
}
CAPTION_HEIGHT = 18  # pixels under each grid tile for its "age / gender / ethnicity" caption


def _dataset(uri: str, storage: StorageOptions | None) -> pads.Dataset:
    """The Parquet files under a dataset folder; `key=value` folders (hive partitioning) become columns."""
    return open_parquet_dataset(uri, storage, partitioning="hive")


def _check_columns(dataset: pads.Dataset, columns: Iterable[str], uri: str) -> None:
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise PlotError(f"dataset {uri} has no column(s) {missing}; it has {dataset.schema.names}")


def read_labels(uri: str, storage: StorageOptions | None = None,
                columns: Iterable[str] = LABEL_COLUMNS) -> pd.DataFrame:
    """The label columns of a Parquet dataset (never the image bytes), one row per image."""
    columns = list(columns)
    dataset = _dataset(uri, storage)
    _check_columns(dataset, columns, uri)
    return dataset.to_table(columns=columns).to_pandas()


def _name(names: tuple[str, ...], value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    value = int(value)
    return names[value] if 0 <= value < len(names) else f"#{value}"


def caption_for(row: dict) -> str:
    """"34 / female / asian"; the age bin stands in where only a bin is known (FairFace)."""
    age = row.get("age")
    if age is not None and not (isinstance(age, float) and math.isnan(age)):
        age_text = f"{float(age):.0f}"
    else:
        age_text = _name(AGE_BIN_NAMES, row.get("age_bin"))
    return f"{age_text} / {_name(GENDERS, row.get('gender'))} / {_name(ETHNICITIES, row.get('ethnicity'))}"


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, width: int) -> ImageFont.ImageFont:
    for size in range(12, 5, -1):
        font = ImageFont.load_default(size=size)
        if draw.textlength(text, font=font) <= width - 4:
            return font
    return ImageFont.load_default(size=6)


def first_rows(uri: str, n: int, storage: StorageOptions | None = None,
               columns: Iterable[str] = ("id", "image", *LABEL_COLUMNS), ids: Iterable[int] | None = None) -> list[dict]:
    """The n rows with the smallest ids (or the first n of `ids`, in that order); reads ids first so
    only n images' bytes are fetched."""
    dataset = _dataset(uri, storage)
    columns = list(columns)
    _check_columns(dataset, columns, uri)
    if ids is None:
        chosen = np.sort(dataset.to_table(columns=["id"]).column("id").to_numpy())[:n].tolist()
    else:
        chosen = [int(i) for i in ids][:n]
    table = dataset.to_table(columns=columns, filter=pc.field("id").isin(chosen))
    order = {i: k for k, i in enumerate(chosen)}
    return sorted(table.to_pylist(), key=lambda r: order[r["id"]])[:n]


def sample_grid(uri: str, out_png: str, storage: StorageOptions | None = None, n: int = 16,
                columns: int = 4, caption: bool = True, tile: int = 128, ids: Iterable[int] | None = None,
                captions: dict[int, str] | None = None) -> str:
    """A grid of the first n images (by id), or of the rows `ids` in their order (an undecodable one
    drawn as a grey tile), each fitted into a `tile` x `tile` square; `captions` replaces the label
    caption of the ids it names.

    The PNG is exactly `columns * tile` pixels wide and `rows * (tile + CAPTION_HEIGHT)` high
    (`rows = ceil(shown / columns)`, no caption band when caption=False), where shown = min(n,
    images in the set). Returns out_png (a local path).
    """
    if n < 1 or columns < 1 or tile < 8:
        raise ValueError(f"sample_grid needs n >= 1, columns >= 1, tile >= 8 (got n={n}, columns={columns}, tile={tile})")
    rows = first_rows(uri, n, storage, ids=ids)
    if not rows:
        raise PlotError(f"dataset {uri} has no rows to show")
    cap_h = CAPTION_HEIGHT if caption else 0
    grid_rows = math.ceil(len(rows) / columns)
    canvas = Image.new("RGB", (columns * tile, grid_rows * (tile + cap_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        x, y = (i % columns) * tile, (i // columns) * (tile + cap_h)
        try:
            img = Image.fromarray(decode_image(row["image"]))
        except ValueError as e:
            if ids is None:
                raise PlotError(f"dataset {uri}, id {row['id']}: {e}") from e
            img = Image.new("RGB", (tile, tile), (160, 160, 160))  # the worst rows may not decode: show that
        canvas.paste(ImageOps.pad(img, (tile, tile), color=(255, 255, 255)), (x, y))
        if caption:
            text = (captions or {}).get(row["id"]) or caption_for(row)
            font = _fitting_font(draw, text, tile)
            draw.text((x + tile / 2, y + tile + cap_h / 2), text, fill="black", font=font, anchor="mm")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png, format="PNG")
    logger.info("sample grid of %d images from %s -> %s", len(rows), uri, out_png)
    return out_png


def label_distributions(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per panel column: a (class name x dataset) table of proportions among labelled rows."""
    out: dict[str, pd.DataFrame] = {}
    for column, (_, names) in PANELS.items():
        table = {}
        for name, df in frames.items():
            values = df[column].dropna().astype(int)
            counts = np.bincount(values[(values >= 0) & (values < len(names))], minlength=len(names))
            total = counts.sum()
            table[name] = counts / total if total else np.zeros(len(names))
        out[column] = pd.DataFrame(table, index=list(names))
    return out


def distribution_plots(datasets: dict[str, str], out_png: str, storage: StorageOptions | None = None) -> str:
    """One figure, three panels (age bin, gender, ethnicity), one bar series per named dataset,
    as proportions so sets of different sizes compare. Returns out_png (a local path)."""
    if not datasets:
        raise ValueError("distribution_plots needs at least one dataset")
    frames = {name: read_labels(uri, storage, columns=tuple(PANELS)) for name, uri in datasets.items()}
    dists = label_distributions(frames)
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 0.8, 1.4]})
    width = 0.8 / len(frames)
    for ax, (column, (title, names)) in zip(axes, PANELS.items()):
        x = np.arange(len(names))
        for k, name in enumerate(frames):
            ax.bar(x - 0.4 + width * (k + 0.5), dists[column][name].to_numpy(), width,
                   label=f"{name} (n={len(frames[name])})")
        ax.set_xticks(x, names, rotation=30 if len(names) > 5 else 0)
        ax.set_title(title)
        ax.set_xlabel(title.lower())
        ax.set_ylabel("proportion")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper right", ncols=min(len(names), 4), fontsize="small")
    fig.suptitle("Label distributions (proportion of each dataset)")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    logger.info("distribution plot of %s -> %s", ", ".join(datasets), out_png)
    return out_png


def tune_plots(trials: pd.DataFrame, metric: str, out_png: str, mode: str = "max") -> str:
    """Metric vs mixing ratio and vs top-K, one line per sampler. Where several trials share a
    point (e.g. different learning rates) the line shows the best of them."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, x_col, x_label in zip(axes, ("mix_ratio", "top_k"), ("mixing ratio", "top-K")):
        for sampler, group in trials.groupby(trials["sampler"].fillna("none").astype(str), sort=True):
            points = group[[x_col, metric]].apply(pd.to_numeric, errors="coerce").dropna()
            if points.empty:
                continue
            agg = points.groupby(x_col)[metric].agg("max" if mode == "max" else "min").sort_index()
            ax.plot(agg.index.to_numpy(), agg.to_numpy(), marker="o", label=sampler)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
        ax.set_title(f"{metric} vs {x_label}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="sampler", fontsize="small")
        else:  # say so, instead of drawing empty axes
            ax.text(0.5, 0.5, f"no trial has both {x_label} and a {metric} value", ha="center", va="center",
                    transform=ax.transAxes, fontsize="large", color="firebrick", wrap=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


CONFUSION_TITLES = {"gender": "Gender", "ethnicity": "Ethnicity", "age_bin": "Age bin"}


def row_shares(matrix: np.ndarray) -> np.ma.MaskedArray:
    """Each row as shares of its true class (rows sum to 1); rows without a sample are masked."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    shares = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    return np.ma.masked_array(shares, mask=np.broadcast_to(totals == 0, m.shape))


def confusion_plots(confusion: dict[str, dict], out_png: str, title: str = "") -> str:
    """One panel per attribute (metrics.confusion_matrices' {attr: {"classes", "matrix"}}): true
    class down, predicted class across, colour = share of the true class, the count in each cell.
    A true class with no sample is a grey row marked "no rows" (never shown as 0 %). Returns out_png."""
    if not confusion:
        raise ValueError("confusion_plots needs at least one confusion matrix")
    sizes = [len(c["classes"]) for c in confusion.values()]
    fig = Figure(figsize=(sum(max(2.4, 0.55 * k + 1.2) for k in sizes) + 1.0, 0.45 * max(sizes) + 2.0),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(confusion), gridspec_kw={"width_ratios": sizes}))
    image = None
    for ax, (attr, c) in zip(axes, confusion.items()):
        matrix, names = np.asarray(c["matrix"], dtype=np.int64), list(c["classes"])
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
        image = ax.imshow(row_shares(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
        for i in range(len(names)):
            if matrix[i].sum() == 0:
                ax.text((len(names) - 1) / 2, i, "no rows", ha="center", va="center", fontsize="small", color="dimgray")
                continue
            share = matrix[i] / matrix[i].sum()
            for j, count in enumerate(matrix[i]):
                ax.text(j, i, str(count), ha="center", va="center", fontsize="x-small",
                        color="white" if share[j] > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 2 else 0, ha="right" if len(names) > 2 else "center")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        n, correct = int(matrix.sum()), int(np.trace(matrix))
        ax.set_title(f"{CONFUSION_TITLES.get(attr, attr)}\n" + (f"acc {100 * correct / n:.1f} %, n={n}" if n else "no labelled rows"))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
