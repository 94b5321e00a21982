"""The one home of the project's Ray helpers: connecting, what the cluster has, actor-pool sizing.

Stages call these instead of `ray.init()` / `ray.cluster_resources()` of their own, so every stage
connects the same way (an existing cluster, `RAY_ADDRESS`, or a local one) and sizes its pools by the
same rule.

"What the cluster has" means what it has or can get: on an autoscaling cluster (`ray up`), GPU
workers start from zero, so live resources would say "no GPU" while the node types say otherwise.
Before a stage launches actors, Train workers or trials it calls `check_request`, so a request no
node can ever meet fails at once instead of pending forever.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from synthfar_ray.errors import UserError, first_line

logger = logging.getLogger(__name__)


def task_error_cause(error: BaseException) -> BaseException:
    """What a Ray task or actor raised, not Ray's wrapper around it (`RayTaskError.cause`).

    Our own `UserError` keeps only its first line: Ray Data appends its retry advice to the message
    of an error raised in a map task, and the CLI prints a user error as one line. Anything else
    comes back as raised (its traceback is for a bug report)."""
    cause = getattr(error, "cause", None)
    if not isinstance(cause, BaseException):
        return error
    if isinstance(cause, UserError):
        line = first_line(cause)
        if str(cause) != line:
            cause = copy.copy(cause)  # no assumption about the subclass's constructor
            cause.args = (line,)
    return cause


# Ray keeps at most num_cpus idle worker processes and kills the others after 1 s idle. A Ray Train run
# starts about seven short-lived actors (controller, worker, coordinators) and Ray Data runs its
# fractional-CPU tasks beside them, so on a small node every run re-started most of its processes and
# re-imported torch, pyarrow and Ray Train in each. Keeping more idle workers alive lets the next run's
# actors and tasks start in warm processes: a short mix run on a warm 4-CPU local cluster cost 70-83
# machine CPU-s with Ray's defaults and 37-48 with a pool of 8 (2026-12-07, 2 cores, tiny net, 2 steps;
# ~21 instead of ~19 worker processes). An idle worker is not free (0.7-1.4 % of a core each, measured
# under load): up to the soft limit they stay as long as the cluster does, and any beyond it go after
# 2 minutes idle (runs of one pipeline, sweep or test follow each other within seconds). These apply
# to the clusters this process (and its children) starts; a running cluster keeps its own settings.
WARM_POOL_MIN_WORKERS = 8
WARM_POOL_IDLE_MS = 120_000
POOL_VARS = ("RAY_num_workers_soft_limit", "RAY_idle_worker_killing_time_threshold_ms")  # the pool's two settings


def warm_worker_pool_env() -> None:
    """Set the RAY_* variables (Ray's system config) that keep a local cluster's idle workers for reuse
    in os.environ, without overriding what the user set, before a local cluster starts."""
    settings = {POOL_VARS[0]: str(max(WARM_POOL_MIN_WORKERS, os.cpu_count() or 1)),
                POOL_VARS[1]: str(WARM_POOL_IDLE_MS),
                # A local cluster is never preempted: Ray Train's spot-preemption watcher is one more
                # actor process per training run.
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                # Ray's log monitor re-globs the session's log folder on every pass (~10 a second) until
                # it holds 1,000 files, then every 0.5 s; a test cluster collects hundreds (one or two per
                # worker process), and its log monitors took 4.8 % of the machine's CPU during
                # `make test`. 0 means every 0.5 s from the start: a new worker's first lines reach the
                # driver up to 0.5 s later.
                "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}
    for key, value in settings.items():
        os.environ.setdefault(key, value)


def worker_pool_line() -> str:
    """How local clusters this process starts keep idle workers (the benchmarks print it)."""
    limit = os.environ.get(POOL_VARS[0], "Ray's default (CPU count)")
    idle = os.environ.get(POOL_VARS[1])
    return f"worker pool: soft limit {limit}, idle workers beyond it killed after " + (
        f"{int(idle) / 1000:g} s" if idle else "Ray's default (1 s)")


@contextlib.contextmanager
def restoring_sigint_handler() -> Iterator[None]:
    """Around `TorchTrainer.fit()`: put back the SIGINT handler that was there before.

    In a process's main thread, Ray Train V2 installs a SIGINT handler whose closure holds the run's
    TrainController handle and never removes it, so the controller actor (~700 MB resident, with its
    DatasetManager and SplitCoordinators) outlives the run for as long as the calling process does:
    a pipeline's training task kept its last run's controller alive in the idle worker that ran it
    (seven controllers alive at once in one `make test` run). Restoring the handler drops the last
    reference, and Ray stops the actors."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ensure_ray(**local_options: Any) -> None:
    """Connect to Ray if this process is not connected yet (RAY_ADDRESS, a running head, or local;
    a local cluster gets the warm worker pool). `local_options` go to `ray.init` when no RAY_ADDRESS
    is set (the benchmarks: `address="local"`, no dashboard)."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            warm_worker_pool_env()
            ray.init(**local_options)


def cluster_gpus() -> float:
    """GPUs the cluster has or can get: live ones plus what the autoscaler's node types may add."""
    return capacity("GPU")


def capacity(key: str, shapes: list[NodeShape] | None = None) -> float:
    """The most of resource `key` the cluster can hold at once (live nodes + autoscaler max_workers)."""
    shapes = node_shapes() if shapes is None else shapes
    return sum(s.count * s.resources.get(key, 0.0) for s in shapes)


def use_gpu(setting: bool | None, what: str = "use_gpu") -> bool:
    """The `use_gpu` a stage should run with: the setting, or (None) whether the cluster has GPUs.
    `True` on a cluster without GPUs is an error naming the setting, not a hang."""
    has = cluster_gpus() > 0
    if setting and not has:
        raise UserError(f"{what} is true but the Ray cluster has no GPU")
    return has if setting is None else bool(setting)


def actor_pool(num_actors: int | None, gpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor) of a Ray Data actor pool: explicit settings win; by default one
    actor per GPU (1 GPU each) on a GPU cluster, and one CPU actor otherwise."""
    gpus = cluster_gpus()
    per = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if num_actors is not None:
        return int(num_actors), float(per)
    if per > 0:
        return max(1, int(gpus // per)), float(per)
    return 1, 0.0


# ---------------------------------------------------------------------------------------------
# What the cluster can provide: live nodes, plus the node types its autoscaler may add

@dataclass(frozen=True)
class NodeShape:
    """One kind of node: a live node, or a worker type of the autoscaler's config."""

    name: str  # "node 10.0.0.5" (live) or the node type's name
    resources: dict[str, float]
    count: int  # live nodes of this shape, or the type's max_workers
    live: bool


def _schedulable(resources: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items()
            if not k.startswith("node:") and k != "object_store_memory" and not k.startswith("accelerator_type:")}


def autoscaler_config() -> dict | None:
    """The cluster config of the autoscaler that runs this cluster, or None (no autoscaler, or its
    config cannot be read from this machine).

    The v1 monitor publishes its pid in the GCS status it writes every few seconds; its command
    line names the config (`--autoscaling-config=~/ray_bootstrap_config.yaml` after `ray up`).
    Job drivers run on the head, where that file is, so `ray job submit` jobs always find it."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    try:
        pid = int(json.loads(raw)["monitor_pid"])
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, KeyError, TypeError, ValueError):
        return None
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
    if path is None and "--autoscaling-config" in args:
        path = args[args.index("--autoscaling-config") + 1]
    if not path:
        return None
    try:
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError):
        logger.warning("cannot read the autoscaler's config %s; checking requests against live nodes only", path)
        return None
    return config if isinstance(config, dict) and config.get("available_node_types") else None


def node_shapes() -> list[NodeShape]:
    """Every shape of node this cluster has or can get: the live nodes, then the autoscaler's worker
    types (those it may launch, max_workers > 0) with their declared resources."""
    import ray

    ensure_ray()
    live: dict[tuple, NodeShape] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = _schedulable(node.get("Resources") or {})
        key = tuple(sorted(res.items()))
        prev = live.get(key)
        live[key] = NodeShape(prev.name if prev else f"node {node.get('NodeManagerAddress')}", res,
                              (prev.count if prev else 0) + 1, True)
    shapes = list(live.values())
    config = autoscaler_config()
    if config:
        head = config.get("head_node_type")
        for name, spec in config["available_node_types"].items():
            count = int(spec.get("max_workers", 0) or 0)
            if name == head or count <= 0:
                continue
            if not spec.get("resources"):
                logger.warning("node type %s declares no resources; requests are not checked against it", name)
                continue
            shapes.append(NodeShape(name, _schedulable(spec["resources"]), count, False))
    return shapes


def _fits(bundle: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in resources.items())


def check_request(what: str, bundle: Mapping[str, float], count: int = 1, *, together: bool = False,
                  shapes: list[NodeShape] | None = None) -> None:
    """Fail at once, in one line, if no node this cluster has or can get fits `bundle` (what one
    actor / worker / task of `what` asks for); with `together` (a placement group: Train workers),
    also if the cluster can never hold `count` of them at once. A bundle that only a node type the
    autoscaler has not launched yet fits is logged as waiting for it, so a pending stage says why."""
    bundle = {k: float(v) for k, v in bundle.items() if v}
    if not bundle:
        return
    shapes = node_shapes() if shapes is None else shapes
    fitting = [s for s in shapes if _fits(bundle, s.resources)]
    if not fitting:
        raise UserError(_never_fits(what, bundle, shapes))
    if together and count > 1:
        room = sum(s.count * min(int(s.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for s in fitting)
        if room < count:
            raise UserError(f"{what} needs {count} x {{{_fmt(bundle)}}} at once, but every node this cluster has or "
                            f"can add holds {room} of them")
    if not any(s.live for s in fitting):
        logger.warning("%s: no live node has {%s}; waiting for the autoscaler to add a %s node", what, _fmt(bundle),
                       " or ".join(s.name for s in fitting))


def _never_fits(what: str, bundle: Mapping[str, float], shapes: list[NodeShape]) -> str:
    if not shapes:
        return f"{what} asks for {{{_fmt(bundle)}}}, but the Ray cluster has no nodes"
    for key, amount in bundle.items():
        largest = max(shapes, key=lambda s: s.resources.get(key, 0.0))
        have = largest.resources.get(key, 0.0)
        if have + 1e-9 < amount:
            return (f"{what} asks for {key}: {amount:g}, but the largest node ({largest.name}) has {key}: {have:g}; "
                    f"no node this cluster has or can add fits it")
    return (f"{what} asks for {{{_fmt(bundle)}}} on one node, but no node this cluster has or can add has all of it "
            f"(nodes: {'; '.join(f'{s.name} {{{_fmt(s.resources)}}}' for s in shapes)})")
