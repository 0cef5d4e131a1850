"""ControlNet files as users hold them, read into the released key layout without prefix
(`input_hint_block.*`, `input_blocks.*`, `zero_convs.*`, `middle_block.*`, `middle_block_out.*`,
`time_embed.*`), and the architecture those keys record.

Layouts: the v1.1 release `.pth` files (everything under `control_model.`), the v1.0 files (a whole SD
checkpoint plus `control_model.*`: only the ControlNet is read), repackaged `.safetensors` without prefix,
and diffusers' `ControlNetModel` (`controlnet_cond_embedding.*`, `down_blocks.*`, ...), renamed on load.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ldmtool.addons.base import AddonFormat
from ldmtool.errors import CheckpointError

CONTROLNET = "controlnet"
PREFIX = "control_model."
_DIFFUSERS_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_DIFFUSERS_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                  "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0",
                  "controlnet_cond_embedding.conv_in": "input_hint_block.0"}


def _released(keys: frozenset[str]) -> bool:
    return any(k.startswith(("input_hint_block.", PREFIX + "input_hint_block.")) for k in keys)


def _diffusers(keys: frozenset[str]) -> bool:
    return any(k.startswith("controlnet_cond_embedding.") for k in keys)


def read_released(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ControlNet's tensors without the `control_model.` prefix (a v1.0 file's SD weights left out)."""
    if any(k.startswith(PREFIX) for k in content):
        return {k[len(PREFIX):]: v for k, v in content.items() if k.startswith(PREFIX)}
    return dict(content)


def read_diffusers(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """diffusers' `ControlNetModel` keys renamed to the released ones."""
    per_level = 1 + max(int(m.group(1)) for k in content if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    hint_blocks = sum(1 for k in content if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k))
    renamed = {}
    for key, value in content.items():
        module, _, param = key.rpartition(".")
        ours = _diffusers_module(module, per_level, hint_blocks)
        if ours is None:
            raise CheckpointError(f"{where}: diffusers ControlNet key {key!r} is not one ldmtool knows")
        renamed[f"{ours}.{param}"] = value
    return renamed


def _diffusers_module(module: str, per_level: int, hint_blocks: int) -> Optional[str]:
    if module in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[module]
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * hint_blocks + 2}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * int(m.group(1)) + 2}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m.group(1)}.0"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m.group(1)) * (per_level + 1) + per_level}.0.op"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?", module):
        level, part, index, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = f"input_blocks.{1 + level * (per_level + 1) + index}.{0 if part == 'resnets' else 1}"
        return _inner(block, part, rest)
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?", module):
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        return _inner(f"middle_block.{1 if part == 'attentions' else 2 * index}", part, rest)
    return None


def _inner(block: str, part: str, rest: Optional[str]) -> str:
    if rest is None:
        return block
    return f"{block}.{_DIFFUSERS_RESNET.get(rest, rest) if part == 'resnets' else rest}"


CONTROLNET_FORMATS = (
    AddonFormat("controlnet", CONTROLNET, _released, read_released),
    AddonFormat("controlnet-diffusers", CONTROLNET, _diffusers, read_diffusers),
)


def controlnet_params(shapes: Mapping[str, tuple[int, ...]], heads: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The `ControlNet` constructor parameters the released keys record. Attention heads are not in the
    weights: `heads` (`num_heads`/`num_head_channels` of the base model's config) when given, else the
    released models' (768-wide context, SD 1.x: 8 heads; otherwise 64-channel heads)."""
    model_channels = shapes["time_embed.0.weight"][1]
    levels = _levels(shapes)
    params: dict[str, Any] = {
        "in_channels": shapes["input_blocks.0.0.weight"][1], "model_channels": model_channels,
        "hint_channels": shapes["input_hint_block.0.weight"][1],
        "hint_block_channels": _hint_widths(shapes),
        "num_res_blocks": len(levels[0]),
        "channel_mult": [shapes[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"][0] // model_channels
                         for blocks in levels],
    }
    depths = [_depth(shapes, f"input_blocks.{blocks[0]}.1.") for blocks in levels]
    params["attention_resolutions"] = [2 ** level for level, depth in enumerate(depths) if depth]
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is not None:
        params.update(use_spatial_transformer=True, context_dim=context, legacy=False,
                      transformer_depth=[d or 1 for d in depths],
                      use_linear_in_transformer=len(shapes["middle_block.1.proj_in.weight"]) == 2)
    if "label_emb.0.0.weight" in shapes:
        params.update(num_classes="sequential", adm_in_channels=shapes["label_emb.0.0.weight"][1])
    params.update(heads or ({"num_heads": 8} if context == 768 else {"num_head_channels": 64}))
    return params


def _levels(shapes: Mapping[str, tuple[int, ...]]) -> list[list[int]]:
    """Input-block indices of each level's residual blocks (a downsampling block closes a level)."""
    levels: list[list[int]] = [[]]
    index = 1
    while f"zero_convs.{index}.0.weight" in shapes:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{index}.0.in_layers.2.weight" in shapes:
            levels[-1].append(index)
        else:
            raise CheckpointError(f"ControlNet input block {index} is neither a residual block nor a downsample")
        index += 1
    return levels


def _depth(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))}
    return len(blocks) or (1 if f"{prefix}qkv.weight" in shapes else 0)


def _hint_widths(shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
    convs = sorted(int(m.group(1)) for k in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    return [shapes[f"input_hint_block.{i}.weight"][0] for i in convs[:-1:2]] if convs else []
