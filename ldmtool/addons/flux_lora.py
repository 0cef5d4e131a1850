"""Where LoRA layers for a FLUX.1 transformer land (`Target`s of `ldmtool.addons.layer_names`, applied by
`apply_network`). The namings in use:
- kohya-ss sd-scripts / ComfyUI: BFL's released layer names under `lora_unet_`, e.g.
  `lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`, or under `diffusion_model.`
  with their dots (`diffusion_model.double_blocks.0.img_attn.qkv`, which ComfyUI also reads);
- diffusers/PEFT: `transformer.transformer_blocks.0.attn.to_q`, `transformer.single_transformer_blocks.0.proj_mlp`:
  q, k and v are row ranges of BFL's fused `qkv`, and in the single blocks q, k, v and `proj_mlp` are row ranges
  of `linear1` (`proj_out` is `linear2` whole);
- the same diffusers names in kohya form, `lora_transformer_transformer_blocks_0_attn_to_q`.
As for SD3 (`addons/mmdit_lora.py`), diffusers' `norm_out.linear` stores (scale, shift) where BFL's final
modulation holds (shift, scale); a delta for it is not one row range, so it is left out and such a layer is
reported as matching nothing rather than applied wrongly. kohya's `lora_unet_final_layer_adaLN_modulation_1`
names BFL's own layer and applies as it is.
"""
from __future__ import annotations

from ldmtool.addons.layer_names import Target, add_diffusers_places, flat, matrix_layers
from ldmtool.addons.mmdit_lora import DIFFUSERS_PREFIX, KOHYA_DIFFUSERS_PREFIX, KOHYA_PREFIX
from ldmtool.families.flux import diffusers_layer_places
from ldmtool.nets.flux import Flux, SingleStreamBlock

BFL_PREFIX = "diffusion_model."


def flux_lora_targets(model: Flux, prefix: str) -> dict[str, Target]:
    """Flat address -> weight (under `prefix` in the root the network is applied to) for every layer of the
    transformer with a weight matrix, under each naming."""
    layers = matrix_layers(model)
    table = {KOHYA_PREFIX + flat(name): Target(f"{prefix}{name}.weight") for name in layers}
    table.update({flat(BFL_PREFIX + name): Target(f"{prefix}{name}.weight") for name in layers})
    hidden = model.img_in.out_features
    singles = [block for block in model.single_blocks if isinstance(block, SingleStreamBlock)]
    mlp_hidden = singles[0].widths[1] if singles else 0
    places = diffusers_layer_places(len(model.double_blocks), len(singles), hidden, mlp_hidden)
    add_diffusers_places(table, places, layers, prefix, diffusers_prefix=DIFFUSERS_PREFIX,
                         kohya_diffusers_prefix=KOHYA_DIFFUSERS_PREFIX)
    return table
