"""Where a network file's layer addresses land in a bundle: kohya-ss names (`lora_unet_down_blocks_0_...`,
`lora_te_text_model_...`), the same with CompVis UNet names (`lora_unet_input_blocks_1_1_...`), and
diffusers/PEFT names (`unet.down_blocks.0....`, `text_encoder.text_model....`) all become one flat form,
`lora_unet_<diffusers name with _>` or `lora_te_<transformers name with _>`, looked up in a table built
from the bundle's own modules (so kohya's flattened underscores never need guessing).

SDXL's two text encoders are `lora_te1_`/`lora_te2_` (PEFT: `text_encoder.`/`text_encoder_2.`); a bundle's
table lists the prefixes its encoders answer to (`TEXT_PREFIXES`), so an SDXL family adds its second
encoder there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

from torch import nn

# diffusers' ResnetBlock2D names for the CompVis ResBlock's layers
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
        "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1"}
_PEFT_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
TEXT_PREFIXES = ("lora_te_",)  # what SD 1.x/2.x's one text encoder answers to


@dataclass(frozen=True)
class Target:
    """A bundle parameter a layer change goes to; `rows` (start, stop) when it is a slice of a fused
    weight (OpenCLIP's in_proj_weight holds q, k and v)."""

    key: str
    rows: Optional[tuple[int, int]] = None


def flat(address: str) -> str:
    """The one form every naming becomes: PEFT prefixes as kohya's, dots as underscores."""
    for prefix, kohya in _PEFT_PREFIXES.items():
        if address.startswith(prefix):
            address = kohya + address[len(prefix):]
            break
    return address.replace(".", "_")


def matrix_layers(model: nn.Module) -> set[str]:
    """The names of a network's layers whose weight is a matrix (or a conv kernel): what a LoRA can change."""
    return {name for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() >= 2}


def diffusers_unet_names(unet: nn.Module) -> dict[str, str]:
    """CompVis block name -> diffusers block name, from the UNet's own structure (any number of res blocks)."""
    from ldmtool.nets.unet import Downsample, Upsample

    names = dict(_TOP)
    level, index = 0, 0
    input_blocks: list[Any] = list(cast(nn.ModuleList, unet.input_blocks))
    output_blocks: list[Any] = list(cast(nn.ModuleList, unet.output_blocks))
    for i, block in enumerate(list(input_blocks)[1:], 1):
        if isinstance(block[0], Downsample):
            names[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, index = level + 1, 0
            continue
        names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{index}"
        if len(block) > 1:
            names[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{index}"
        index += 1
    level, index = 0, 0
    for i, block in enumerate(output_blocks):
        names[f"output_blocks.{i}.0"] = f"up_blocks.{level}.resnets.{index}"
        for k, module in list(enumerate(block))[1:]:
            if isinstance(module, Upsample):
                names[f"output_blocks.{i}.{k}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            else:
                names[f"output_blocks.{i}.{k}"] = f"up_blocks.{level}.attentions.{index}"
        index += 1
        if isinstance(block[-1], Upsample):
            level, index = level + 1, 0
    return names


def _diffusers_name(module_name: str, blocks: dict[str, str]) -> Optional[str]:
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        block = ".".join(parts[:cut])
        if block in blocks:
            rest = ".".join(parts[cut:])
            if ".resnets." in blocks[block] and rest:
                rest = _RESBLOCK.get(rest, rest)
            return blocks[block] + ("." + rest if rest else "")
    return None


def unet_targets(unet: nn.Module, prefix: str) -> dict[str, Target]:
    """Flat address -> weight, for every UNet layer with a weight, under both kohya namings."""
    blocks = diffusers_unet_names(unet)
    table = {}
    for name, module in unet.named_modules():
        if not isinstance(getattr(module, "weight", None), nn.Parameter) or module.weight.dim() < 2:
            continue
        target = Target(f"{prefix}{name}.weight")
        table["lora_unet_" + flat(name)] = target
        diffusers = _diffusers_name(name, blocks)
        if diffusers is not None:
            table["lora_unet_" + flat(diffusers)] = target
    return table


_OPENCLIP_PARTS = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}


def text_targets(encoder: nn.Module, prefix: str, names: tuple[str, ...] = TEXT_PREFIXES) -> dict[str, Target]:
    """Flat address -> weight for a CLIP text encoder (transformers layout, or OpenCLIP's, which kohya
    names in the transformers layout: q/k/v are rows of its fused in_proj_weight)."""
    table: dict[str, Target] = {}
    transformer = getattr(encoder, "transformer", None)
    if transformer is not None and hasattr(transformer, "text_model"):
        for name, module in transformer.named_modules():
            if isinstance(module, nn.Linear):
                for kohya in names:
                    table[kohya + flat(name)] = Target(f"{prefix}transformer.{name}.weight")
        return table
    model = getattr(encoder, "model", None)
    if model is None or not hasattr(model, "transformer"):
        return table
    width = model.token_embedding.weight.shape[-1]
    for index, _block in enumerate(model.transformer.resblocks):
        base = f"{prefix}model.transformer.resblocks.{index}."
        layer = f"text_model_encoder_layers_{index}_"
        for kohya in names:
            for part, ours in _OPENCLIP_PARTS.items():
                table[f"{kohya}{layer}{part}"] = Target(f"{base}{ours}.weight")
            for row, letter in enumerate("qkv"):
                table[f"{kohya}{layer}self_attn_{letter}_proj"] = Target(f"{base}attn.in_proj_weight",
                                                                         (row * width, (row + 1) * width))
    return table


def add_diffusers_places(table: dict[str, Target], places: Any, layers: set[str], prefix: str, *,
                         diffusers_prefix: str, kohya_diffusers_prefix: str) -> None:
    """Adds a transformer's diffusers/PEFT layer names (`places`: diffusers name -> `Place` of the released layer
    and its row range) to `table`, in PEFT form and in kohya form. A place whose rows diffusers stores in another
    order (`swapped`) is left out, so a LoRA layer there is reported as matching nothing rather than applied wrongly."""
    for theirs, place in places.items():
        if place.swapped or place.layer not in layers:
            continue
        target = Target(f"{prefix}{place.layer}.weight", place.rows)
        table[flat(diffusers_prefix + theirs)] = target
        table[kohya_diffusers_prefix + flat(theirs)] = target
