"""Where LoRA layers for an SD3 / SD3.5 MMDiT land (`Target`s of `ldmtool.addons.layer_names`, applied by
`apply_network`). Three namings are in use:
- kohya-ss sd-scripts (`sd3_train_network.py`, as ComfyUI reads them): the released layer names under
  `lora_unet_`, e.g. `lora_unet_joint_blocks_0_x_block_attn_qkv`;
- diffusers/PEFT: `transformer.transformer_blocks.0.attn.to_q`, whose q, k and v are row ranges of the
  released fused `qkv` (the table holds whatever `flat` makes of that address);
- the same diffusers names in kohya form, `lora_transformer_transformer_blocks_0_attn_to_q`.
diffusers' `norm_out.linear` and the last block's `norm1_context.linear` store (scale, shift) where the
released weight holds (shift, scale); a delta for them is not one row range, so they are left out and such a
layer is reported as matching nothing rather than applied wrongly.
"""
from __future__ import annotations

from ldmtool.addons.layer_names import Target, add_diffusers_places, flat, matrix_layers
from ldmtool.nets.mmdit import MMDiT
from ldmtool.nets.mmdit_names import diffusers_layer_places

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
KOHYA_DIFFUSERS_PREFIX = "lora_transformer_"


def mmdit_lora_targets(model: MMDiT, prefix: str) -> dict[str, Target]:
    """Flat address -> weight (under `prefix` in the root the network is applied to) for every MMDiT layer
    with a weight matrix, under the three namings."""
    layers = matrix_layers(model)
    table = {KOHYA_PREFIX + flat(name): Target(f"{prefix}{name}.weight") for name in layers}
    config = model.config
    places = diffusers_layer_places(config.hidden_size, config.depth, config.dual_attention_layers)
    add_diffusers_places(table, places, layers, prefix, diffusers_prefix=DIFFUSERS_PREFIX,
                         kohya_diffusers_prefix=KOHYA_DIFFUSERS_PREFIX)
    return table
