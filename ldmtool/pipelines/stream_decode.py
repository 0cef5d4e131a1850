"""One deterministic step, decoded band by band: the sampler's canvas is never held whole.

A run whose whole schedule is one DDIM step from x_T = 0 (`--temperature 0`: the shipped default-superres)
returns the denoiser's x0 itself, and a pointwise first stage decodes any band of latent rows on its own.
So the tiled denoiser's rows go to the decoder as soon as no remaining tile adds to them
(`TiledDenoiser.stream`), and from there to uint8 pixels: at 16 output megapixels the fp32 start latent and
the fused x0 (200 MB each for a 48-channel patch latent) never exist. The same tiles, weights and
arithmetic as `Engine.sample` then `Engine.decode_pixels`, so the same pixels (tests/test_stream_decode.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, TypeGuard

import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.run import SamplerSettings, schedule_for
from ldmtool.runtime.allocator import release_host_memory
from ldmtool.tiling.fusion import TiledDenoiser
from ldmtool.tiling.seamless import seamless
from ldmtool.tiling.vae import PixelCanvas

if TYPE_CHECKING:
    from ldmtool.pipelines.engine import Engine

Add = Callable[[int, int, int, int], torch.Tensor]


def one_step_streamed(engine: "Engine", latent_hw: tuple[int, int], cond: Cond, uncond: Optional[Cond], *,
                      add: Optional[Add] = None, progress: Optional[Callable[[int, int], None]] = None
                      ) -> Optional[torch.Tensor]:
    """uint8 pixels (1, H, W, 3) of one item, as `engine.decode_pixels(engine.sample(...), add=add)` gives them,
    computed band by band; None where the run is not one deterministic step from zero on a tiled canvas with
    a pointwise first stage (the caller then samples and decodes whole). Raises `NonFiniteResult` for NaN/Inf."""
    from ldmtool.pipelines.engine import NonFiniteResult, method

    sigma = _single_step_sigma(engine)
    guided = uncond is not None and engine.resolved()["cfg"] != 1.0
    denoise = engine._denoiser(latent_hw, 2 if guided else 1, guided)
    if sigma is None or not _streamable(denoise, engine):
        return None
    device, _ = engine.placement()
    down = engine.info.downsampling
    x = torch.zeros((), device=device).expand(1, engine.info.latent_channels, *latent_hw)  # x_T = 0, never stored
    canvas = PixelCanvas((1, 3, latent_hw[0] * down, latent_hw[1] * down), add=add)
    decode = method(engine.bundle.first_stage, "decode")

    def emit(rows: torch.Tensor, top: int) -> None:
        canvas.paste(decode(engine._unscaled(rows)), top * down, 0)

    conditioning = Guided(cond, uncond, engine.resolved()["cfg"]) if guided else cond
    with torch.inference_mode(), seamless(engine.bundle.denoiser, axes=engine.axes):
        denoise.stream(x, torch.full((1,), sigma, device=device), conditioning, emit)
    release_host_memory()  # the bands' and tiles' freed buffers, before the image is finished and encoded
    if progress is not None:
        progress(1, 1)
    if not canvas.finite:
        raise NonFiniteResult
    return canvas.pixels


def streams(engine: "Engine", latent_hw: tuple[int, int]) -> bool:
    """Whether `one_step_streamed` runs for a latent of `latent_hw` (an unguided item: superres models)."""
    return _single_step_sigma(engine) is not None and _streamable(engine._denoiser(latent_hw, 1, False), engine)


def _streamable(denoise: object, engine: "Engine") -> TypeGuard[TiledDenoiser]:
    """Whether `denoise` is a tiled denoiser whose rows can be streamed into `engine`'s (pointwise) first stage."""
    pointwise = bool(getattr(engine.bundle.first_stage, "pointwise", False))
    return pointwise and isinstance(denoise, TiledDenoiser) and not denoise.config.wrap_y


def _single_step_sigma(engine: "Engine") -> Optional[float]:
    """The one noise level of a run whose schedule is a single DDIM step to zero from x_T = 0, else None."""
    p = engine.resolved()
    if engine.flow is not None or p["sampler"] != "ddim" or p["temperature"] != 0:
        return None
    settings = SamplerSettings(sampler="ddim", steps=p["steps"], karras=p["karras"], eta=p["eta"],
                               temperature=0.0, spacing=p["spacing"])
    sigmas = schedule_for(settings, engine._alphas_cumprod(), from_image=False).sigmas
    if len(sigmas) != 2 or float(sigmas[-1]) != 0.0:
        return None
    return float(sigmas[0])
