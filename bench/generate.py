"""Generation throughput: the Ray Data job against a plain diffusers loop, same config, same run.

    python bench/generate.py                 # CPU: tiny preset (configs/generate/quickstart.yaml), 32 images
    python bench/generate.py --smoke         # a few seconds of work: 8 images of 32x32, 2 steps (checks the bench runs)
    python bench/generate.py --gpu           # one GPU: sd15-random (SD1.5+ControlNet FLOPs), 512x512, batch 32
    python bench/generate.py --gpu compute.batch_size=16 num_images=512   # any config override

The plain loop is one process calling the same FaceGenerator on the same prompts and poses, batch by
batch, after one warm-up batch (images only: no JPEG, no Parquet). The Ray job is `run_generate` with
the config's own compute settings (pool size, CPUs, batch size), writing real Parquet. Ray's steady
throughput is measured on the actors' clocks (each shard's start and end, stamped where it is made:
`GenerateResult.steady_images_per_second`), since shard results reach the driver bunched; its wall
throughput includes actor start-up and model build. Both are printed as ratios to the plain loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthfar_ray.config import load_config  # noqa: E402
from synthfar_ray.generate import GenerateConfig, GenerateResult, control_image, prompt_rows, run_generate  # noqa: E402


def plain_loop(cfg: GenerateConfig, device: str | None) -> tuple[float, float]:
    """(pipeline build seconds, img/s) of the diffusers pipeline called in a loop over the config's
    images at its batch size, after one warm-up batch."""
    from synthfar_ray.diffusion import FaceGenerator
    from synthfar_ray.poses import PoseFolder

    t0 = time.perf_counter()
    gen = FaceGenerator(cfg.model, cfg.sampler, device)
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

    call(0)  # warm-up (kernels, allocator, compile if enabled)
    _sync()
    t0 = time.perf_counter()
    for i in range(0, cfg.num_images, bs):
        call(i)
    _sync()
    rate = cfg.num_images / (time.perf_counter() - t0)
    del gen
    _free_gpu_memory()  # the Ray actor needs the GPU next
    return build, rate


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_config(mode: str, output: str, overrides: list[str]) -> tuple[str, GenerateConfig]:
    """(config file, config) of a mode: 'gpu', 'cpu' or 'smoke'. The bench sets the size of the run
    (images, shard size, and for smoke the image size and steps), never compute.*; the user's
    overrides come last and win."""
    path = "configs/generate/sd15_random_bench.yaml" if mode == "gpu" else "configs/generate/quickstart.yaml"
    sized = {
        "gpu": ["num_images=256"],
        # Several shards per actor, so each actor has warm shards to time.
        "cpu": ["num_images=32", "shard_size=4"],
        "smoke": ["num_images=8", "shard_size=2", "sampler.width=32", "sampler.height=32", "sampler.steps=2"],
    }[mode]
    return path, load_config(GenerateConfig, path, [f"output={output}", *sized, *overrides])


def report(plain: float, build: float, result: GenerateResult) -> None:
    steady = result.steady_images_per_second()
    actors = len({r.actor for r in result.shards})
    import torch

    print(f"plain diffusers loop : {plain:8.3f} img/s  (pipeline build {build:.1f} s, {torch.get_num_threads()} torch threads)")
    print(f"ray data job (wall)  : {result.images_per_second:8.3f} img/s  ({result.seconds:.1f} s incl. actor start-up)")
    print(f"ray data job (steady): {steady:8.3f} img/s  (actor-side clocks: {len(result.shards)} shards on {actors} actor(s))")
    print(f"ratio ray/plain      : steady {steady / plain:.3f}, wall {result.images_per_second / plain:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="sd15-random at 512x512 on the GPU(s)")
    mode.add_argument("--smoke", action="store_true", help="tiny and fast: checks that the bench runs, measures nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    args = ap.parse_args()
    name = "gpu" if args.gpu else "smoke" if args.smoke else "cpu"

    with tempfile.TemporaryDirectory(prefix="synthfar-bench-") as tmp:
        path, cfg = bench_config(name, os.path.join(tmp, "synthetic"), args.overrides)
        c = cfg.compute
        print(f"config {path} ({name}): {cfg.num_images} images, {cfg.sampler.width}x{cfg.sampler.height}, "
              f"{cfg.sampler.steps} steps, batch {c.batch_size}, shard {cfg.shard_size}, "
              f"model {cfg.model.preset or cfg.model.base}, actors {c.num_actors or 'one per GPU'}, "
              f"{c.cpus_per_actor} CPU each")

        build, plain = plain_loop(cfg, "cuda" if args.gpu else "cpu")

        import ray

        if not ray.is_initialized():
            # A cluster named by RAY_ADDRESS, else a fresh local one (not whatever `ray start` left running).
            ray.init() if os.environ.get("RAY_ADDRESS") else ray.init(address="local", include_dashboard=False)
        report(plain, build, run_generate(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
