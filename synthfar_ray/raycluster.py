"""The one home of the project's Ray helpers: connecting, what the cluster has, actor-pool sizing.

Stages call these instead of `ray.init()` / `ray.cluster_resources()` of their own, so every stage
connects the same way (an existing cluster, `RAY_ADDRESS`, or a local one) and sizes its pools by the
same rule.
"""

from __future__ import annotations

import logging

from synthfar_ray.errors import UserError

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to Ray if this process is not connected yet (RAY_ADDRESS, a running head, or local)."""
    import ray

    if not ray.is_initialized():
        ray.init()


def cluster_gpus() -> float:
    import ray

    ensure_ray()
    return float(ray.cluster_resources().get("GPU", 0))


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
