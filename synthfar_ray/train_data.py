"""Training data plumbing: Parquet -> Ray Data on the driver, batches on the Train workers.

Driver side (`build_datasets`): each train set is read with file-level shuffling (a new file order
every pass; the datasets are written in a seeded permuted row order, so files are label-mixed),
filtered to its split / subset / selection, and decoded + resized by Ray Data CPU tasks. Read and
decode tasks ask for `data_cpus` each, so several trials on a small node still leave room for them.

Worker side: `BatchStream` cycles a dataset shard forever and hands out any number of rows per step
(leftover rows wait for the next step), `MixSchedule` draws each step's synthetic row count from a
seeded binomial, so the synthetic share is exact in expectation at any batch size, and `ValSet`
keeps the decoded val split in memory for repeated validation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from synthfar_ray import storage
from synthfar_ray.errors import UserError
from synthfar_ray.storage import StorageOptions
from synthfar_ray.transforms import LABEL_COLUMNS, label_columns

if TYPE_CHECKING:
    from synthfar_ray.train import TrainConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Driver: Ray Datasets


def check_dataset(uri: str | None, setting: str, opts: StorageOptions, crop: int | None = None,
                  crop_setting: str = "center_crop") -> None:
    """Fail on the driver, before Ray starts, when a dataset setting points at nothing readable, or
    asks for a centre crop (stored pixels) of a `synthfar prepare` copy, whose pixels are not the source's."""
    from synthfar_ray.prepare import prepared_manifest

    if uri is None:
        return
    try:
        storage.parquet_files(uri, opts)
    except storage.StorageError as e:
        raise UserError(f"{setting}: {e}") from None
    prepared = prepared_manifest(uri, opts) if crop is not None else None
    if prepared is not None:
        raise UserError(f"{crop_setting}={crop}: {setting} {uri} is a training-resolution copy (synthfar prepare, "
                        f"short side {prepared.get('size')} px of {prepared.get('source')}); crop when preparing "
                        f"(synthfar prepare --center-crop {crop}, in source pixels) and set {crop_setting}: null")


def cfg_label_columns(cfg: TrainConfig) -> tuple[str, ...]:
    """The label columns of the run's net (the four, plus its synthetic heads', plus the real labels
    its label transfer heads train on; a set without a column reads as unknown)."""
    return label_columns(cfg.model.synthetic_heads) + cfg.model.transfer_labels


def columns_in(ds, columns: tuple[str, ...]) -> tuple[str, ...]:
    """`columns` without the synthetic heads' ones a (freshly read) dataset lacks: a real set has no
    pose or hair columns, and its rows read as unknown (transforms.labels_to_numpy)."""
    if columns == LABEL_COLUMNS:
        return columns
    have = set(ds.columns())
    return tuple(c for c in columns if c in LABEL_COLUMNS or c in have)


def read_rows(uri: str, opts: StorageOptions, splits: tuple[str, ...], *, subset: int | None = None,
              chosen_ids: np.ndarray | None = None, limit: int | None = None, shuffle_seed: int | None = None,
              num_cpus: float = 1.0, columns: tuple[str, ...] = LABEL_COLUMNS):
    """A split's rows with `id`, `image` and the label `columns`; a synthetic head's column the
    dataset lacks (a real set has no pose or hair) is left out here and read as unknown later."""
    import ray
    from ray.data.expressions import col

    fs, path = storage.resolve(uri, opts)
    # Train sets read their files in a new order each pass (streaming, unlike randomize_block_order,
    # which waits for every read to finish); each worker's shuffle buffer (shuffle_rows) mixes rows further.
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = storage.ray_read_parquet(path, fs, shuffle=shuffle, num_cpus=num_cpus)
    pred = col("split").is_in(list(splits))
    if subset is not None and subset < 100:
        if "subset" not in ds.columns():
            raise UserError(f"real_subset={subset} but {uri} has no `subset` column")
        pred = pred & (col("subset") <= subset)
    if chosen_ids is not None:
        pred = pred & col("id").is_in([int(i) for i in chosen_ids])
    ds = ds.filter(expr=pred).select_columns(["id", "image", *columns_in(ds, columns)])
    return ds.limit(limit) if limit else ds


