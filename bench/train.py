"""Training throughput: the Ray Data ingest path against the same model fed tensors already in
memory, in the same Ray Train worker, same run.

    python bench/train.py                 # CPU: tiny CNN, 64 px from 128 px JPEGs, batch 32
    python bench/train.py --gpu           # one GPU: ResNet-50, 196 px from 512 px JPEGs, bf16,
                                          # channels_last, batch 256

One Ray Train (V2) worker runs three timed loops of the real train step (augment + normalise on the
device, multi-task loss, AdamW, grad clip):
  memory  uint8 batches already on the device (the upper bound: no input pipeline);
  data    Parquet -> Ray Data tasks decode + resize -> get_dataset_shard().iter_torch_batches;
  worker  Parquet -> Ray Data reads JPEG bytes -> the worker decodes (nvJPEG on GPU, else CPU).
Each loop runs --warmup steps first (pipeline start-up, kernels), then --steps timed steps. The
dataset is big enough that no loop cycles it. Prints img/s and the ratio to `memory`.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _time_path(path: str, cfg, steps: int, warmup: int, device) -> tuple[float, float]:
    """(img/s over the timed steps, seconds of warm-up) of the real train step fed by `path`."""
    import ray.train
    import torch

    from synthfar_ray.losses import multitask_loss
    from synthfar_ray.model import MultiTaskNet
    from synthfar_ray.train import amp_settings
    from synthfar_ray.train_data import BatchStream
    from synthfar_ray.transforms import BatchAugment, to_model_input

    amp_dtype, use_scaler = amp_settings(cfg, device.type)
    torch.manual_seed(0)
    model = MultiTaskNet(cfg.model.backbone, None, cfg.model.age_mode).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    augment = BatchAugment() if cfg.augment else None
    b = cfg.batch_size
    if path == "memory":
        g = torch.Generator().manual_seed(0)
        pool = [(torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g).to(device),
                 {"age": (torch.rand(b, generator=g) * 85).to(device),
                  "age_bin": torch.randint(0, 9, (b,), generator=g).to(device),
                  "gender": torch.randint(0, 2, (b,), generator=g).to(device),
                  "ethnicity": torch.randint(0, 5, (b,), generator=g).to(device)}) for _ in range(4)]
        source = (pool[i % 4] for i in range(10**9))
    else:
        shard = ray.train.get_dataset_shard("raw" if path == "worker" else "decoded")
        stream = BatchStream(shard, b, cfg, 0, device, None)
        source = (stream.take(b)[:2] for _ in range(10**9))

    def one_step() -> None:
        images, labels = next(source)
        x = to_model_input(images, augment, channels_last=cfg.channels_last, nhwc=False)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        loss, _ = multitask_loss(out, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    for _ in range(warmup):
        one_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    return steps * b / (time.perf_counter() - t0), t0 - t_start


def bench_loop(config: dict) -> dict:
    import ray.train.torch

    device = ray.train.torch.get_device()
    results: dict[str, float] = {}
    for path in ("memory", "data", "worker"):
        cfg = config["cfg"].model_copy(update={"decode_on": "worker" if path == "worker" else "data"})
        ips, warm = _time_path(path, cfg, config["steps"], config["warmup"], device)
        results[path], results[f"{path}_warmup_s"] = ips, warm
        print(f"[bench] {path}: {ips:.1f} img/s (warm-up {warm:.1f} s)", flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="ResNet-50, 196 px, bf16, channels_last, batch 256")
    p.add_argument("--backbone")
    p.add_argument("--size", type=int, help="model input side")
    p.add_argument("--source-size", type=int, help="side of the stored JPEGs")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--data", help="an existing dataset folder (split 'train' rows are used)")
    p.add_argument("--data-cpus", type=float, default=1.0, help="CPUs per Ray Data decode task")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    gpu = args.gpu
    backbone = args.backbone or ("resnet50" if gpu else "tiny")
    size = args.size or (196 if gpu else 64)
    source = args.source_size or (512 if gpu else 128)
    batch = args.batch or (256 if gpu else 32)
    steps = args.steps or (40 if gpu else 30)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 5)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from synthfar_ray.train import TrainConfig
    from synthfar_ray.train_data import decode_rows, read_rows

    tmp = tempfile.mkdtemp(prefix="synthfar-bench-")
    data = args.data
    if data is None:
        data = os.path.join(tmp, "data")
        rows = (steps + warmup + 2) * batch
        t0 = time.time()
        make_dataset(data, rows, source)
        print(f"[bench] made {rows} {source}px JPEG rows in {time.time() - t0:.1f} s")
    ray.init(include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TrainConfig(name="bench", storage_path=os.path.join(tmp, "runs"), plan="real", real=data,
                      model={"backbone": backbone}, image_size=size, batch_size=batch, amp="bf16" if gpu else "none",
                      channels_last=gpu, augment=True, use_gpu=gpu, data_cpus=args.data_cpus, shuffle_buffer=0)
    base = read_rows(data, cfg.storage, ("train",), num_cpus=cfg.data_cpus)
    datasets = {"decoded": decode_rows(base, cfg, None, False, 0),
                "raw": decode_rows(base, cfg.model_copy(update={"decode_on": "worker"}), None, False, 0)}
    trainer = TorchTrainer(
        bench_loop, train_loop_config={"cfg": cfg, "steps": steps, "warmup": warmup},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name="bench", storage_path=os.path.join(tmp, "runs")), datasets=datasets)
    res = trainer.fit().return_value
    mem = res["memory"]
    print(f"\n{'backbone':>10} {backbone}  input {size}px from {source}px JPEG  batch {batch}  "
          f"{'GPU bf16 channels_last' if gpu else 'CPU fp32'}  {steps} timed steps after {warmup}")
    print(f"{'path':>10} {'img/s':>10} {'vs memory':>10}")
    for k in ("memory", "data", "worker"):
        print(f"{k:>10} {res[k]:>10.1f} {res[k] / mem:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backbone": backbone, "size": size, "source_size": source, "batch": batch, "gpu": gpu,
                       "steps": steps, "warmup": warmup, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
