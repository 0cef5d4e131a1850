"""Which options a `--resume` may change: the saved run config against the resumed command's."""
from __future__ import annotations

from typing import Any, Mapping, Optional

# Every option in a run's config defines the run (architecture, objective, data stream, optimizer), so a resume
# that changes one is refused: the export would claim the new value for every step. What may change is not in
# the config at all (RunOptions: --steps to train longer, --save-every, --log-every, --device, --precision,
# --threads, --quiet), plus `init`, which only chose the starting weights that the saved state replaces.
MAY_CHANGE_ON_RESUME = frozenset({"init"})
OPTION_NAMES = {"ch": "--channels", "model_channels": "--channels", "num_res_blocks": "--res-blocks",
                "ch_mult": "--channel-mult", "attention_resolutions": "--attention-at"}


def changed_option(saved: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """'different KEY (--option OLD, now NEW)' for the first option of `new` that differs from `saved`, or None.

    Architecture keys missing from `saved` count as changed; training keys missing from it (options added
    since the run started) are taken to be the defaults it ran with."""
    saved_arch = saved.get("arch", {})
    for key, value in new.get("arch", {}).items():
        if saved_arch.get(key) != value:
            return _difference(key, saved_arch.get(key), value)
    saved_training = _flat(saved.get("training", {}))
    for key, value in _flat(new.get("training", {})).items():
        if key in saved_training and key not in MAY_CHANGE_ON_RESUME and saved_training[key] != value:
            return _difference(key, saved_training[key], value)
    return None


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """Nested option groups (the autoencoder's `loss`, ControlNet's `hint`) flattened to their options."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flat(value) if isinstance(value, Mapping) else {key: value})
    return flat


def _difference(key: str, old: Any, new: Any) -> str:
    def shown(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 40 else "another value"  # e.g. a whole first-stage config

    option = OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
    return f"different {key} ({option} {shown(old)}, now {shown(new)})"
