"""The reference code's noise-schedule buffers, by the names checkpoints store them under.

`DDPM.register_schedule` of the CompVis code computes these in float64 numpy and stores float32 copies;
checkpoints carry them, so a bundle built here must have the same names, shapes and (for fresh builds)
values.
"""
from __future__ import annotations

import torch

from ldmtool.diffusion.schedules import make_betas
from ldmtool.errors import CheckpointError

# Order as registered by the reference `DDPM.register_schedule` (lvlb_weights is not persistent).
DDPM_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
LOW_SCALE_BUFFERS = DDPM_BUFFERS[:8]


# CompVis config names -> the shared schedule kinds ("sqrt_linear" is linear in beta itself).
_COMPVIS_KINDS = {"linear": "linear", "cosine": "cosine", "sqrt_linear": "plain_linear", "sqrt": "sqrt"}


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> torch.Tensor:
    """Betas in float64 for a CompVis `beta_schedule` name (computed by `diffusion.schedules.make_betas`)."""
    if schedule not in _COMPVIS_KINDS:
        raise ValueError(f"unknown beta schedule {schedule!r}")
    if schedule != "cosine" and not 0 < linear_start <= linear_end < 1:  # also false for NaN
        raise CheckpointError(f"config linear_start {linear_start} and linear_end {linear_end}: a {schedule} "
                              f"schedule needs 0 < linear_start <= linear_end < 1")
    betas = make_betas(_COMPVIS_KINDS[schedule], n_timestep, linear_start, linear_end, cosine_s)
    if not bool(((betas > 0) & (betas < 1)).all()):  # NaN fails both
        raise CheckpointError(f"config {schedule} schedule (cosine_s {cosine_s}) gives betas outside (0, 1)")
    return betas


def schedule_buffers(
    *, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
    linear_end: float = 2e-2, cosine_s: float = 8e-3,
) -> dict[str, torch.Tensor]:
    """All `DDPM_BUFFERS` (float32), computed like the reference with v_posterior = 0, on the CPU, and placed
    on the default device (under a `torch.device` context, the context's)."""
    target = torch.get_default_device()
    with torch.device("cpu"):
        values = _schedule_values(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    # A bundle built on the meta device (every checkpoint load) gets meta placeholders without computing on meta:
    # torch's meta linspace imports its symbolic-shapes machinery (sympy, dynamo), over a second of a job's start.
    return {name: values[name].to(target) for name in DDPM_BUFFERS}


def _schedule_values(beta_schedule: str, timesteps: int, linear_start: float, linear_end: float,
                     cosine_s: float) -> dict[str, torch.Tensor]:
    betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {name: value.to(torch.float32) for name, value in values.items()}