def decode_rows(ds, cfg: TrainConfig, crop: int | None, augment: bool, is_synthetic: int):
    from synthfar_ray.transforms import decode_batch

    if cfg.decode_on == "worker":  # the worker decodes; just tag the rows
        def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch["is_synthetic"] = np.full(len(batch["id"]), is_synthetic, dtype=np.int8)
            return batch
        return ds.map_batches(tag, batch_format="numpy", num_cpus=min(0.25, cfg.data_cpus))
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=64, num_cpus=cfg.data_cpus,
                          fn_kwargs={"size": cfg.image_size, "center_crop": crop, "augment": augment,
                                     "is_synthetic": is_synthetic, "columns": cfg_label_columns(cfg)})


def val_source_of(cfg: TrainConfig) -> str:
    return cfg.val_source if cfg.val_source != "auto" else ("real" if cfg.real else "synthetic")


def synthetic_ids(cfg: TrainConfig) -> np.ndarray | None:
    """The synthetic ids training may use: the selection's chosen ids and/or the rows that pass the
    quality thresholds (both: the rows in both); None = every row."""
    from synthfar_ray.selection import read_selection_ids

    chosen = read_selection_ids(cfg.synthetic_selection, cfg.storage) if cfg.synthetic_selection else None
    if cfg.quality is not None:
        from synthfar_ray.quality import passing_ids

        passing = passing_ids(cfg.quality, cfg.storage)
        chosen = passing if chosen is None else np.intersect1d(chosen, passing)
        if len(chosen) == 0:
            raise UserError(f"synthetic_selection={cfg.synthetic_selection} and quality.folder={cfg.quality.folder} "
                            "have no id in common: nothing to train on")
    return chosen


def relabel_map(changes) -> dict[str, dict[int, float]]:
    """{field: {id: new label}} of quality.relabel_changes' table."""
    return {f: dict(zip(rows["id"].tolist(), rows["new"].tolist())) for f, rows in changes.groupby("field")}


def build_datasets(cfg: TrainConfig, needed: set[str], relabelled=None) -> dict[str, Any]:
    """Ray Datasets: "synthetic" / "real" / "target" (adaptation: real train rows, labels unused) train rows
    (those in `needed`) and "val" (unsplit)."""
    from synthfar_ray.quality import apply_changes, relabel_changes

    data_aug = cfg.augment and cfg.augment_on == "data"
    columns = cfg_label_columns(cfg)
    out: dict[str, Any] = {}
    if "synthetic" in needed:
        chosen = synthetic_ids(cfg)
        ds = read_rows(cfg.synthetic, cfg.storage, ("train",), chosen_ids=chosen, shuffle_seed=cfg.seed,
                       num_cpus=cfg.data_cpus, columns=columns)
        if cfg.relabel is not None:  # `relabelled`: the driver's relabel_changes table, if it has it already
            if relabelled is None:
                relabelled = relabel_changes(cfg.relabel, cfg.storage)
            ds = ds.map_batches(apply_changes, batch_format="numpy", num_cpus=min(0.25, cfg.data_cpus),
                                fn_kwargs={"changes": relabel_map(relabelled)})
        out["synthetic"] = decode_rows(ds, cfg, cfg.synthetic_center_crop, data_aug, 1)
    if "real" in needed:
        ds = read_rows(cfg.real, cfg.storage, ("train",), subset=cfg.real_subset, shuffle_seed=cfg.seed,
                       num_cpus=cfg.data_cpus, columns=columns)
        out["real"] = decode_rows(ds, cfg, cfg.center_crop, data_aug, 0)
    if "target" in needed:  # adaptation's unlabelled real rows: the same rows in another order
        ds = read_rows(cfg.real, cfg.storage, ("train",), subset=cfg.real_subset, shuffle_seed=cfg.seed + 1,
                       num_cpus=cfg.data_cpus, columns=columns)
        out["target"] = decode_rows(ds, cfg, cfg.center_crop, data_aug, 0)
    source = val_source_of(cfg)
    if source != "none":
        uri, crop = (cfg.real, cfg.center_crop) if source == "real" else (cfg.synthetic, cfg.synthetic_center_crop)
        val = read_rows(uri, cfg.storage, ("val",), limit=cfg.val_limit, num_cpus=cfg.data_cpus, columns=columns)
        out["val"] = decode_rows(val, cfg, crop, False, int(source == "synthetic"))
    return out


