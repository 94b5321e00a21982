"""Generation throughput: the Ray Data job against a plain diffusers loop, same config, same run.

    python bench/generate.py                 # CPU: tiny preset (configs/generate/quickstart.yaml), 128 images, 1 actor
    python bench/generate.py --repeat 3      # the same, three plain/Ray pairs in turn: each pair's ratios and their medians
    python bench/generate.py --smoke         # a few seconds of work: 8 images of 32x32, 2 steps (checks the bench runs)
    python bench/generate.py --gpu           # one GPU: sd15-random (SD1.5+ControlNet FLOPs), 512x512, batch 32
    python bench/generate.py --gpu --compile # the same with torch.compile (static shapes, compile cache)
    python bench/generate.py --gpu compute.batch_size=16 num_images=512   # any config override

The plain loop is a fresh process (as the Ray actor is) calling the same FaceGenerator on the same
prompts and poses, batch by batch, after one warm-up batch (images only: no JPEG, no Parquet); on
CPU it gets as many torch threads as the pool's actors have together (`cpu_threads`). The Ray job is
`run_generate` with the config's own compute settings (pool size, CPUs, batch size), writing real Parquet. Ray's steady
throughput is measured on the actors' clocks (each shard's start and end, stamped where it is made:
`GenerateResult.steady_images_per_second`), since shard results reach the driver bunched; its wall
throughput includes actor start-up and model build. Both are printed as ratios to the plain loop: steady
to its timed loop, wall to its build + loop (what a plain script pays after its imports).

With --compile both sides compile (model.compile=true): the plain loop's warm-up batch pays the
compile, which is printed, and fills the compile cache (model.compile_cache_dir) that the Ray actor
on the same node then reads, so its start-up shows the warm-cache cost. Run without and with
--compile to compare eager and compiled throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthfar_ray.config import load_config  # noqa: E402
from synthfar_ray.generate import GenerateConfig, GenerateResult, control_image, prompt_rows, run_generate  # noqa: E402


@dataclass(frozen=True)
class PlainRun:
    """The plain loop's timings: pipeline build, the warm-up batch, the timed loop over all images."""

    images: int
    batch_size: int
    threads: int  # torch threads of the loop's process
    build: float
    warmup: float
    loop: float

    @property
    def rate(self) -> float:
        """Steady img/s: the timed loop alone."""
        return self.images / self.loop

    @property
    def wall_rate(self) -> float:
        """img/s of a plain script after its imports: build, the warm-up batch's extra cost over a
        steady batch (compile, allocator), and the loop; the Ray job's wall counts the same (plus
        its actor's process start and imports)."""
        extra = max(0.0, self.warmup - self.batch_size / self.rate)
        return self.images / (self.build + extra + self.loop)


def plain_loop(cfg: GenerateConfig, device: str | None) -> PlainRun:
    """The diffusers pipeline called in a loop over the config's images at its batch size, after one
    warm-up batch."""
    import torch

    from synthfar_ray.diffusion import FaceGenerator
    from synthfar_ray.poses import PoseFolder

    if device == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    t0 = time.perf_counter()
    gen = FaceGenerator(cfg.model, cfg.sampler, device, batch_size=cfg.compute.batch_size)
    build = time.perf_counter() - t0
    rows = prompt_rows(cfg, range(cfg.num_images))
    s = cfg.sampler
    folder = PoseFolder(cfg.poses.folder, cfg.storage, s.width, s.height) if cfg.poses.folder else None
    poses = [control_image(cfg, r, folder) for r in rows]
    bs = cfg.compute.batch_size

    def call(i: int) -> None:
        chunk = rows[i:i + bs]
        gen.generate([r["prompt"] for r in chunk], [r["negative_prompt"] for r in chunk], poses[i:i + bs],
                     [r["seed"] for r in chunk])

    t0 = time.perf_counter()
    call(0)  # warm-up (kernels, allocator, compile if enabled)
    _sync()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, cfg.num_images, bs):
        call(i)
    _sync()
    loop = time.perf_counter() - t0
    return PlainRun(cfg.num_images, bs, torch.get_num_threads(), build, warmup, loop)


def fresh_plain_loop(cfg: GenerateConfig, device: str | None) -> PlainRun:
    """`plain_loop` in a new process, as the Ray actor starts in one: a second pair's plain build in
    this process would reuse the modules and files the first loaded (0.1-0.6 s instead of 8.3 s on
    2026-12-07), making its wall ratio unfair to Ray. The process exits before Ray starts, so on a
    GPU the actor gets the whole memory."""
    import multiprocessing

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plain_loop, cfg, device).result()


