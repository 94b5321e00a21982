"""What a training run leaves in `<storage_path>/<name>/`, and the rules for coming back to it.

- `checkpoint_<step>/`: model.pt (state_dict) + meta.json (how to rebuild the net; all that evaluate
  and the samplers need) + train_state.pt (optimizer, scheduler, scaler, step, phase: resume).
- `run_config.json`: the config the run was started with. Re-running the name with a config that
  differs in anything that shapes training (lr, plan, data, model, ...) is refused with the keys
  named, instead of silently continuing the old optimizer and schedule; `overwrite=true` starts
  over, `resume=force` continues anyway.
- `result.json`: the outcome, written when the run reaches its budget. A finished run re-run returns
  it unchanged instead of overwriting it with an empty history.
- `tensorboard/`: the training loop's scalars.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from typing import TYPE_CHECKING, Any

from synthfar_ray import storage
from synthfar_ray.config import ConfigError, dump_config
from synthfar_ray.storage import StorageOptions

if TYPE_CHECKING:
    from synthfar_ray.train import TrainConfig

MODEL_FILE, META_FILE, STATE_FILE = "model.pt", "meta.json", "train_state.pt"
RESULT_FILE, RUN_CONFIG_FILE, TENSORBOARD_DIR = "result.json", "run_config.json", "tensorboard"
CHECKPOINT_PREFIX = "checkpoint_"

# Settings that do not change what is learned: a run may resume with other values of these.
OPERATIONAL_KEYS = frozenset({
    "name", "storage_path", "storage", "overwrite", "resume", "log_every", "val_every", "val_batch_size",
    "val_limit", "val_cache_mb", "checkpoint_every", "keep_checkpoints", "num_workers", "use_gpu",
    "cpus_per_worker", "gpus_per_worker", "data_cpus", "failure_max", "val_source", "dist_backend",
    # Layout and compilation change the kernels, not the model or its optimisation.
    "channels_last", "compile",
    # Where decoding and augmentation run does not change what is learned; a bigger budget extends
    # the run (its schedule stretches from the resumed step on).
    "decode_on", "augment_on", "steps", "finetune_steps",
    # How the worker starts (a Train worker group or one task) does not change what it computes.
    "executor",
})


# ---------------------------------------------------------------------------------------------
# The loadable part of a checkpoint


def checkpoint_meta(cfg: TrainConfig, channels_last: bool | None = None) -> dict[str, Any]:
    """What evaluate and the sampling stage need to rebuild the net from a checkpoint alone;
    `channels_last` is the layout the run resolved (precision.py), recorded as a fact of the run."""
    return {"format": 1, "backbone": cfg.model.backbone, "age_mode": cfg.model.age_mode, "image_size": cfg.image_size,
            "center_crop": cfg.center_crop, "synthetic_center_crop": cfg.synthetic_center_crop,
            "channels_last": cfg.channels_last if channels_last is None else channels_last, "run": cfg.name,
            "plan": cfg.plan, "synthetic_heads": list(cfg.model.synthetic_heads), "transfer": list(cfg.model.transfer)}


def save_model(directory: str, model, meta: dict[str, Any]) -> None:
    """model.pt (state_dict) + meta.json (how to rebuild the net) in a local folder. A net trained
    with auxiliary BatchNorms (adapt.py) is saved as the plain net with its real statistics."""
    import torch

    from synthfar_ray.adapt import split_state_dict

    os.makedirs(directory, exist_ok=True)
    plain, _ = split_state_dict(model.state_dict())
    torch.save({k: v.detach().cpu() for k, v in plain.items()}, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def save_training_state(directory: str, model, cfg: TrainConfig, opt, sched, scaler, step: int, phase_name: str,
                        phase_index: int, metrics: dict[str, Any], channels_last: bool | None = None,
                        discriminator=None) -> None:
    """A full checkpoint in a local folder: the loadable model + what resuming needs (with
    adaptation: the synthetic BatchNorm halves and the domain discriminator too)."""
    import torch

    from synthfar_ray.adapt import split_state_dict

    save_model(directory, model, checkpoint_meta(cfg, channels_last) | {"step": step, "phase": phase_name})
    _, synthetic_bn = split_state_dict(model.state_dict())
    adapt = {"synthetic_bn": {k: v.detach().cpu() for k, v in synthetic_bn.items()},
             "discriminator": None if discriminator is None else
             {k: v.detach().cpu() for k, v in discriminator.state_dict().items()}}
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "phase": phase_name, "phase_index": phase_index, "metrics": metrics, "adapt": adapt},
               os.path.join(directory, STATE_FILE))


def load_training_state(directory: str, net, discriminator=None) -> dict[str, Any]:
    """Load a checkpoint folder's weights into `net` (and the adaptation parts); return its training state."""
    import torch

    from synthfar_ray.adapt import join_state_dict

    plain = torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)
    adapt = state.get("adapt") or {}
    net.load_state_dict(join_state_dict(net, plain, adapt.get("synthetic_bn") or {}))
    if discriminator is not None and adapt.get("discriminator") is not None:
        discriminator.load_state_dict(adapt["discriminator"])
    return state