# ---------------------------------------------------------------------------------------------
# Worker: device batches


def to_device_batch(batch: dict, cfg: TrainConfig, device, crop: int | None):
    """A batch from either decode path -> (uint8 images NCHW on device, label tensors, is_synthetic)."""
    from synthfar_ray.transforms import decode_to_tensor, host_to_device, labels_to_numpy

    if cfg.decode_on == "worker":
        images = decode_to_tensor(list(batch["image"]), cfg.image_size, crop, device=device)
        labels = {k: host_to_device(v, device) for k, v in labels_to_numpy(batch, cfg_label_columns(cfg)).items()}
        syn = host_to_device(np.asarray(batch["is_synthetic"], dtype=np.int8), device)
        return images, labels, syn
    images = batch["image"].permute(0, 3, 1, 2)  # NHWC uint8 from the data tasks
    return images, {k: batch[k] for k in cfg_label_columns(cfg)}, batch["is_synthetic"]


def _is_cuda(device) -> bool:
    return getattr(device, "type", str(device)).startswith("cuda")


def concat_batches(parts: list[tuple]):
    import torch

    parts = [p for p in parts if p[0].shape[0] > 0] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    images = torch.cat([p[0] for p in parts])
    labels = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    syn = torch.cat([p[2] for p in parts])
    return images, labels, syn


def unlabelled(item: tuple, keep: tuple[str, ...] = ()) -> tuple:
    """The rows with every label but `keep` unknown (ages and angles NaN, classes -1): adaptation's
    target rows, which the masked losses skip."""
    import torch

    images, labels, syn = item
    return images, {k: v if k in keep else torch.full_like(v, float("nan") if v.is_floating_point() else -1)
                    for k, v in labels.items()}, syn


def _nbytes(item: tuple) -> int:
    images, labels, syn = item
    return int(images.nbytes + syn.nbytes + sum(v.nbytes for v in labels.values()))


def _slice(item: tuple, start: int, stop: int) -> tuple:
    images, labels, syn = item
    return images[start:stop], {k: v[start:stop] for k, v in labels.items()}, syn[start:stop]


def _take(item: tuple, idx) -> tuple:
    images, labels, syn = item
    return images[idx], {k: v[idx] for k, v in labels.items()}, syn[idx]


def _put(buf: tuple, idx, item: tuple) -> None:
    buf[0][idx] = item[0]
    for k, v in item[1].items():
        buf[1][k][idx] = v
    buf[2][idx] = item[2]


