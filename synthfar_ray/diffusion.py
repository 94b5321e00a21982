"""Stable Diffusion 1.5 + OpenPose ControlNet face generator.

`build_pipeline` loads a real model (hub id, local diffusers folder, or a single-file
`.safetensors`/`.ckpt` checkpoint such as the paper's CivitAI "Humans" fine-tune) or builds a preset
with random weights offline (`tiny-random` for CPU tests and the laptop demo, `sd15-random` with
SD1.5's exact shapes for GPU benchmarks). `FaceGenerator` turns (prompt, negative prompt, pose
image, seed) rows into uint8 images, with A1111-weighted prompts of any length.

A model reference is a local path when it exists, is absolute, starts with ./ ../ or ~, or names a
checkpoint file (.safetensors, .ckpt, .pt, .pth, .bin); anything else is a hub id. Local paths are
made absolute when the config is validated (`ModelRef`), and `check_model_paths` lets a driver
refuse a missing one before it starts any worker.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import AfterValidator, Field, field_validator

from synthfar_ray.config import StrictModel
from synthfar_ray.errors import UserError
from synthfar_ray.paths import absolute_location
from synthfar_ray.prompt_weighting import chunks_needed, encode_tokenized, tokenize_weighted

if TYPE_CHECKING:  # torch is imported where it runs, so `import synthfar_ray.generate` stays light
    import torch

logger = logging.getLogger(__name__)

# The paper's base model is a CivitAI single file ("Humans Reloaded"): point `base` at that file and
# `base_config` at this id (or a local copy of it) to load it; this id itself is plain SD1.5.
REAL_BASE_DEFAULT = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REAL_CONTROLNET_DEFAULT = "lllyasviel/control_v11p_sd15_openpose"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# DPM++ 2M Karras, as in the paper. Applied with from_config so it overrides whatever scheduler a
# loaded model ships with, while keeping its training settings (prediction type, train steps).
SCHEDULER_SETTINGS = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    use_karras_sigmas=True,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
)


def is_local_model_ref(ref: str) -> bool:
    """A local path (it exists, is absolute, starts with ./ ../ ~, or names a checkpoint file);
    otherwise a hub id such as `owner/name`."""
    return (os.path.exists(ref) or os.path.isabs(ref) or ref.startswith(("./", "../", "~"))
            or ref.lower().endswith(SINGLE_FILE_SUFFIXES))


def _absolute_if_local(ref: str) -> str:
    return absolute_location(ref) if is_local_model_ref(ref) else ref


# A hub id, or a local path made absolute at validation (workers have other working directories).
ModelRef = Annotated[str, AfterValidator(_absolute_if_local)]


class ModelConfig(StrictModel):
    """Which diffusion model to run."""

    # When set, `base`/`controlnet` are ignored and random-weight components are built offline.
    preset: Literal["tiny-random", "sd15-random"] | None = None
    base: ModelRef = REAL_BASE_DEFAULT  # hub id | local diffusers folder | single .safetensors/.ckpt file
    # For a single file: a diffusers folder or hub id holding the component configs (tokenizer,
    # scheduler, unet/vae/text_encoder config.json), so the file loads without guessing online.
    base_config: ModelRef | None = None
    controlnet: ModelRef = REAL_CONTROLNET_DEFAULT  # hub id | local folder
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    compile: bool = Field(False, description=(
        "torch.compile UNet + ControlNet with static shapes (CUDA only; eager elsewhere). Every diffusion "
        "call is then padded to compute.batch_size rows, so one graph per prompt chunk count is compiled"))
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (max-autotune: faster kernels, much longer first compile)")
    compile_cache_dir: str | None = Field(None, description=(
        "local folder of the Inductor/Triton compile cache (TORCHINDUCTOR_CACHE_DIR), shared by the actors of "
        "a node so the compile warm-up is paid once per node; a persistent or shared disk keeps it across "
        "clusters. None: <node temp dir>/synthfar-compile-cache. Never part of a dataset's fingerprint"))
    seed: int = 0  # seed of the presets' random weights, so every actor builds identical weights


class SamplerConfig(StrictModel):
    """Sampling settings (defaults: the paper's)."""

    steps: int = Field(15, gt=0)
    guidance_scale: float = Field(7.5, gt=0)
    controlnet_scale: float = Field(0.8, ge=0)
    width: int = Field(512, gt=0)
    height: int = Field(512, gt=0)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        # The VAE downsamples by 8; other sizes are silently resized by diffusers.
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


# --------------------------------------------------------------------------------------------
# Presets: random weights from configs, fully offline.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_level_clip_tokenizer():
    """A CLIPTokenizer with no merges: each byte is a token (plus a `</w>` end-of-word variant).

    Any text tokenizes without a vocabulary download; 514 tokens in all, BOS 512, EOS/pad 513.
    transformers >= 5 builds CLIPTokenizer from an in-memory vocab dict and merges list, so no
    vocab.json/merges.txt has to be written.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def preset_configs(preset: str) -> dict[str, dict]:
    """Component configs of a preset: kwargs for UNet2DConditionModel, AutoencoderKL,
    CLIPTextConfig, and the ControlNet's conditioning embedding channels."""
    if preset == "tiny-random":
        return {
            "unet": dict(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
            ),
            # Four levels, like SD's VAE, so latents are 1/8 of the image (64x64 -> 8x8) and the
            # ControlNet's 8x-downsampling hint encoder fits.
            "vae": dict(
                sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),
            "text_encoder": dict(
                vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            ),
            "controlnet_conditioning_channels": dict(conditioning_embedding_out_channels=(8, 8, 16, 16)),
        }
    if preset == "sd15-random":
        return {
            "unet": dict(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            ),
            "vae": dict(
                sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            ),
            # CLIP ViT-L/14 text tower. Token ids come from the byte-level tokenizer (ids < 514);
            # the real vocabulary size keeps the embedding table's shape.
            "text_encoder": dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            ),
            "controlnet_conditioning_channels": dict(conditioning_embedding_out_channels=(16, 32, 96, 256)),
        }
    raise ValueError(f"unknown preset {preset!r}; expected 'tiny-random' or 'sd15-random'")


