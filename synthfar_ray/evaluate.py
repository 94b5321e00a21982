"""Stage 6a: score a trained checkpoint on dataset splits with Ray Data batch inference.

`synthfar evaluate CHECKPOINT --on utkface:test,fairface:test --data utkface=URI --data fairface=URI`

Every named split is read from Parquet and decoded + resized on CPU tasks (with its own centre
crop), the splits are unioned and go through one `map_batches(Predictor)` actor pool (each actor
loads the checkpoint once, on a GPU when the cluster has one; `run_evaluations` scores several
checkpoints in the same pass, as the pipeline does with its runs); outputs and labels are gathered on
the driver and scored per split with `metrics.compute_metrics`. UTKFace gives age MAE (clipped),
FairFace age-bin accuracy (from the bin head, or bucketized regression ages for a regression-only
net); both give gender and ethnicity accuracy. Every metric is also scored per ethnicity, gender
and age bin, with the worst group and the gap between groups (`by_group`), and a confusion matrix
per classification attribute (`confusion`). Results go to `metrics.json` and `metrics.md`.
A split with FairFace's 7-race labels (`ethnicity7`) also gets the fixed fold baseline's 7-race
accuracy; `--adapt-on` fits test-time label maps there (label_maps.py), including the 7-race
transfer map (`transfer_inputs`), and reports every metric again through them (`adapted`).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, StageConfig, validate
from synthfar_ray.metrics import MIN_GROUP_ROWS, compute_metrics, confusion_matrices, metrics_by_group
from synthfar_ray.paths import InputPath, OutputPath
from synthfar_ray.storage import StorageOptions
from synthfar_ray.label_maps import MIN_ROWS as MIN_ADAPT_ROWS
from synthfar_ray.transforms import LABEL_COLUMNS, label_columns

logger = logging.getLogger(__name__)

OUTPUT_PREFIX = "pred_"
METRIC_ORDER = ("age_mae", "age_bin_acc", "ethnicity_acc", "gender_acc", "race7_fold_acc", "race7_acc", "pose_mae",
                "hair_length_acc", "hair_color_acc", "keypoint_nme", "keypoint_real_baseline_nme", "keypoint_real_nme", "n")
METRIC_TITLES = {"age_mae": "age MAE", "age_bin_acc": "age-bin acc", "ethnicity_acc": "ethnicity acc",
                 "gender_acc": "gender acc", "race7_fold_acc": "7-race acc (fold + chance)",
                 "race7_acc": "7-race acc (transfer)", "pose_mae": "pose MAE (deg)", "hair_length_acc": "hair length acc",
                 "hair_color_acc": "hair colour acc", "keypoint_nme": "keypoint NME (x100)",
                 "keypoint_real_baseline_nme": "sparse keypoint NME (x100, fixed map)",
                 "keypoint_real_nme": "sparse keypoint NME (x100, transfer)", "n": "images"}
# Labels read beside the nets' own (a split without them reads as unknown): FairFace's 7 races.
EXTRA_LABELS: tuple[str, ...] = ("ethnicity7",)


class EvaluateConfig(StageConfig):
    checkpoint: InputPath = Field(description="checkpoint folder URI, or a run folder (its latest checkpoint)")
    on: list[str] = Field(description="dataset splits as NAME:SPLIT, e.g. utkface:test")
    data: dict[str, InputPath] = Field(description="NAME -> dataset folder URI")
    out: OutputPath | None = Field(None, description="folder for metrics.json / metrics.md (default: the run folder)")
    center_crop: dict[str, int | None] = Field(
        default_factory=lambda: {"fairface": 300},
        description="NAME -> centre crop side in stored pixels before resizing (paper: FairFace 300 of 448)")
    image_size: int | None = Field(None, ge=8, description="default: the checkpoint's training size")
    age_bins_from: Literal["auto", "logits", "regression"] = "auto"
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else 1")
    use_gpu: bool | None = Field(None, description="default: true when the cluster has GPUs")
    cpus_per_actor: float = Field(0.5, gt=0)
    limit: int | None = Field(None, ge=1, description="score at most this many rows per split")
    min_group_rows: int = Field(MIN_GROUP_ROWS, ge=1, description="groups with fewer rows are flagged and not "
                                                                    "ranked as the worst group or in the gap")
    adapt_on: str | None = Field(None, description="NAME:SPLIT whose labels fit test-time label maps on the frozen "
                                                   "net's outputs (label_maps.py); metrics are reported with and "
                                                   "without them")
    adapt_limit: int = Field(2000, ge=1, description="adapt_on: fit on at most this many rows (the first in file order)")
    transfer_inputs: list[Literal["logits", "features"]] = Field(
        default_factory=lambda: ["logits"],
        description="adapt_on with ethnicity7 labels (FairFace): what the 7-race transfer map reads, the 5 ethnicity "
                    "logits and/or the encoder's pooled features; [] fits no transfer map")
    transfer_l2: float | None = Field(None, gt=0, description="the transfer map's L2 penalty; default: the best of "
                                      "label_maps.L2_GRID on a held-out fifth of the adapt rows")

    @field_validator("on")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for item in value:
            name, _, split = item.partition(":")
            if not name or split not in ("train", "val", "test"):
                raise ValueError(f"{item!r} is not NAME:SPLIT with SPLIT train, val or test")
        if not value:
            raise ValueError("name at least one NAME:SPLIT")
        return value

    @field_validator("adapt_on")
    @classmethod
    def _adapt_split(cls, value: str | None) -> str | None:
        if value is not None:
            cls._names([value])
        return value

    def splits(self) -> list[str]:
        """Every NAME:SPLIT the pass predicts: `on`, then `adapt_on` if it is not one of them."""
        return self.on + ([self.adapt_on] if self.adapt_on and self.adapt_on not in self.on else [])

    @model_validator(mode="after")
    def _data_for_each(self) -> EvaluateConfig:
        missing = sorted({i.split(":")[0] for i in self.splits()} - set(self.data))
        if missing:
            raise ValueError(f"no dataset URI for {missing}: pass --data NAME=URI")
        return self


class Predictor:
    """Ray Data actor: loads each net once, turns decoded uint8 batches into every net's outputs
    (columns `pred_<j>:<head>` for checkpoint j) + the label `columns`."""

    def __init__(self, checkpoints: list[str], storage_options: StorageOptions, use_gpu: bool,
                 columns: tuple[str, ...] = LABEL_COLUMNS, features: bool = False):
        self.columns = columns
        self.features = features
        import torch

        from synthfar_ray.checkpoints import load_model
        from synthfar_ray.precision import device_precision

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # Training's rule (bf16 on GPUs with native bf16, fp16 on older ones, fp32 on CPU; NHWC on
        # CUDA), whatever the run trained with: the layout does not change the weights.
        self.precision = device_precision("auto", "auto", self.device)
        fmt = torch.channels_last if self.precision.channels_last else torch.preserve_format
        self.models = [load_model(c, storage_options)[0].to(self.device, memory_format=fmt) for c in checkpoints]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from synthfar_ray.model import predict

        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        result = {k: batch[k] for k in (*self.columns, "id", "split_index")}
        for j, model in enumerate(self.models):
            outputs = predict(model, images, self.precision, nhwc=True, features=self.features)
            result.update({f"{OUTPUT_PREFIX}{j}:{k}": v.cpu().numpy() for k, v in outputs.items()})
        return result


def _pool(cfg: EvaluateConfig) -> tuple[int, float]:
    from synthfar_ray.raycluster import actor_pool, check_request, use_gpu

    actors, gpus = actor_pool(cfg.num_actors, 1.0 if use_gpu(cfg.use_gpu) else 0.0)
    check_request("evaluate: each prediction actor", {"CPU": cfg.cpus_per_actor, "GPU": gpus})
    return actors, gpus


def _decoded_split(cfg: EvaluateConfig, index: int, name: str, split: str, image_size: int, adapt_only: bool = False,
                   columns: tuple[str, ...] = LABEL_COLUMNS):
    from ray.data.expressions import col

    from synthfar_ray.train_data import columns_in
    from synthfar_ray.transforms import decode_batch

    fs, path = storage.resolve(cfg.data[name], cfg.storage)
    ds = storage.ray_read_parquet(path, fs)
    read = columns_in(ds, columns)
    points = [c for c in ("keypoints", "keypoints_real") if c in read]
    if points and cfg.center_crop.get(name) is not None:
        raise ConfigError(f"center_crop {name}={cfg.center_crop[name]}: {cfg.data[name]} has {points[0]}, stored in the "
                          "frame of each image's centre square, which a crop changes; crop with `synthfar prepare "
                          "--center-crop` (it moves the keypoints) and evaluate the copy without center_crop")
    ds = ds.filter(expr=col("split") == split).select_columns(["id", "image", *read])
    limit = cfg.adapt_limit if adapt_only else cfg.limit
    if limit:
        ds = ds.limit(limit)
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_actor,
                        fn_kwargs={"size": image_size, "center_crop": cfg.center_crop.get(name), "columns": columns})
    return ds.map_batches(_tag, batch_format="numpy", fn_kwargs={"index": index}, num_cpus=0.1)


def _tag(batch: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    batch["split_index"] = np.full(len(batch["id"]), index, dtype=np.int32)
    return batch


def predict_splits(cfg: EvaluateConfig, checkpoints: list[str], image_size: int,
                   columns: tuple[str, ...] = LABEL_COLUMNS) -> list[dict[str, tuple[dict, dict]]]:
    """Per checkpoint, {NAME:SPLIT: (outputs, labels)}, from one Ray Data job: every split is read and
    decoded once (with its own crop), then all go through one actor pool that holds every net, so
    evaluating the pipeline's runs costs one pass over the test data, not one per run. `columns`:
    the labels read (`label_columns` of the nets' synthetic heads; unknown where a split lacks them).
    With `adapt_on` and transfer from features, the outputs also hold the pooled "features"."""
    import ray

    splits = cfg.splits()
    parts_ds = [_decoded_split(cfg, i, *item.split(":"), image_size, item == cfg.adapt_on and item not in cfg.on,
                               columns) for i, item in enumerate(splits)]
    ds = parts_ds[0].union(*parts_ds[1:]) if len(parts_ds) > 1 else parts_ds[0]
    actors, gpus = _pool(cfg)
    ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                        num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
                        fn_constructor_kwargs={"checkpoints": checkpoints, "storage_options": cfg.storage,  # an object: JSON would mask the secrets
                                               "use_gpu": gpus > 0, "columns": columns,
                                               "features": bool(cfg.adapt_on) and "features" in cfg.transfer_inputs})
    if cfg.limit or cfg.adapt_on:
        # `limit` keeps the first rows in FILE order only if blocks reach it in that order; without this
        # it kept whichever read finished first, so under load a test-time map was fitted on other rows.
        ds.context.execution_options.preserve_order = True
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    results: list[dict[str, tuple[dict, dict]]] = [{} for _ in checkpoints]
    for i, item in enumerate(splits):
        rows = np.flatnonzero(cols["split_index"] == i) if cols else np.zeros(0, dtype=np.int64)
        if not len(rows):
            name = item.split(":")[0]
            raise ConfigError(f"--on {item}: no rows with that split in {cfg.data[name]}")
        rows = rows[np.argsort(cols["id"][rows], kind="stable")]  # a fixed row order, whatever the pool did
        labels = {k: cols[k][rows] for k in columns}
        for j in range(len(checkpoints)):
            prefix = f"{OUTPUT_PREFIX}{j}:"
            results[j][item] = ({k[len(prefix):]: v[rows] for k, v in cols.items() if k.startswith(prefix)}, labels)
    return results


def _format(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return str(int(value)) if metric == "n" else f"{value:.3f}" if metric.endswith(("_mae", "_nme")) else f"{100 * value:.2f} %"


def _format_gap(metric: str, gap: float) -> str:
    return f"{gap:.3f}" if metric.endswith(("_mae", "_nme")) else f"{100 * gap:.2f} pts"


def _group_cell(summary: dict, metric: str) -> str:
    """"black 60.00 % (gap 40.00 pts)": the worst group, its value and the gap; "—" when fewer than
    two groups with enough rows have the metric."""
    worst = summary["worst"].get(metric)
    if worst is None:
        return "—"
    return f"{worst['group']} {_format(metric, worst['value'])} (gap {_format_gap(metric, summary['gap'][metric])})"


def group_markdown(by_group: dict[str, dict[str, dict]]) -> str:
    """The compact per-group section: one row per dataset and grouping."""
    metrics = [m for m in METRIC_ORDER if m != "n" and any(
        m in s["worst"] for groupings in by_group.values() for s in groupings.values())]
    min_rows = next((s["min_rows"] for g in by_group.values() for s in g.values()), MIN_GROUP_ROWS)
    lines = ["## By group", "",
             f"Worst group and gap (max - min between groups) per metric, over groups with at least {min_rows} rows; "
             f"absent: no row in the split; few: fewer than {min_rows} rows (in metrics.json, not ranked).", "",
             "| dataset | by | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " | absent | few rows |",
             "|---" * (len(metrics) + 4) + "|"]
    for name, groupings in by_group.items():
        for by, summary in groupings.items():
            few = ", ".join(f"{g} ({summary['groups'][g]['n']})" for g in summary["few"])
            cells = [_group_cell(summary, m) for m in metrics] + [", ".join(summary["absent"]) or "—", few or "—"]
            lines.append(f"| {name} | {by} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metrics_table(results: dict[str, dict[str, float]]) -> list[str]:
    """One row per dataset split, one column per metric any split has."""
    present = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    lines = ["| dataset | " + " | ".join(METRIC_TITLES[m] for m in present) + " |", "|---" * (len(present) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_format(m, r.get(m)) for m in present) + " |")
    return lines


def metrics_markdown(checkpoint: str, results: dict[str, dict[str, float]],
                     by_group: dict[str, dict[str, dict]] | None = None) -> str:
    lines = [f"# Evaluation of `{checkpoint}`", "", *_metrics_table(results)]
    text = "\n".join(lines) + "\n"
    if by_group and any(by_group.values()):
        text += "\n" + group_markdown(by_group)
    return text


# Fields that decide what is read and how it is predicted: evaluations that agree on these (and on
# the image size) share one pass over the data.
_PER_CHECKPOINT = {"checkpoint", "out", "image_size", "age_bins_from", "min_group_rows"}


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """{"checkpoint": URI, "datasets": {"NAME:SPLIT": metrics}, "by_group": {"NAME:SPLIT":
    metrics.metrics_by_group}, "confusion": {"NAME:SPLIT": metrics.confusion_matrices}, ...}
    (also written to metrics.json/.md)."""
    return run_evaluations([cfg])[0]


def run_evaluations(cfgs: list[EvaluateConfig]) -> list[dict[str, Any]]:
    """run_evaluate for several checkpoints, in order: those that read the same splits the same way
    at the same image size are scored in one Ray Data pass (the data is read and decoded once)."""
    from synthfar_ray.checkpoints import META_FILE, resolve_checkpoint
    from synthfar_ray.raycluster import ensure_ray

    ensure_ray()
    groups: list[tuple[dict[str, Any], int, list[int]]] = []  # (shared fields, image size, indices)
    resolved: list[tuple[str, dict[str, Any]]] = []
    for index, cfg in enumerate(cfgs):
        checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.storage)
        meta = json.loads(storage.read_bytes(storage.join(checkpoint, META_FILE), cfg.storage))
        resolved.append((checkpoint, meta))
        shared, size = cfg.model_dump(exclude=_PER_CHECKPOINT), cfg.image_size or int(meta["image_size"])
        group = next((g for g in groups if g[0] == shared and g[1] == size), None)
        if group is None:
            groups.append((shared, size, [index]))
        else:
            group[2].append(index)
    reports: list[dict[str, Any]] = [{} for _ in cfgs]
    for _, size, indices in groups:
        t0 = time.time()
        logger.info("evaluating %d checkpoint(s) at %d px on %s in one pass", len(indices), size,
                    ", ".join(cfgs[indices[0]].splits()))
        heads = {h for i in indices for h in resolved[i][1].get("synthetic_heads", ())}
        # A real set's sparse keypoints are scored where a net has the dense head (the fixed map, and
        # its transfer head when it has one).
        sparse = ("keypoints_real",) if "keypoints" in heads else ()
        predictions = predict_splits(cfgs[indices[0]], [resolved[i][0] for i in indices], size,
                                     label_columns(heads) + EXTRA_LABELS + sparse)
        for index, predicted in zip(indices, predictions):
            reports[index] = _score_and_write(cfgs[index], *resolved[index], size, predicted, time.time() - t0)
    return reports


def _score_and_write(cfg: EvaluateConfig, checkpoint: str, meta: dict[str, Any], image_size: int,
                     predicted: dict[str, tuple[dict, dict]], seconds: float) -> dict[str, Any]:
    from synthfar_ray.checkpoints import write_json

    bins_from = cfg.age_bins_from if cfg.age_bins_from != "auto" else (
        "regression" if meta["age_mode"] == "regression" else "logits")
    results: dict[str, dict[str, float]] = {}
    by_group: dict[str, dict[str, dict]] = {}
    confusion: dict[str, dict[str, dict]] = {}
    for item in cfg.on:
        outputs, labels = predicted[item]
        results[item] = {k: float(v) for k, v in compute_metrics(outputs, labels, age_bins_from=bins_from).items()}
        by_group[item] = metrics_by_group(outputs, labels, age_bins_from=bins_from, min_rows=cfg.min_group_rows)
        confusion[item] = confusion_matrices(outputs, labels, age_bins_from=bins_from)
        logger.info("%s %s: %s", checkpoint, item, ", ".join(f"{k} {v:.4g}" for k, v in results[item].items()))
    report = {"checkpoint": checkpoint, "image_size": image_size, "age_bins_from": bins_from,
              "center_crop": {i.split(":")[0]: cfg.center_crop.get(i.split(":")[0]) for i in cfg.on},
              "datasets": results, "by_group": by_group, "confusion": confusion,
              "seconds": round(seconds, 3)}  # of the whole pass it shared with other checkpoints
    if cfg.adapt_on:
        report["adapted"] = _adapted(cfg, predicted, bins_from)
    out = cfg.out or _parent(checkpoint)
    write_json(storage.join(out, "metrics.json"), report, cfg.storage)  # NaN -> null
    text = metrics_markdown(checkpoint, results, by_group) + (adapted_markdown(report["adapted"]) if cfg.adapt_on else "")
    storage.write_bytes(storage.join(out, "metrics.md"), text.encode(), cfg.storage)
    logger.info("wrote %s", storage.join(out, "metrics.json"))
    return report


def _adapted(cfg: EvaluateConfig, predicted: dict[str, tuple[dict, dict]], bins_from: str) -> dict[str, Any]:
    """Test-time label maps fitted on the adapt split's predictions; the `on` splits scored through them."""
    from synthfar_ray.label_maps import TransferMap, apply_label_maps, fit_label_maps

    maps = fit_label_maps(*predicted[cfg.adapt_on], transfer=cfg.transfer_inputs, transfer_l2=cfg.transfer_l2)
    if not maps:
        raise ConfigError(f"--adapt-on {cfg.adapt_on}: no head has {MIN_ADAPT_ROWS} or more labelled rows there")
    datasets = {}
    if isinstance(maps.get("age_bin"), TransferMap):  # bins from the age -> bin transfer map, not bucketized ages
        bins_from = "logits"
    for item in cfg.on:
        outputs, labels = predicted[item]
        adapted = apply_label_maps(outputs, maps)
        datasets[item] = {k: float(v) for k, v in compute_metrics(adapted, labels, age_bins_from=bins_from).items()}
        logger.info("%s adapted on %s: %s", item, cfg.adapt_on,
                    ", ".join(f"{k} {v:.4g}" for k, v in datasets[item].items()))
    race7 = maps.get("race7")
    transfer = {"inputs": list(race7.inputs), "dims": int(race7.weight.shape[0]), "l2": race7.l2} if race7 else None
    return {"on": cfg.adapt_on, "rows": {head: m.rows for head, m in maps.items()}, "datasets": datasets,
            "race7_transfer": transfer}


def adapted_markdown(adapted: dict[str, Any]) -> str:
    rows = ", ".join(f"{head} {n}" for head, n in adapted["rows"].items())
    transfer = adapted.get("race7_transfer")
    note = ([f"7-race transfer map (race7) from {' + '.join(transfer['inputs'])} ({transfer['dims']} inputs, "
             f"L2 {transfer['l2']:g}); "
             "7-race acc (fold + chance): the adapted 5-class prediction, a race guessed uniformly among those "
             "folded into it (expected accuracy).", ""] if transfer else [])
    lines = ["", f"## With test-time label maps fitted on {adapted['on']} (labelled rows: {rows})", "", *note,
             *_metrics_table(adapted["datasets"])]
    return "\n".join(lines) + "\n"


def _parent(uri: str) -> str:
    if storage.is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return posixpath.dirname(storage.resolve(uri)[1].rstrip("/"))


# ---------------------------------------------------------------------------------------------
# CLI

def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not NAME=VALUE")
        out[key] = value
    return out


def _cli(args: argparse.Namespace) -> int:
    data: dict[str, Any] = {"checkpoint": args.checkpoint, "on": [s for s in args.on.split(",") if s],
                            "data": _pairs(args.data, "--data"), "out": args.out}
    if args.crop:
        data["center_crop"] = {k: (None if v.lower() in ("", "none", "null") else int(v))
                               for k, v in _pairs(args.crop, "--crop").items()}
    if args.adapt_on:
        data["adapt_on"] = args.adapt_on
    if args.transfer_inputs is not None:
        data["transfer_inputs"] = [s for s in args.transfer_inputs.split(",") if s]
    for key in ("batch_size", "num_actors", "limit", "image_size", "min_group_rows", "transfer_l2"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    report = run_evaluate(validate(EvaluateConfig, data, "synthfar evaluate arguments"))
    print(metrics_markdown(report["checkpoint"], report["datasets"], report["by_group"])
          + (adapted_markdown(report["adapted"]) if "adapted" in report else ""))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from synthfar_ray.cli import stage_parser

    p = stage_parser(sub, "evaluate")
    p.add_argument("checkpoint", help="checkpoint folder URI or run folder URI")
    p.add_argument("--on", required=True, help="comma-separated NAME:SPLIT, e.g. utkface:test,fairface:test")
    p.add_argument("--data", action="append", default=[], metavar="NAME=URI", help="dataset folder per NAME")
    p.add_argument("--out", help="output folder URI (default: the run folder)")
    p.add_argument("--crop", action="append", default=[], metavar="NAME=PIXELS",
                   help="centre crop per NAME (default fairface=300; 'none' disables)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--num-actors", dest="num_actors", type=int)
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--limit", type=int, help="rows per split at most")
    p.add_argument("--adapt-on", dest="adapt_on", metavar="NAME:SPLIT",
                   help="fit test-time label maps on this split's labels (frozen net) and report metrics with them too")
    p.add_argument("--transfer-inputs", dest="transfer_inputs", metavar="logits,features",
                   help="--adapt-on with FairFace's 7 races: inputs of the 7-race transfer map (default logits; "
                        "'' for none)")
    p.add_argument("--transfer-l2", dest="transfer_l2", type=float,
                   help="the 7-race transfer map's L2 penalty (default: picked on a held-out fifth of the adapt rows)")
    p.add_argument("--min-group-rows", dest="min_group_rows", type=int,
                   help=f"groups with fewer rows are flagged, not ranked (default {MIN_GROUP_ROWS})")
    p.set_defaults(func=_cli)
