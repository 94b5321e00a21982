"""The experiment matrix at cluster speed: a pipeline's training runs one after another vs several
in flight at once, in the same process, on the same data.

    python bench/pipeline_runs.py                        # the demo's 7 runs (configs/pipeline/demo.yaml)
    python bench/pipeline_runs.py --parallel auto        # as many at once as the cluster holds
    python bench/pipeline_runs.py --smoke                # tiny sizes: checks the bench runs (a test runs it)
    python bench/pipeline_runs.py CONFIG key=value ...   # any pipeline config and overrides

It runs the config's data stages once (generate, ingest, sample: reused when the run folder has them),
then trains every run twice into separate folders: sequentially (parallel_runs 1) and with
`--parallel` (default: the config's parallel_runs, else 2), each run a TorchTrainer with its own
resources. It prints each run's own time and training throughput (images/s seen by the optimiser)
and the wall-clock ratio. Wall times are measured on the driver around the whole train stage,
which is where the user waits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # the per-dataset progress lines drown the table

from synthfar_ray.config import load_config  # noqa: E402
from synthfar_ray.pipeline import (PipelineConfig, plan_stages, run_pipeline,  # noqa: E402
                                   runs_in_flight, runs_to_train, train_runs)

SMOKE = ["generate.num_images=120", "generate.shard_size=60", "standin.num_images=240", "preview=null", "tune=null",
         "train.steps=4", "train.val_every=4", "train.log_every=2", "train.batch_size=8", "train.shuffle_buffer=16",
         "sample.scorer_train.steps=4", "sample.scorer_train.batch_size=8",
         "runs={real_only: {plan: real}, mix_25: {plan: mix, real_subset: 25, mix_ratio: 0.5, use_selection: true}}"]


def timed(name: str, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def train_all(cfg: PipelineConfig, todo: dict, parallel: int, folder: str) -> tuple[float, dict]:
    """(wall seconds, run -> TrainResult) of training every run into `folder`."""
    runs = {name: tcfg.model_copy(update={"storage_path": folder}) for name, tcfg in todo.items()}
    t0 = time.perf_counter()
    done = train_runs(runs, parallel, timed)
    return time.perf_counter() - t0, {name: result for name, (_, result) in done.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/pipeline/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--parallel", default=None, help="runs in flight in the concurrent pass (a number or auto)")
    p.add_argument("--run-dir", default=None, help="reuse this run folder's data stages (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds of work: checks the bench runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = os.path.abspath(args.run_dir or tempfile.mkdtemp(prefix="bench-runs-"))
    overrides = [*(SMOKE if args.smoke else []), *args.overrides, f"run_dir={run_dir}"]
    cfg = load_config(PipelineConfig, args.config, overrides)
    data_cfg = cfg.model_copy(update={"stages": ["generate", "ingest", "sample"]})
    t0 = time.perf_counter()
    data = run_pipeline(data_cfg, args.config)
    print(f"data stages (generate, ingest, sample): {time.perf_counter() - t0:.1f} s -> {run_dir}")

    plan = plan_stages(cfg, args.config)
    todo = runs_to_train(plan, data.selections)
    setting = args.parallel or (cfg.parallel_runs if cfg.parallel_runs != 1 else 2)
    parallel = runs_in_flight(setting if setting == "auto" else int(setting), todo)
    stamp = time.strftime("%H%M%S")
    seq_wall, seq = train_all(cfg, todo, 1, os.path.join(run_dir, f"bench-sequential-{stamp}"))
    par_wall, par = train_all(cfg, todo, parallel, os.path.join(run_dir, f"bench-concurrent-{stamp}"))

    print(f"{len(todo)} runs; concurrent pass: {parallel} in flight ({setting})")
    print(f"{'run':<24} {'steps':>6} {'batch':>6} {'seq s':>8} {'seq img/s':>10} {'conc s':>8} {'conc img/s':>11}")
    for name, tcfg in todo.items():
        a, b = seq[name], par[name]  # img/s: the run's own training throughput (its steps, not start-up)
        print(f"{name:<24} {a.steps:>6} {tcfg.batch_size:>6} {a.seconds:>8.1f} {a.images_per_second:>10.1f} "
              f"{b.seconds:>8.1f} {b.images_per_second:>11.1f}")
    print(f"sequential wall     : {seq_wall:.1f} s (sum of run times {sum(r.seconds for r in seq.values()):.1f} s)")
    print(f"concurrent wall     : {par_wall:.1f} s")
    print(f"ratio concurrent/sequential wall: {par_wall / seq_wall:.3f} (speed-up {seq_wall / par_wall:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
