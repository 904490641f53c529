"""Test helper: a diffusers SD 1.x pipeline's UNet, VAE and CLIP text encoder as one state dict in
the original Stable Diffusion (LDM) key layout, the layout of single-file ``.safetensors`` /
``.ckpt`` checkpoints.

It is the inverse of what diffusers' ``loaders/single_file_utils.py`` converts
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``)
and does what the diffusers repository's ``scripts/convert_diffusers_to_original_stable_diffusion.py``
does, with the block layout read from the models' configs instead of fixed at SD's four levels, so
that it covers the tiny test models. Only renames: every tensor is stored as is, except the VAE
attention projections, which LDM keeps as 1x1 convolutions (a reshape; diffusers takes ``[:, :, 0, 0]``).
SD 1.x only: the OpenAI CLIP text encoder (SD 2.x's OpenCLIP and SDXL's second encoder are laid
out otherwise), no SDXL added embeddings.
"""
from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."          # diffusers' LDM_UNET_KEY
VAE_PREFIX = "first_stage_model."               # the first of diffusers' LDM_VAE_KEYS
TEXT_PREFIX = "cond_stage_model.transformer."   # the first of diffusers' LDM_CLIP_PREFIX_TO_REMOVE

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(name: str, table: dict) -> str:
    """`name` with its leading part renamed by `table` (longest match), the rest kept."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return name


def unet_key(key: str, config) -> str:
    """The LDM name of a diffusers UNet2DConditionModel parameter: input_blocks (conv_in, then per
    level `layers_per_block` [resnet, attention] blocks and a downsampler), middle_block (resnet,
    attention, resnet), output_blocks (per level `layers_per_block` + 1 [resnet, attention] blocks,
    the upsampler after the last one's attention)."""
    per_level = config.layers_per_block + 1
    top = _renamed(key, _UNET_TOP)
    if top != key:
        return top
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, level, part, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            if part == "downsamplers":             # diffusers' "conv" is LDM's "op"
                return f"input_blocks.{(level + 1) * per_level}.0.op" + rest[len("conv"):]
            block = f"input_blocks.{1 + level * per_level + index}"
        else:
            if part == "upsamplers":               # after the resnet and, where the level has one, the attention
                attention = config.up_block_types[level].startswith("CrossAttn")
                return f"output_blocks.{level * per_level + per_level - 1}.{2 if attention else 1}.{rest}"
            block = f"output_blocks.{level * per_level + index}"
        return (f"{block}.0.{_renamed(rest, _UNET_RESNET)}" if part == "resnets" else f"{block}.1.{rest}")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, index, rest = m[1], int(m[2]), m[3]
        if part == "resnets":
            return f"middle_block.{2 * index}.{_renamed(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"UNet parameter {key!r} has no LDM name in this helper")


def vae_key(key: str, config) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter: encoder.down.<i>.block.<j> /
    .downsample, decoder.up.<i>.block.<j> / .upsample with the levels numbered from the lowest
    resolution (diffusers' up_blocks from the highest), mid.block_1 / attn_1 / block_2."""
    levels = len(config.up_block_types)
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key)
    if m:
        where = f"block.{m[3]}" if m[3] is not None else "downsample"
        return f"encoder.down.{m[1]}.{where}.{_renamed(m[4], _VAE_RESNET)}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        where = f"block.{m[3]}" if m[3] is not None else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{where}.{_renamed(m[4], _VAE_RESNET)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)", key)
    if m:
        if m[3] is not None:
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{_renamed(m[4], _VAE_RESNET)}"
        return f"{m[1]}.mid.attn_1.{_renamed(m[4], _VAE_ATTENTION)}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m and m[2].split(".")[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{m[1]}.{_renamed(m[2], _VAE_TOP)}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    raise KeyError(f"VAE parameter {key!r} has no LDM name in this helper")


def text_encoder_key(key: str) -> str:
    """SD 1.x keeps the transformers CLIPTextModel's own names under ``cond_stage_model.transformer.``;
    transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level), which the checkpoint has."""
    return TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)


def _renamed_state(module: torch.nn.Module, name) -> dict:
    out = {}
    for key, value in module.state_dict().items():
        new = name(key)
        if new in out:
            raise KeyError(f"two parameters map to {new!r}")
        out[new] = value
    return out


def sd_state_dict(pipe) -> dict:
    """The pipeline's UNet, VAE and text encoder in the LDM layout (the tensors themselves, except
    the VAE attention weights, reshaped to 1x1 convolutions)."""
    unet = _renamed_state(pipe.unet, lambda k: UNET_PREFIX + unet_key(k, pipe.unet.config))
    vae = _renamed_state(pipe.vae, lambda k: VAE_PREFIX + vae_key(k, pipe.vae.config))
    for key, value in vae.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            vae[key] = value.reshape(*value.shape, 1, 1)
    text = _renamed_state(pipe.text_encoder, text_encoder_key)
    state = {**unet, **vae, **text}
    assert len(state) == len(unet) + len(vae) + len(text)
    return state


def save_safetensors(pipe, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd_state_dict(pipe).items()}, str(path))


def save_ckpt(pipe, path) -> None:
    """As the original training code saved them: the weights under "state_dict"."""
    torch.save({"state_dict": sd_state_dict(pipe)}, str(path))