def shuffle_rows(items: Iterator[tuple], buffer: int, batch: int, seed: int) -> Iterator[tuple]:
    """Batches of `batch` rows drawn at random from a buffer of >= `buffer` decoded rows: each incoming
    batch takes the place of the random rows handed out; the buffer drains shuffled at the end.

    It works on the (device) tensors, a gather and a scatter per batch: Ray Data's local shuffle
    buffer re-concatenates host blocks per batch in the train worker and cost ~20 % of the step
    rate on CPU (bench/train.py)."""
    import torch

    if buffer <= 0:
        yield from items
        return
    cap = -(-max(buffer, batch) // batch) * batch
    buf, filled, gen = None, 0, None
    for item in items:
        if buf is None:
            # Indices drawn on the rows' device: a host-made index would be a blocking copy per step.
            gen = torch.Generator(device=item[0].device).manual_seed(seed)
            buf = tuple([torch.empty((cap, *item[0].shape[1:]), dtype=item[0].dtype, device=item[0].device),
                         {k: torch.empty((cap, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in item[1].items()},
                         torch.empty((cap, *item[2].shape[1:]), dtype=item[2].dtype, device=item[2].device)])
        if filled < cap:
            _put(buf, slice(filled, filled + batch), item)
            filled += batch
            continue
        idx = torch.randperm(cap, generator=gen, device=buf[0].device)[:batch]
        out = _take(buf, idx)  # a copy: the scatter below cannot change it
        _put(buf, idx, item)
        yield out
    if buf is not None:
        order = torch.randperm(filled, generator=gen, device=buf[0].device)
        for start in range(0, filled - batch + 1, batch):
            yield _take(buf, order[start:start + batch])


class BatchStream:
    """One dataset shard as an endless source of device rows: `take(n)` returns exactly n rows,
    keeping what is left of the last batch for the next call; passes are reshuffled one after another."""

    def __init__(self, shard, read_batch: int, cfg: TrainConfig, rank: int, device, crop: int | None):
        self.shard, self.read_batch, self.cfg, self.rank, self.device, self.crop = shard, read_batch, cfg, rank, device, crop
        self._batches = self._cycle()
        self._left: tuple | None = None  # rows of the last batch not handed out yet

    def _cycle(self) -> Iterator[tuple]:
        cfg, epoch = self.cfg, 0
        budget = cfg.train_cache_mb * 2**20
        cache: list[tuple] | None = [] if budget > 0 else None
        while True:
            n, size = 0, 0
            kwargs = dict(batch_size=self.read_batch, drop_last=True, prefetch_batches=2)
            if cfg.decode_on == "worker":
                it = self.shard.iter_batches(batch_format="numpy", **kwargs)
            else:  # pinned host batches: the copies to the GPU run asynchronously
                it = self.shard.iter_torch_batches(device=self.device, pin_memory=_is_cuda(self.device), **kwargs)
            items = (to_device_batch(batch, cfg, self.device, self.crop) for batch in it)
            for item in shuffle_rows(items, cfg.shuffle_buffer, self.read_batch, cfg.seed + 1009 * epoch + self.rank):
                n += 1
                if cache is not None:
                    size += _nbytes(item)
                    if size <= budget:
                        cache.append(item)
                    else:
                        cache = None  # too big: stream every pass
                yield item
            if n == 0:
                raise UserError(f"a worker's data shard holds fewer than one batch ({self.read_batch} rows): "
                                "use a smaller batch_size or fewer workers, or more data")
            epoch += 1
            if cache is not None:
                logger.info("rank %d: train shard cached after its first pass (%d rows, %.1f MiB): later passes "
                            "are permutations of it (train_cache_mb=%g)", self.rank, n * self.read_batch,
                            size / 2**20, cfg.train_cache_mb)
                yield from self._cached_passes(concat_batches(cache), epoch)

    def _cached_passes(self, rows: tuple, epoch: int) -> Iterator[tuple]:
        """Endless passes over the cached shard: a seeded permutation per pass, batches of read_batch."""
        import torch

        total = int(rows[0].shape[0])
        while True:
            gen = torch.Generator().manual_seed(self.cfg.seed + 1009 * epoch + self.rank)
            order = torch.randperm(total, generator=gen).to(rows[0].device)
            for start in range(0, total - self.read_batch + 1, self.read_batch):
                idx = order[start:start + self.read_batch]
                yield rows[0][idx], {k: v[idx] for k, v in rows[1].items()}, rows[2][idx]
            epoch += 1

    def prefetch(self) -> None:
        """Pull the first batch now (pays this pipeline's start-up: listing, first read and decode)."""
        if self._left is None:
            self._left = next(self._batches)

    def take(self, n: int) -> tuple:
        if n == 0:  # an empty batch with the right shapes and dtypes
            self.prefetch()
            return _slice(self._left, 0, 0)
        parts, have = [], 0
        while have < n:
            self.prefetch()
            size = int(self._left[0].shape[0])
            use = min(size, n - have)
            parts.append(_slice(self._left, 0, use))
            self._left = _slice(self._left, use, size) if use < size else None
            have += use
        return concat_batches(parts)


def prefetch_all(streams: dict[str, BatchStream]) -> None:
    """First batch of every stream in parallel threads: the Ray Data pipelines start together."""
    if len(streams) < 2:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(streams)) as pool:
        for f in [pool.submit(s.prefetch) for s in streams.values()]:
            f.result()


class MixSchedule:
    """Rows per dataset of each step's (worker) batch.

    The mix plan's synthetic count is Binomial(batch, mix_ratio), drawn from a generator seeded by
    (seed, rank, step): exact in expectation at any batch size and ratio (rounding would quantise a
    ratio, and drop the synthetic stream when it rounds to 0), and the same after a resume."""

    def __init__(self, names: tuple[str, ...], batch: int, mix_ratio: float | None, seed: int, rank: int):
        self.names, self.batch, self.ratio, self.seed, self.rank = names, batch, mix_ratio, seed, rank

    def counts(self, step: int) -> dict[str, int]:
        if len(self.names) == 1 or self.ratio is None:
            return {self.names[0]: self.batch}
        rng = np.random.default_rng([self.seed, self.rank, step, 0x313])
        n_syn = int(rng.binomial(self.batch, self.ratio))
        return {"synthetic": n_syn, "real": self.batch - n_syn}


# ---------------------------------------------------------------------------------------------
# Worker: validation


class ValSet:
    """Rank 0's view of the val split: read through Ray Data once, then kept decoded in memory (on the
    device) when it fits in `val_cache_mb`, so later validations cost only the forward passes."""

    def __init__(self, shard, cfg: TrainConfig, device, crop: int | None):
        self.shard, self.cfg, self.device, self.crop = shard, cfg, device, crop
        self.cached: list[tuple] | None = None
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def prefetch(self) -> None:
        """Make the first pass (and fill the cache) in a background thread while training starts."""
        def run() -> None:
            try:
                for _ in self.batches():
                    pass
            except Exception as e:  # re-raised by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="val-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError(f"reading the val split failed: {self._error}") from self._error

    def batches(self) -> Iterator[tuple]:
        if self.cached is not None:
            yield from self.cached
            return
        cfg = self.cfg
        if cfg.decode_on == "worker":
            it = self.shard.iter_batches(batch_format="numpy", batch_size=cfg.val_batch_size)
        else:
            it = self.shard.iter_torch_batches(batch_size=cfg.val_batch_size, device=self.device,
                                               pin_memory=_is_cuda(self.device))
        kept: list[tuple] | None = []
        size = 0
        for batch in it:
            item = to_device_batch(batch, cfg, self.device, self.crop)
            if kept is not None:
                size += item[0].numel()
                if size <= cfg.val_cache_mb * 2**20:
                    kept.append(item)
                else:
                    kept = None
            yield item
        self.cached = kept


def validate(model, val: ValSet, precision, age_mode: str) -> dict[str, float]:
    from synthfar_ray.metrics import compute_metrics
    from synthfar_ray.model import predict

    outs: dict[str, list[np.ndarray]] = {}
    labs: dict[str, list[np.ndarray]] = {}
    val.wait()
    for images, labels, _ in val.batches():
        for k, v in predict(model, images, precision, nhwc=False).items():
            outs.setdefault(k, []).append(v.cpu().numpy())
        for k, v in labels.items():
            labs.setdefault(k, []).append(v.cpu().numpy())
    if not labs.get("gender"):
        return {}
    metrics = compute_metrics({k: np.concatenate(v) for k, v in outs.items()},
                              {k: np.concatenate(v) for k, v in labs.items()},
                              age_bins_from="regression" if age_mode == "regression" else "logits")
    return {f"val_{k}": float(v) for k, v in metrics.items()}
