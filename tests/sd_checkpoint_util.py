"""Test helper: write a diffusers SD pipeline as an original (LDM / CompVis / CivitAI) single-file
checkpoint, so `from_single_file` can be tested offline on a tiny model.

This is the inverse of diffusers' `loaders/single_file_utils.py` conversions
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`):
- UNet  -> `model.diffusion_model.*` (input_blocks / middle_block / output_blocks numbering),
- VAE   -> `first_stage_model.*` (encoder.down.i.block.j, decoder.up reversed, 1x1-conv attention),
- CLIP  -> `cond_stage_model.transformer.text_model.*`.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = [  # diffusers name -> LDM name inside a ResBlock
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _rename_resnet(rest: str) -> str:
    for new, old in _UNET_RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(f"unexpected UNet resnet parameter {rest!r}")


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM keys (without the model prefix)."""
    lpb = config["layers_per_block"]
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        head, rest = key.split(".", 1)
        if head in ("down_blocks", "up_blocks"):
            (_, block, kind, layer), rest = _split(key, 4)
            block, layer = int(block), int(layer)
            if head == "down_blocks":
                if kind == "downsamplers":  # last slot of the level; conv is called `op`
                    new = f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{rest.removeprefix('conv.')}"
                else:
                    idx = 1 + block * (lpb + 1) + layer
                    new = f"input_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
            else:
                if kind == "upsamplers":  # after the resnet (and the attention, if the level has one)
                    idx = block * (lpb + 1) + lpb
                    slot = 2 if up_has_attention[block] else 1
                    new = f"output_blocks.{idx}.{slot}.{rest}"
                else:
                    idx = block * (lpb + 1) + layer
                    new = f"output_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif head == "mid_block":
            (_, kind, layer), rest = _split(key, 3)
            if kind == "resnets":  # resnet 0 -> 0, attention -> 1, resnet 1 -> 2
                new = f"middle_block.{2 * int(layer)}.{_rename_resnet(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            module, param = key.rsplit(".", 1)
            if module not in _UNET_TOP:
                raise KeyError(f"no LDM name for UNet parameter {key!r}")
            new = f"{_UNET_TOP[module]}.{param}"
        out[new] = value
    return out


_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM keys (without the model prefix)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        side = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        sub = parts[1]
        if sub in ("down_blocks", "up_blocks"):
            block, kind = int(parts[2]), parts[3]
            level = block if sub == "down_blocks" else n_up - 1 - block  # LDM numbers decoder levels bottom-up
            name = "down" if sub == "down_blocks" else "up"
            if kind == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{level}.block.{parts[4]}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
        elif sub == "mid_block":
            kind, layer = parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{layer + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                module, param = rest.rsplit(".", 1)
                new = f"{side}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
                if param == "weight" and value.ndim == 2:  # LDM attention uses 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            module = ".".join(parts[1:-1])
            new = f"{side}.{_VAE_TOP.get(module, module)}.{parts[-1]}"
        out[new] = value
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> keys under `text_model.` (transformers >= 5.6 dropped that wrapper)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in state_dict.items() if not k.endswith("position_ids")}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict holding the pipeline's UNet, VAE and text encoder."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        sd[UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        sd[VAE_PREFIX + k] = v
    for k, v in clip_to_ldm(pipe.text_encoder.state_dict()).items():
        sd[CLIP_PREFIX + k] = v
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_single_file(pipe, path: str) -> None:
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(pipe), path)