def _make_pose_matter(controlnet) -> None:
    """A fresh ControlNet ignores its control image: its output convs are zero, and PyTorch's default
    init shrinks the hint signal through the 8-conv hint encoder until biases dominate. He init
    (signal-preserving through SiLU) for both makes a random preset respond to the pose as a
    trained one does."""
    import torch

    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for module in [*zero_convs, *controlnet.controlnet_cond_embedding.modules()]:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)


def build_preset_components(preset: str, seed: int = 0) -> dict:
    """Random-weight UNet, ControlNet, VAE, text encoder and tokenizer, identical for a given seed."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset_configs(preset)
    tokenizer = byte_level_clip_tokenizer()
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        controlnet = ControlNetModel.from_unet(unet, **cfg["controlnet_conditioning_channels"])
        _make_pose_matter(controlnet)
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        # A trained CLIP's final LayerNorm has a non-zero bias (so embeddings have a non-zero mean,
        # which the prompt-weight mean restoration relies on); a fresh one has zeros.
        final_ln = _clip_final_layer_norm(text_encoder)
        torch.nn.init.normal_(final_ln.bias, std=0.5)
    return dict(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def _clip_final_layer_norm(text_encoder) -> torch.nn.LayerNorm:
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model` wrapper); support both.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def make_scheduler(base_config=None):
    """DPM++ 2M Karras; `base_config` (a loaded scheduler's config) keeps the model's training
    settings such as prediction_type and num_train_timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    if base_config is None:
        return DPMSolverMultistepScheduler(num_train_timesteps=1000, **SCHEDULER_SETTINGS)
    return DPMSolverMultistepScheduler.from_config(base_config, **SCHEDULER_SETTINGS)


# --------------------------------------------------------------------------------------------
# Loading real models.


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A local model path (model.base / base_config / controlnet) that does not exist."""


class ModelPathError(UserError, ValueError):
    """A local model path of the wrong kind (a file where a folder is needed, a folder without its config)."""


# (setting, default) of the fields a preset ignores.
_REAL_MODEL_FIELDS = (("base", REAL_BASE_DEFAULT), ("base_config", None), ("controlnet", REAL_CONTROLNET_DEFAULT))


def _check_local_ref(setting: str, ref: str, kind: str) -> None:
    """One-line errors naming the setting: `kind` is 'pipeline' (a diffusers folder, or a single
    checkpoint file for model.base), or 'controlnet' (a ControlNet folder)."""
    path = os.path.expanduser(ref)
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"{setting}: {ref} does not exist (a local path; on a cluster it must exist on the driver and "
            "every worker node). Give a hub id such as owner/name, a diffusers folder, or a "
            f"single checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})")
    if os.path.isfile(path):
        if setting != "model.base":
            raise ModelPathError(f"{setting}: {ref} is a file; expected a folder")
        if not path.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise ModelPathError(f"{setting}: {ref} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
        return
    marker, how = (("config.json", "ControlNetModel.save_pretrained(...)") if kind == "controlnet"
                   else ("model_index.json", "pipeline.save_pretrained(...) or point at a single .safetensors file"))
    if not os.path.isfile(os.path.join(path, marker)):
        raise ModelPathError(f"{setting}: {ref} is a folder without {marker}, so it is not a diffusers "
                         f"{'ControlNet' if kind == 'controlnet' else 'pipeline'} folder; save one with {how}")


def check_model_paths(model: ModelConfig) -> None:
    """Refuse, before any worker starts, a local model path that does not exist or has the wrong
    shape (one line naming the setting); warn about settings a preset ignores."""
    if model.preset is not None:
        ignored = [f"model.{name}={getattr(model, name)}" for name, default in _REAL_MODEL_FIELDS
                   if getattr(model, name) != default]
        if ignored:
            logger.warning("model.preset=%s builds random weights: %s ignored", model.preset, ", ".join(ignored))
        return
    for name, _ in _REAL_MODEL_FIELDS:
        ref = getattr(model, name)
        if ref is not None and is_local_model_ref(ref):
            _check_local_ref(f"model.{name}", ref, "controlnet" if name == "controlnet" else "pipeline")


@contextmanager
def _hub_errors(what: str, ref: str, offline: bool):
    """Turn a failed hub lookup (OSError, incl. connection errors) into one that names the model."""
    try:
        yield
    except OSError as exc:
        hint = " HF_HUB_OFFLINE is set and it is not in the local cache;" if offline else ""
        raise OSError(
            f"could not load {what} {ref!r} from the Hugging Face hub:{hint} download it first, give a "
            f"local folder, or use model.preset=tiny-random offline ({exc})"
        ) from exc


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a warning).
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def _load_controlnet(ref: str, torch_dtype: torch.dtype, offline: bool):
    from diffusers import ControlNetModel

    if is_local_model_ref(ref):  # checked by check_model_paths
        return ControlNetModel.from_pretrained(os.path.expanduser(ref), **_dtype_kwarg(torch_dtype))
    with _hub_errors("controlnet", ref, offline):
        return ControlNetModel.from_pretrained(ref, local_files_only=offline, **_dtype_kwarg(torch_dtype))


def _load_real_pipeline(model: ModelConfig, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionControlNetPipeline

    check_model_paths(model)  # the driver checked too; a worker may see other files
    offline = hub_offline()
    base = os.path.expanduser(model.base)
    common = dict(**_dtype_kwarg(torch_dtype), safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    if is_local_model_ref(model.base) and os.path.isfile(base):
        config = model.base_config
        if config is None and offline:
            raise ValueError(
                f"base model {model.base!r} is a single file and HF_HUB_OFFLINE is set, so its component "
                "configs cannot be fetched: set model.base_config to a local diffusers SD1.5 folder "
                f"(or a cached hub id such as {REAL_BASE_DEFAULT!r})"
            )
        if config is not None and is_local_model_ref(config):
            config = os.path.expanduser(config)
        controlnet = _load_controlnet(model.controlnet, torch_dtype, offline)
        logger.info("loading single-file checkpoint %s (configs from %s)", base, config or "<inferred>")
        from_hub = config is None or not is_local_model_ref(config)
        with _hub_errors("base_config", config or "<inferred from the checkpoint>", offline) if from_hub else nullcontext():
            return StableDiffusionControlNetPipeline.from_single_file(
                base, config=config, controlnet=controlnet, local_files_only=offline, **common
            )

    if is_local_model_ref(model.base):
        controlnet = _load_controlnet(model.controlnet, torch_dtype, offline)
        return StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, **common)
    controlnet = _load_controlnet(model.controlnet, torch_dtype, offline)
    with _hub_errors("base model", model.base, offline):
        return StableDiffusionControlNetPipeline.from_pretrained(
            model.base, controlnet=controlnet, local_files_only=offline, **common
        )


# --------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def build_pipeline(model: ModelConfig, device: str | None = None):
    """A StableDiffusionControlNetPipeline on `device` (None: cuda if available, else cpu) with the
    paper's scheduler, no safety checker and no progress bar."""
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    device = device or default_device()
    dtype = resolve_dtype(model.dtype, device)
    start = time.perf_counter()
    if model.preset is not None:
        parts = build_preset_components(model.preset, model.seed)
        pipe = StableDiffusionControlNetPipeline(
            **parts, scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )
    else:
        pipe = _load_real_pipeline(model, dtype)
        pipe.scheduler = make_scheduler(pipe.scheduler.config)
    if pipe.unet.dtype != dtype:  # a no-op cast would still log diffusers' fp32-modules warning
        pipe = pipe.to(dtype=dtype)  # cast before moving: the device only ever holds the final dtype
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    if torch.device(device).type == "cuda":
        # NHWC convolutions are faster on tensor cores.
        for module in (pipe.unet, pipe.controlnet, pipe.vae):
            module.to(memory_format=torch.channels_last)
        if model.compile:
            options = compile_options(model)
            pipe.unet.compile(**options)  # in place: the pipeline keeps its module types and dtype checks
            pipe.controlnet.compile(**options)
    elif model.compile:
        logger.warning("model.compile is only applied on CUDA; running eager on %s", device)
    logger.info("built pipeline %s on %s (%s) in %.1f s", model_label(model), device, dtype, time.perf_counter() - start)
    return pipe


COMPILE_CACHE_DEFAULT = "synthfar-compile-cache"
# ModelConfig settings left out of a dataset's fingerprint: where compiled kernels are cached never
# decides a pixel; compile_mode only counts when set (older datasets hash as before it existed).
_RUNTIME_MODEL_FIELDS = ("compile_cache_dir",)
_MODEL_FIELD_DEFAULTS_UNHASHED = {"compile_mode": "default"}


def model_content(dump: dict) -> dict:
    """The settings of a dumped ModelConfig that decide image bytes (for dataset fingerprints)."""
    return {k: v for k, v in dump.items()
            if k not in _RUNTIME_MODEL_FIELDS and _MODEL_FIELD_DEFAULTS_UNHASHED.get(k, object()) != v}


def compile_cache_dir(model: ModelConfig) -> str:
    """The compile cache folder of a model config on this node (absolute)."""
    path = model.compile_cache_dir or os.path.join(tempfile.gettempdir(), COMPILE_CACHE_DEFAULT)
    return os.path.abspath(os.path.expanduser(path))


def compile_options(model: ModelConfig) -> dict:
    """Point Inductor's (and so Triton's) on-disk cache at `compile_cache_dir` and return the kwargs for
    `Module.compile`: static shapes (dynamic=False), since every call is padded to one batch size and
    prompts come in a few chunk counts; a symbolic-shape graph would be slower."""
    path = compile_cache_dir(model)
    os.makedirs(path, exist_ok=True)
    # Read by Inductor whenever it opens its cache (FX graphs, autotuning, Triton kernels under it).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    logger.info("torch.compile (mode %s, static shapes), compile cache %s", model.compile_mode, path)
    return {"mode": model.compile_mode, "dynamic": False}


def _short_ref(ref: str) -> str:
    if is_local_model_ref(ref):
        return os.path.basename(os.path.normpath(os.path.expanduser(ref))) or ref
    return ref


def model_label(model: ModelConfig) -> str:
    """Short, stable name of the model for the dataset's `model` column."""
    if model.preset is not None:
        return f"preset:{model.preset}" + (f":seed{model.seed}" if model.seed else "")
    return f"{_short_ref(model.base)}+{_short_ref(model.controlnet)}"


NEGATIVE_CACHE_SIZE = 32  # (negative prompt, chunk count) embeddings kept; a run has one negative prompt


class FaceGenerator:
    """Generates one image per (prompt, negative prompt, pose image, seed) row.

    Each image gets its own CPU torch.Generator seeded with its seed, so its starting noise does not
    depend on the batch or the device. Prompts of different lengths need different numbers of
    77-token chunks; rows are run in sub-batches of equal chunk count (each row padded only to its
    own positive/negative maximum), so a row's image never depends on what else is in the batch.

    Off the diffusion path: each prompt is tokenized once; a negative prompt's embedding is encoded
    once per (text, chunk count) and reused (every row of a run shares one); images become uint8 on
    the pipeline's device, so only uint8 crosses to the host. With model.compile on CUDA, each
    diffusion call is padded to `batch_size` rows (the padding rows repeat a real one and are
    discarded) so the compiled graphs see one batch shape.
    """

    def __init__(self, model: ModelConfig, sampler: SamplerConfig, device: str | None = None,
                 batch_size: int | None = None):
        import torch

        self.model = model
        self.sampler = sampler
        self.device = device or default_device()
        self.pipe = build_pipeline(model, self.device)
        self.label = model_label(model)
        compiled = model.compile and torch.device(self.device).type == "cuda"
        self.static_batch = batch_size if compiled else None
        self._negatives: dict[tuple[str, int], torch.Tensor] = {}
        self._negative_tokens: dict[str, tuple[list[int], list[float]]] = {}

    def _tokens_of_negative(self, text: str) -> tuple[list[int], list[float]]:
        if text not in self._negative_tokens:
            if len(self._negative_tokens) >= NEGATIVE_CACHE_SIZE:
                self._negative_tokens.clear()
            self._negative_tokens[text] = tokenize_weighted(self.pipe.tokenizer, text)
        return self._negative_tokens[text]

    def _encode(self, prompts: list[str], negative_prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tok, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        pos_tokens = [tokenize_weighted(tok, p) for p in prompts]
        # Each row: positive and negative padded to the longer of the two (CFG needs equal shapes).
        counts = [max(chunks_needed(ids), chunks_needed(self._tokens_of_negative(n)[0]))
                  for (ids, _), n in zip(pos_tokens, negative_prompts)]
        pos = encode_tokenized(tok, encoder, pos_tokens, counts, device=encoder.device)
        missing = sorted({(n, c) for n, c in zip(negative_prompts, counts)} - self._negatives.keys())
        if missing:
            if len(self._negatives) + len(missing) > NEGATIVE_CACHE_SIZE:
                self._negatives.clear()
            embeds = encode_tokenized(tok, encoder, [self._tokens_of_negative(n) for n, _ in missing],
                                      [c for _, c in missing], device=encoder.device)
            self._negatives.update(zip(missing, embeds))
        return pos, [self._negatives[(n, c)] for n, c in zip(negative_prompts, counts)]

    def __call__(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        pose_images: list[np.ndarray],
        seeds: list[int],
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 images, H/W from the sampler config. An image whose diffusion output
        holds NaN/inf comes back black, with a warning: callers that keep images use `generate`."""
        images, finite = self.generate(prompts, negative_prompts, pose_images, seeds)
        if not finite.all():
            logger.warning("non-finite pixels in generated images (seeds %s): returned black",
                           [int(seeds[i]) for i in np.flatnonzero(~finite)])
        return images

    def generate(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        pose_images: list[np.ndarray],
        seeds: list[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """((B, H, W, 3) uint8 images, (B,) bool `finite`): finite[i] is False when image i's float
        output held NaN/inf (fp16 overflow, a broken checkpoint); that image is black, not clipped
        noise, and must not be kept as a sample."""
        import torch

        n = len(prompts)
        if not (len(negative_prompts) == len(pose_images) == len(seeds) == n):
            raise ValueError(
                f"batch lists differ in length: {n} prompts, {len(negative_prompts)} negative prompts, "
                f"{len(pose_images)} pose images, {len(seeds)} seeds"
            )
        s = self.sampler
        out = np.empty((n, s.height, s.width, 3), dtype=np.uint8)
        finite = np.ones(n, dtype=bool)
        if n == 0:
            return out, finite
        controls = [_to_pil(img, i) for i, img in enumerate(pose_images)]

        unet_dtype = self.pipe.unet.dtype
        device = self.pipe.unet.device
        with torch.inference_mode():
            pos, neg = self._encode(prompts, negative_prompts)
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(pos):
                groups.setdefault(e.shape[0], []).append(i)
            for idx in groups.values():
                run = idx + [idx[0]] * max(0, (self.static_batch or 0) - len(idx))
                result = self.pipe(
                    prompt_embeds=torch.stack([pos[i] for i in run]).to(device, unet_dtype),
                    negative_prompt_embeds=torch.stack([neg[i] for i in run]).to(device, unet_dtype),
                    image=[controls[i] for i in run],
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance_scale,
                    controlnet_conditioning_scale=s.controlnet_scale,
                    height=s.height,
                    width=s.width,
                    generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in run],
                    output_type="pt",
                )
                out[idx], finite[idx] = images_to_uint8(result.images[:len(idx)])
        return out, finite


def images_to_uint8(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pipeline output (B, 3, H, W) in [0, 1] on its device (output_type="pt") -> ((B, H, W, 3) uint8,
    (B,) bool finite) on the host. The arithmetic is diffusers' "np" output followed by numpy's
    rint/clip: float32 values times 255, rounded half to even, clipped, so the bytes are the same;
    only uint8 crosses to the host. An image holding NaN/inf comes back black."""
    import torch
    x = images.float()
    ok = torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.where(ok[:, None, None, None], x, 0.0)
    u8 = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return u8.cpu().numpy(), ok.cpu().numpy()


def _to_pil(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"pose image {index} must be an HxWx3 uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    return Image.fromarray(arr)


__all__ = [
    "REAL_BASE_DEFAULT", "REAL_CONTROLNET_DEFAULT", "ModelConfig", "SamplerConfig", "FaceGenerator",
    "build_pipeline", "check_model_paths", "is_local_model_ref", "ModelRef", "model_label", "make_scheduler",
    "build_preset_components", "preset_configs",
    "byte_level_clip_tokenizer", "images_to_uint8", "compile_options", "compile_cache_dir", "model_content",
]