def cpu_threads(cfg: GenerateConfig) -> int:
    """Torch threads of the CPU plain loop: as many as the pool's actors have together (Ray gives an
    actor max(1, floor(cpus_per_actor)) OpenMP threads), so both sides use the same cores."""
    per_actor = max(1, math.floor(cfg.compute.cpus_per_actor))
    return (cfg.compute.num_actors or 1) * per_actor


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_config(mode: str, output: str, overrides: list[str]) -> tuple[str, GenerateConfig]:
    """(config file, config) of a mode: 'gpu', 'cpu' or 'smoke'. The bench sets the size of the run
    (images, shard size, and for smoke the image size and steps) and, on CPU, one actor; the user's
    overrides come last and win."""
    path = "configs/generate/sd15_random_bench.yaml" if mode == "gpu" else "configs/generate/quickstart.yaml"
    sized = {
        "gpu": ["num_images=256"],
        # One actor against a one-thread plain loop: the ratio is what the job adds (Ray Data, JPEG,
        # Parquet, start-up), not how processes share 2 cores; 8 shards, so 7 warm ones are timed.
        "cpu": ["num_images=128", "shard_size=16", "compute.num_actors=1"],
        "smoke": ["num_images=8", "shard_size=2", "sampler.width=32", "sampler.height=32", "sampler.steps=2"],
    }[mode]
    return path, load_config(GenerateConfig, path, [f"output={output}", *sized, *overrides])


def report(plain: PlainRun, result: GenerateResult, began: float) -> tuple[float, float]:
    """Print one plain/Ray pair; return its (steady, wall) ratios. Steady ratio: Ray's actor-side
    steady rate over the plain loop's. Wall ratio: the Ray job's whole run (actor start, imports,
    model build, Parquet) over the plain script's build + loop."""
    steady = result.steady_images_per_second()
    actors = len({r.actor for r in result.shards})
    print(f"plain diffusers loop : {plain.rate:8.3f} img/s  (pipeline build {plain.build:.1f} s, first batch "
          f"{plain.warmup:.1f} s, {plain.threads} torch threads)")
    print(f"plain loop (wall)    : {plain.wall_rate:8.3f} img/s  ({plain.images / plain.wall_rate:.1f} s incl. build)")
    print(f"ray data job (wall)  : {result.images_per_second:8.3f} img/s  ({result.seconds:.1f} s incl. actor start-up)")
    print(f"ray data job (steady): {steady:8.3f} img/s  (actor-side clocks: {len(result.shards)} shards on {actors} actor(s))")
    first = min(r.start for r in result.shards) - began
    print(f"ray start-up         : {first:8.1f} s  (run_generate called -> first shard on the generator: Ray Data, "
          "actor process, imports, model build)")
    print(f"ray wall vs plain steady: {result.images_per_second / plain.rate:.3f}  (how much start-up weighs at this size)")
    ratios = steady / plain.rate, result.images_per_second / plain.wall_rate
    print(f"ratio ray/plain      : steady {ratios[0]:.3f}, wall {ratios[1]:.3f}")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="sd15-random at 512x512 on the GPU(s)")
    mode.add_argument("--smoke", action="store_true", help="tiny and fast: checks that the bench runs, measures nothing")
    ap.add_argument("--compile", action="store_true", help="model.compile=true on both sides (CUDA only)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="N plain/Ray pairs in turn (the plain loop's rate alone moves by ~20%% between runs on a "
                         "small CPU box); prints every pair's ratios and their medians")
    ap.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    args = ap.parse_args()
    name = "gpu" if args.gpu else "smoke" if args.smoke else "cpu"
    overrides = (["model.compile=true"] if args.compile else []) + args.overrides

    with tempfile.TemporaryDirectory(prefix="synthfar-bench-") as tmp:
        path, cfg = bench_config(name, os.path.join(tmp, "synthetic"), overrides)
        c = cfg.compute
        compiled = f"compiled ({cfg.model.compile_mode})" if cfg.model.compile else "eager"
        print(f"config {path} ({name}): {cfg.num_images} images, {cfg.sampler.width}x{cfg.sampler.height}, "
              f"{cfg.sampler.steps} steps, batch {c.batch_size}, shard {cfg.shard_size}, "
              f"model {cfg.model.preset or cfg.model.base} {compiled}, actors {c.num_actors or 'one per GPU'}, "
              f"{c.cpus_per_actor} CPU each")

        pairs = []
        for i in range(max(1, args.repeat)):
            if args.repeat > 1:
                print(f"--- pair {i + 1} of {args.repeat}")
            out = os.path.join(tmp, f"synthetic-{i}")  # a fresh output each time: nothing is resumed
            run_cfg = cfg.model_copy(update={"output": out})
            plain = fresh_plain_loop(run_cfg, "cuda" if args.gpu else "cpu")

            from synthfar_ray.raycluster import ensure_ray, worker_pool_line

            # A cluster named by RAY_ADDRESS, else a fresh local one (not whatever `ray start` left running)
            # with the settings `synthfar generate` gives its local clusters (the warm worker pool).
            ensure_ray(address="local", include_dashboard=False)
            if i == 0:
                print(worker_pool_line())
            began = time.time()  # the actors stamp shards with time.time() on the same host
            pairs.append(report(plain, run_generate(run_cfg), began))
        if len(pairs) > 1:
            steady, wall = (sorted(p[k] for p in pairs) for k in (0, 1))
            print(f"medians over {len(pairs)} pairs: steady {statistics.median(steady):.3f} "
                  f"({', '.join(f'{v:.3f}' for v in steady)}), wall {statistics.median(wall):.3f} "
                  f"({', '.join(f'{v:.3f}' for v in wall)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
