"""Sampler names, importable without torch (CLI help and early option checks); `samplers.SAMPLERS` has
the implementations, and a test keeps the two lists identical."""
from __future__ import annotations

SAMPLER_NAMES: tuple[str, ...] = ("ddim", "plms", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc",
                                  "lcm", "tcd")

# The names A1111 gives these samplers (in its PNG `parameters` and its UI); `--sampler` takes them too.
A1111_SAMPLERS: dict[str, str] = {"ddim": "DDIM", "plms": "PLMS", "ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler a",
                                  "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                                  "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD"}
# Samplers whose default spacing is Karras (`samplers.SAMPLERS`; a test keeps the two in step).
KARRAS_BY_DEFAULT = frozenset({"heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"})
# Samplers on k-diffusion sigmas, which A1111 labels with a "Schedule type" (DDIM/PLMS/DDPM have their own).
SIGMA_SAMPLERS = frozenset({"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "tcd"})
_BY_A1111 = {label.lower(): name for name, label in A1111_SAMPLERS.items()}
# Timestep spacings (`schedules.Spacing`; a test keeps the two identical) and A1111's labels of those it has.
SPACING_NAMES: tuple[str, ...] = ("uniform", "quad", "leading", "trailing", "linspace", "karras", "lcm", "sgm_uniform",
                                  "simple")
A1111_SCHEDULE_TYPES: dict[str, str] = {"karras": "Karras", "sgm_uniform": "SGM Uniform", "simple": "Simple"}


def sampler_name(text: str) -> tuple[str, bool | None]:
    """(ldmtool's sampler name, Karras or None) for an ldmtool or A1111 name, case-insensitive; A1111's older
    combined names ('DPM++ 2M Karras') set Karras. Unknown names come back as given (`get_sampler` refuses them)."""
    key = " ".join(text.split()).lower()
    if key in SAMPLER_NAMES:
        return key, None
    if key in _BY_A1111:
        return _BY_A1111[key], None
    if key.endswith(" karras") and key[: -len(" karras")] in _BY_A1111:
        return _BY_A1111[key[: -len(" karras")]], True
    return text, None


def spacing_name(text: str) -> str | None:
    """ldmtool's spacing name for an ldmtool name or an A1111 schedule type label ('SGM Uniform'),
    case-insensitive; None when it names none."""
    key = "_".join(text.split()).lower()
    return key if key in SPACING_NAMES else None


def schedule_type(sampler: str, karras: bool | None, spacing: str | None = None) -> str | None:
    """A1111's "Schedule type" of a run: Karras or Uniform for the sigma samplers (or the label of a spacing
    A1111 has, such as SGM Uniform), None for the others."""
    if sampler not in SIGMA_SAMPLERS:
        return None
    if spacing in A1111_SCHEDULE_TYPES:
        return A1111_SCHEDULE_TYPES[spacing]
    return "Karras" if (karras if karras is not None else sampler in KARRAS_BY_DEFAULT) else "Uniform"
