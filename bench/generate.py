"""Generation throughput: the Ray Data job against a plain diffusers loop, same config, same run.

    python bench/generate.py                 # CPU: tiny preset (configs/generate/quickstart.yaml)
    python bench/generate.py --gpu           # one GPU: sd15-random (SD1.5+ControlNet FLOPs), batch 32

The plain loop is one process calling the same FaceGenerator on the same prompts and poses, batch by
batch (images only: no JPEG, no Parquet). The Ray job is `run_generate` with one actor per GPU (one
actor on CPU), writing real Parquet. Both print img/s; the ratio Ray/plain is the figure of merit.
"Steady" Ray throughput is measured between the first and the last shard arriving, so actor start-up
and model build (paid once per job) are reported apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthfar_ray.config import load_config  # noqa: E402
from synthfar_ray.generate import GenerateConfig, prompt_rows, run_generate  # noqa: E402


def plain_loop(cfg: GenerateConfig, num_images: int, device: str | None) -> tuple[float, float]:
    """(build seconds, img/s) of the diffusers pipeline called in a loop, after one warm-up batch."""
    from synthfar_ray.diffusion import FaceGenerator
    from synthfar_ray.poses import HeadPose, render_pose

    t0 = time.perf_counter()
    gen = FaceGenerator(cfg.model, cfg.sampler, device)
    build = time.perf_counter() - t0
    rows = prompt_rows(cfg, range(num_images))
    s, bs = cfg.sampler, cfg.compute.batch_size
    poses = [render_pose(HeadPose(**{k: r[f"pose_{k}"] for k in ("yaw", "pitch", "roll", "scale", "offset_x", "offset_y")}),
                         s.width, s.height) for r in rows]

    def call(i: int) -> None:
        chunk = rows[i:i + bs]
        gen([r["prompt"] for r in chunk], [r["negative_prompt"] for r in chunk], poses[i:i + bs], [r["seed"] for r in chunk])

    call(0)  # warm-up (kernels, allocator, compile if enabled)
    _sync()
    t0 = time.perf_counter()
    for i in range(0, num_images, bs):
        call(i)
    _sync()
    return build, num_images / (time.perf_counter() - t0)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="sd15-random at 512x512 on the GPU(s)")
    ap.add_argument("--config", default=None, help="generate config (default: quickstart, or the sd15-random bench config with --gpu)")
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    config = args.config or ("configs/generate/sd15_random_bench.yaml" if args.gpu else "configs/generate/quickstart.yaml")
    n = args.num_images or (256 if args.gpu else 32)
    out = tempfile.mkdtemp(prefix="synthfar-bench-")
    overrides = [f"output={out}/synthetic", f"num_images={n}", *args.overrides]
    if args.batch_size:
        overrides.append(f"compute.batch_size={args.batch_size}")
    if not args.gpu:
        # One actor owning both cores, like the plain loop: compares the job's overhead, not thread counts.
        overrides += ["compute.num_actors=1", "compute.cpus_per_actor=2", f"shard_size={max(4, n // 4)}"]
    cfg = load_config(GenerateConfig, config, overrides)
    print(f"config {config}: {n} images, {cfg.sampler.width}x{cfg.sampler.height}, {cfg.sampler.steps} steps, "
          f"batch {cfg.compute.batch_size}, model {cfg.model.preset or cfg.model.base}")

    build, plain = plain_loop(cfg, n, "cuda" if args.gpu else "cpu")
    print(f"plain diffusers loop : {plain:8.3f} img/s  (pipeline build {build:.1f} s)")

    import ray

    ray.init(num_cpus=None if args.gpu else 2, include_dashboard=False)
    result = run_generate(cfg)
    times = result.shard_times
    steady = (sum(k for _, k in times[1:]) / (times[-1][0] - times[0][0])) if len(times) > 1 else float("nan")
    print(f"ray data job (wall)  : {result.images_per_second:8.3f} img/s  ({result.seconds:.1f} s incl. actor start-up)")
    print(f"ray data job (steady): {steady:8.3f} img/s  (first shard at {times[0][0]:.1f} s)")
    print(f"ratio ray/plain      : wall {result.images_per_second / plain:.3f}, steady {steady / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