def _checkpoint_folders(run_uri: str, opts: StorageOptions | None) -> list[str]:
    """The checkpoint_* folder names in a run folder, oldest first (the names sort by step)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve_retrying(run_uri, opts)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(CHECKPOINT_PREFIX))


def resolve_checkpoint(uri: str, opts: StorageOptions | None = None) -> str:
    """A checkpoint folder URI, or a run folder (-> its latest checkpoint_* folder)."""
    if storage.exists(storage.join(uri, META_FILE), opts):
        return uri
    ckpts = [c for c in _checkpoint_folders(uri, opts) if storage.exists(storage.join(uri, c, META_FILE), opts)]
    if not ckpts:
        raise FileNotFoundError(f"{uri} is neither a checkpoint (no {META_FILE}) nor a run folder with checkpoints")
    return storage.join(uri, ckpts[-1])


def latest_training_checkpoint(run_uri: str, opts: StorageOptions | None) -> str | None:
    """The newest checkpoint_* folder of a run that holds everything resuming needs, whoever wrote
    it (Ray Train's upload or the task executor's); an upload cut short leaves a folder without
    some of the files, and it is passed over."""
    for name in reversed(_checkpoint_folders(run_uri, opts)):
        uri = storage.join(run_uri, name)
        if all(storage.exists(storage.join(uri, f), opts) for f in (META_FILE, MODEL_FILE, STATE_FILE)):
            return uri
    return None


def upload_checkpoint(local_dir: str, uri: str, opts: StorageOptions | None) -> None:
    """Copy a checkpoint folder to storage through the retrying filesystem, meta.json last: a folder
    with meta.json is a loadable model (resolve_checkpoint), so it must not appear before the weights."""
    names = sorted(os.listdir(local_dir), key=lambda n: n == META_FILE)
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes(storage.join(uri, name), f.read(), opts)


def prune_checkpoints(run_uri: str, keep: int | None, opts: StorageOptions | None) -> None:
    """Delete all but the `keep` newest checkpoint_* folders (None: keep all)."""
    if keep is None:
        return
    for name in _checkpoint_folders(run_uri, opts)[:-keep]:
        storage.delete(storage.join(run_uri, name), opts)


def load_model(checkpoint_uri: str, storage_opts: StorageOptions | None = None):
    """(MultiTaskNet in eval mode on CPU, meta dict) from a checkpoint folder or run folder URI."""
    import torch

    from synthfar_ray.model import MultiTaskNet

    uri = resolve_checkpoint(checkpoint_uri, storage_opts)
    meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE), storage_opts))
    # Checkpoints from before synthetic heads have no such key: the plain net.
    net = MultiTaskNet(meta["backbone"], None, meta["age_mode"], meta.get("synthetic_heads", ()), meta.get("transfer", ()))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, MODEL_FILE), storage_opts)),
                       map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    meta["checkpoint"] = uri
    return net.eval(), meta


# ---------------------------------------------------------------------------------------------
# TensorBoard


def upload_tensorboard(local_dir: str, cfg: TrainConfig) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve_retrying(storage.join(cfg.run_uri, TENSORBOARD_DIR), cfg.storage)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# ---------------------------------------------------------------------------------------------
# Coming back to a run folder


def training_view(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that shape what a run learns (everything but OPERATIONAL_KEYS)."""
    return {k: v for k, v in dump_config(cfg).items() if k not in OPERATIONAL_KEYS}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dumps (nested dicts compared per key)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in config_differences(a, b)]
        elif a != b:
            out.append(key)
    return out


def read_json(uri: str, opts: StorageOptions | None) -> dict[str, Any] | None:
    if not storage.exists(uri, opts):
        return None
    try:
        return json.loads(storage.read_bytes(uri, opts))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri} is not valid JSON ({e}); remove it or run with overwrite=true") from e


def write_json(uri: str, data: dict[str, Any], opts: StorageOptions | None) -> None:
    storage.write_bytes(uri, json.dumps(json_safe(data), indent=2).encode(), opts)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def claim_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Check the run folder against `cfg` before any training; returns the stored result of a run
    that already finished this config (nothing left to do), else None.

    - another config in the folder: ConfigError naming the differing keys (unless resume=force);
    - overwrite=true: the folder is emptied and the run starts over.
    """
    run_uri = cfg.run_uri
    config_uri = storage.join(run_uri, RUN_CONFIG_FILE)
    if cfg.overwrite and storage.exists(run_uri, cfg.storage):
        storage.delete(run_uri, cfg.storage)
    stored = read_json(config_uri, cfg.storage)
    view = training_view(cfg)
    if stored is not None:
        diff = config_differences(stored.get("training", {}), view)
        if diff and cfg.resume != "force":
            raise ConfigError(
                f"run {run_uri} was started with another config ({', '.join(diff)} differ): resuming would continue "
                "its optimizer and schedule. Use another name, overwrite=true to start over, or resume=force")
        result = read_json(storage.join(run_uri, RESULT_FILE), cfg.storage)
        if not diff and result is not None and result.get("finished") and int(result.get("steps", -1)) >= cfg.steps:
            return result
    elif storage.exists(storage.join(run_uri, RESULT_FILE), cfg.storage) and cfg.resume != "force":
        raise ConfigError(f"run {run_uri} exists but has no {RUN_CONFIG_FILE} (made by an older version?): "
                          "use another name, overwrite=true or resume=force")
    write_json(config_uri, {"training": view, "config": dump_config(cfg)}, cfg.storage)
    return None
