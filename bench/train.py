"""Training throughput of the path a config actually runs: Ray Data -> the training worker against the
same train step fed tensors already in memory, in the same worker, same run. The worker is what the
config's `executor` gives one worker (auto: one Ray task in Ray Train's local mode, as `synthfar train`
runs a one-worker config; trainer: a one-worker TorchTrainer).

    python bench/train.py                  # CPU: the demo's train section (configs/pipeline/demo.yaml:
                                           # tiny CNN, 64 px from 64 px JPEGs, batch 32, fp32)
    python bench/train.py --config configs/experiments/a_synthetic_only.yaml --source-size 512
    python bench/train.py --gpu            # one GPU: experiment (a) at batch 256: ResNet-50, 196 px from
                                           # 512 px JPEGs, amp auto (bf16), channels_last auto (on)
    python bench/train.py --gpu --source-size 256   # ... from a `synthfar prepare --size 256` copy
    python bench/train.py --smoke          # seconds: checks the benchmark runs (tests use it)

The config gives everything that shapes the step and its input: backbone, image_size, batch_size,
amp, channels_last, compile, augment / augment_on, decode_on, shuffle_buffer, data_cpus, executor. The
worker runs `train.train_step` (the recipe's own step: augment + normalise on the device,
multi-task loss, AdamW, grad clip, scheduler) fed by
  memory  uint8 batches already on the device (the upper bound: no input pipeline);
  data    train_data.build_datasets -> get_dataset_shard -> train_data.BatchStream, as `synthfar train`
          (the config's decode_on, shuffle buffer and batch; the first pass, i.e. streaming, not the
          in-memory cache that later passes of a small set use).
Each path runs --warmup steps first (pipeline start-up, kernels, compile), then --steps timed steps;
the memory path runs again after the data path (`memory2`), and the ratio is data over the mean of
the two: on a shared 2-core box the memory path alone moved between 526 and 809 img/s from run to run.
It prints img/s, that ratio and the share of the data path's time spent waiting for input.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _make_part(args: tuple[str, int, int, int, int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthfar_ray.images import encode_jpeg
    from synthfar_ray.labels import CORE_FIELDS, age_to_bin

    path, start, n, size, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(n):  # smooth gradients + blobs + mild noise: JPEG sizes close to photos
        c = rng.uniform(40, 220, 3)
        img = c + 60 * np.sin(6 * xx[..., None] * rng.uniform(0.5, 2) + rng.uniform(0, 6, 3)) * yy[..., None]
        img += rng.normal(0, 6, (size, size, 3))
        images.append(encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90))
    age = rng.uniform(0, 85, n).astype(np.float32)
    cols = {"id": np.arange(start, start + n), "image": images, "width": np.full(n, size), "height": np.full(n, size),
            "age": age, "age_bin": age_to_bin(age), "gender": rng.integers(0, 2, n), "ethnicity": rng.integers(0, 5, n),
            "source": ["bench"] * n, "split": ["train"] * n}
    schema = pa.schema(CORE_FIELDS)
    pq.write_table(pa.table({f.name: pa.array(cols[f.name], f.type) for f in CORE_FIELDS}, schema=schema), path)


def make_dataset(folder: str, rows: int, size: int, per_file: int = 256) -> None:
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"part-{i:06d}.parquet"), s, min(per_file, rows - s), size, i)
            for i, s in enumerate(range(0, rows, per_file))]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_make_part, jobs))


def _memory_source(cfg, device):
    import torch

    b, size = cfg.worker_batch(), cfg.image_size
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).to(device),
             {"age": (torch.rand(b, generator=g) * 85).to(device),
              "age_bin": torch.randint(0, 9, (b,), generator=g).to(device),
              "gender": torch.randint(0, 2, (b,), generator=g).to(device),
              "ethnicity": torch.randint(0, 5, (b,), generator=g).to(device)},
             torch.zeros(b, dtype=torch.int8, device=device)) for _ in range(4)]
    i = 0
    while True:
        yield pool[i % 4]
        i += 1


def _time_path(path: str, cfg, steps: int, warmup: int, session) -> dict[str, float]:
    """img/s over the timed steps, warm-up seconds and input-wait share of `train.train_step` fed by `path`."""
    import torch

    from synthfar_ray.model import MultiTaskNet
    from synthfar_ray.precision import device_precision
    from synthfar_ray.train import WorkerState, optimizer_for, phases_of, prepare_net, train_step
    from synthfar_ray.train_data import BatchStream
    from synthfar_ray.transforms import BatchAugment

    device = session.device()
    precision = device_precision(cfg.amp, cfg.channels_last, device)
    torch.manual_seed(0)
    model, net = prepare_net(MultiTaskNet(cfg.model.backbone, None, cfg.model.age_mode), device, precision, cfg.compile,
                             session)
    w = WorkerState(cfg, 0, 1, device, precision, model, net, None)
    phase = phases_of(cfg)[0]
    opt, sched, scaler = optimizer_for(w, phase, 0)
    augment = BatchAugment() if cfg.augment and (cfg.augment_on == "device" or cfg.decode_on == "worker") else None
    if path == "memory":
        source = _memory_source(cfg, device)
    else:
        stream = BatchStream(session.dataset("real"), cfg.worker_batch(), cfg, 0, device, cfg.center_crop)
        source = (stream.take(cfg.worker_batch()) for _ in iter(int, 1))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    for _ in range(warmup):
        train_step(w, next(source), augment, opt, sched, scaler, phase.weights)
    sync()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(source)
        wait += time.perf_counter() - t
        train_step(w, batch, augment, opt, sched, scaler, phase.weights)
    sync()
    seconds = time.perf_counter() - t0
    return {"ips": steps * cfg.worker_batch() / seconds, "warmup_s": t0 - t_start, "wait": wait / seconds,
            "precision": f"{precision.amp}{'+scaler' if precision.scaler else ''}"
                         f"{' channels_last' if precision.channels_last else ''}{' compiled' if cfg.compile else ''}"}


def bench_loop(config: dict) -> dict:
    from synthfar_ray.train import session_of

    results: dict[str, dict] = {}
    for name in ("memory", "data", "memory2"):
        r = _time_path(name.rstrip("2"), config["cfg"], config["steps"], config["warmup"], session_of(config))
        results[name] = r
        print(f"[bench] {name}: {r['ips']:.1f} img/s (warm-up {r['warmup_s']:.1f} s, input wait {r['wait']:.0%})",
              flush=True)
    return results


def data_ratio(res: dict[str, dict]) -> float:
    """The data path's img/s over the mean of the memory path's, timed before and after it."""
    return res["data"]["ips"] / ((res["memory"]["ips"] + res["memory2"]["ips"]) / 2)


# What a config's train section may set for the benchmark: everything that shapes the step and its input.
BENCH_KEYS = ("model", "image_size", "batch_size", "amp", "channels_last", "compile", "augment", "augment_on",
              "decode_on", "shuffle_buffer", "data_cpus", "cpus_per_worker", "center_crop", "train_cache_mb", "executor")
DEMO_CONFIG = "configs/pipeline/demo.yaml"
GPU_CONFIG = "configs/experiments/a_synthetic_only.yaml"


def config_section(path: str) -> dict:
    """The train settings of a TrainConfig YAML, or of a pipeline YAML's `train:` section."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "name" not in data and isinstance(data.get("train"), dict):
        data = data["train"]
    return {k: v for k, v in data.items() if k in BENCH_KEYS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"train settings to measure (default {DEMO_CONFIG}; --gpu: {GPU_CONFIG})")
    p.add_argument("--gpu", action="store_true", help="one GPU, ResNet-50 at batch 256 (experiment a's settings)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny images: checks that it runs")
    p.add_argument("--source-size", type=int, help="side of the stored JPEGs (default: the config's image_size; "
                                                   "--gpu: 512, the generated images)")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--data", help="an existing dataset folder (its split 'train' rows are used)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="N runs in turn (each a fresh Train run: memory, then data); prints every run's ratio and "
                        "their median")
    p.add_argument("--json", help="write the results here too (the last run's, with every run's ratio)")
    p.add_argument("overrides", nargs="*", help="key=value TrainConfig overrides (batch_size=64, decode_on=worker ...)")
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    section = config_section(args.config or os.path.join(root, GPU_CONFIG if args.gpu else DEMO_CONFIG))
    if args.gpu:
        section.update(batch_size=256, use_gpu=True)
        section["model"] = {**section.get("model", {}), "pretrained": None}
    else:
        section.update(use_gpu=False)
    if args.smoke:
        section.update(image_size=32, batch_size=8, model={"backbone": "tiny"}, compile=False)
    # CPU: 100 steps (~5 s a path at the demo's settings): with 30 (~1.5 s) one run's ratio moved by 0.3.
    steps = args.steps or (3 if args.smoke else 40 if args.gpu else 100)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10 if args.gpu else 5)

    import ray

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from synthfar_ray.config import apply_overrides
    from synthfar_ray.train import TrainConfig, data_config, executor_of, fit_in_task
    from synthfar_ray.train_data import build_datasets

    tmp = tempfile.mkdtemp(prefix="synthfar-bench-")
    data = args.data or os.path.join(tmp, "data")
    base = dict(name="bench", storage_path=os.path.join(tmp, "runs"), plan="real", real=data, val_source="none",
                num_workers=1, model={"backbone": "tiny"})
    cfg = TrainConfig(**apply_overrides({**base, **section}, args.overrides))
    source = args.source_size or (48 if args.smoke else 512 if args.gpu else cfg.image_size)
    if args.data is None:
        rows = (steps + warmup + 2) * cfg.batch_size  # the timed steps never start a second pass
        t0 = time.time()
        make_dataset(data, rows, source, per_file=64 if args.smoke else 256)
        print(f"[bench] made {rows} {source}px JPEG rows in {time.time() - t0:.1f} s")
    # RAY_ADDRESS's cluster, else a local one with the settings `synthfar train` gives its local clusters
    # (the warm worker pool): with Ray's defaults, idle workers die after 1 s and the data path's read and
    # decode tasks kept starting new processes beside the step (ratio 0.44-0.70, median 0.60, against 0.72-0.75 with the pool; 2026-12-07).
    from synthfar_ray.raycluster import ensure_ray, worker_pool_line

    ensure_ray(address="local", include_dashboard=False)
    print(f"[bench] {worker_pool_line()}")
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpu = bool(cfg.use_gpu)
    executor = executor_of(cfg, None)
    print(f"[bench] executor {executor}")
    ratios = []
    for i in range(max(1, args.repeat)):
        loop_config = {"cfg": cfg, "steps": steps, "warmup": warmup}
        if executor == "task":
            res = fit_in_task(cfg.model_copy(update={"name": f"bench-{i}"}), build_datasets(cfg, {"real"}), gpu,
                              loop=bench_loop, loop_config=loop_config)
        else:
            trainer = TorchTrainer(
                bench_loop, train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={
                    "CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
                run_config=RunConfig(name=f"bench-{i}", storage_path=os.path.join(tmp, "runs")),
                datasets=build_datasets(cfg, {"real"}), dataset_config=data_config(cfg, {"real"}))
            res = trainer.fit().return_value
        mem = res["memory"]
        ratios.append(data_ratio(res))
        print(f"\n{cfg.model.backbone}  input {cfg.image_size}px from {source}px JPEG  batch {cfg.batch_size}  "
              f"{'GPU' if gpu else 'CPU'} {mem['precision']}  decode_on {cfg.decode_on}  shuffle_buffer "
              f"{cfg.shuffle_buffer}  augment {cfg.augment and cfg.augment_on}  {steps} timed steps after {warmup}"
              + (f"  (run {i + 1} of {args.repeat})" if args.repeat > 1 else ""))
        print(f"{'path':>8} {'img/s':>10} {'wait':>6}")
        for k in ("memory", "data", "memory2"):
            print(f"{k:>8} {res[k]['ips']:>10.1f} {res[k]['wait']:>6.0%}")
        print(f"ratio data/memory: {ratios[-1]:.2f}  (memory: the mean of memory and memory2)")
    if len(ratios) > 1:
        print(f"median ratio over {len(ratios)} runs: {statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in sorted(ratios))})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "source_size": source, "gpu": gpu, "executor": executor, "steps": steps,
                       "warmup": warmup,
                       "train": section, **res, "ratio": ratios[-1], "ratios": ratios}, f, indent=2)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
