"""From a checkpoint's raw tensors to the state dict a bundle loads: EMA selection, harmless extras
dropped, and a strict key/shape check that explains what does not match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping, Optional, Sequence

import torch

from ldmtool.errors import CheckpointError

EMA_PREFIX = "model_ema."
# Keys the reference writes that no network needs (training state, caches of constants).
HARMLESS_EXACT = {
    "model_ema.decay", "model_ema.num_updates", "lvlb_weights", "logvar", "cond_ids",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
    "cond_stage_model.model.attn_mask",
}
HARMLESS_PREFIXES = ("loss.", "first_stage_model.loss.", "cond_stage_model.loss.", "model_ema.")
HARMLESS_SUFFIXES = (".position_ids",)
SHOWN = 5


@dataclass
class PreparedWeights:
    state: dict[str, torch.Tensor]
    ema_present: bool = False
    ema_used: int = 0
    dropped: list[str] = field(default_factory=list)
    ema_missing: list[str] = field(default_factory=list)  # network weights without an EMA copy, kept raw


def ema_key(key: str) -> Optional[str]:
    """The reference LitEma name of a `model.*` parameter: 'model_ema.' + name without dots."""
    if not key.startswith("model."):
        return None
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def prepare_weights(raw: Mapping[str, torch.Tensor], *, use_ema: bool = True) -> PreparedWeights:
    """Replace `model.*` weights by their EMA copies (when present and wanted); drop harmless extras."""
    state = _modern_clip_names(dict(raw))
    ema_present = any(k.startswith(EMA_PREFIX) and k not in HARMLESS_EXACT for k in state)
    used, missing = 0, []
    if use_ema and ema_present:
        for key in list(state):
            ek = ema_key(key)
            if ek is not None and ek in state:
                state[key] = state[ek]
                used += 1
            elif ek is not None:
                missing.append(key)
    dropped = [k for k in state if _harmless(k)]
    for key in dropped:
        del state[key]
    return PreparedWeights(state, ema_present, used, dropped, missing)


def partial_ema_note(source: str, used: int, missing: Sequence[str]) -> Optional[str]:
    """The one line that says a file's EMA copies cover only some network weights (None when they cover all).
    The reference's LitEma keeps copies of the trainable weights only, and swaps in just those: weights frozen
    in training stay raw, so the merge is kept, and said."""
    if not missing:
        return None
    return (f"{source}: EMA copies (model_ema.*) for only {used} of {used + len(missing)} network weights; the "
            f"other {len(missing)} (e.g. {missing[0]}) are the raw weights, as the reference merges them for "
            f"weights frozen in training (--no-ema loads the raw weights only)")


# Some SD 1.x files were saved from a bare CLIPTextTransformer: no `text_model.` level in the names.
_BARE_CLIP = "cond_stage_model.transformer."
_BARE_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _modern_clip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(k.startswith(_BARE_CLIP + "embeddings.token_embedding") for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        rest = key[len(_BARE_CLIP):] if key.startswith(_BARE_CLIP) else None
        if rest is not None and rest.startswith(_BARE_CLIP_PARTS):
            key = f"{_BARE_CLIP}text_model.{rest}"
        renamed[key] = value
    return renamed


def _harmless(key: str) -> bool:
    return key in HARMLESS_EXACT or key.startswith(HARMLESS_PREFIXES) or key.endswith(HARMLESS_SUFFIXES)


def check_state_dict(
    expected: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor], *, source: str,
    family: str, likely: Optional[str] = None, optional: Sequence[str] = (), floating: Collection[str] = (),
) -> None:
    """Raise one CheckpointError naming the first missing / unexpected / mis-shaped keys, and the keys of
    `floating` (the network's float weights) that the file holds as integers or booleans."""
    optional_set = set(optional)
    missing = [k for k in expected if k not in state and k not in optional_set]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    dtypes = [k for k in floating if k in state and not state[k].is_floating_point()]
    if not (missing or unexpected or shapes or dtypes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                     f"{family} {tuple(expected[k])})")
    if dtypes:
        parts.append(f"{len(dtypes)} not floating point (e.g. {dtypes[0]}: {str(state[dtypes[0]].dtype).replace('torch.', '')})")
    hint = f"; the weights look like {likely}" if likely and likely != family else ""
    raise CheckpointError(
        f"{source}: does not match the {family} architecture: {'; '.join(parts)}{hint} "
        f"(pass the right --preset or --config)"
    )


def _first(keys: list[str]) -> str:
    more = f", … +{len(keys) - SHOWN}" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more
