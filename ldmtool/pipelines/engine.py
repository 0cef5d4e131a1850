"""What every task pipeline shares: the loaded model, sampling with guidance and tiling, and the first stage.

A pipeline builds conditioning for its task, then calls `Engine.sample` (noise → latent through the chosen
sampler, the tiled denoiser and classifier-free guidance) and `Engine.decode`; everything that can be done
once per run (loading through the process-wide model cache, the schedule, the tile plan and its weights)
is done once. Results that are not finite (the classic fp16 overflow) are recomputed in fp32 and, if still
bad, fail the item instead of writing a wrong image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import DiscreteDenoiser, bind
from ldmtool.diffusion.samplers import default_schedule, get_sampler, progressive, start_latent
from ldmtool.errors import FatalError, ItemError, LdmError
from ldmtool.runtime.cache import model_cache
from ldmtool.runtime.device import choose_device, choose_dtype
from ldmtool.runtime.seeds import NoiseSource
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.memory import choose_tiling, parse_memory
from ldmtool.tiling.seamless import Seamless, parse_seamless, seamless
from ldmtool.tiling.vae import VAETiling, tiled_decode, tiled_encode


@dataclass(frozen=True)
class ModelChoice:
    """`--model/--config/--preset/--no-ema/--prediction/--device/--precision`."""

    model: str = "default"
    config: Optional[Path] = None
    preset: Optional[str] = None
    use_ema: bool = True
    prediction: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class SamplingChoice:
    """Sampling and tiling options; None means "the model's default"."""

    sampler: Optional[str] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    eta: Optional[float] = None
    karras: Optional[bool] = None
    tile: Optional[int] = None
    tile_overlap: Optional[int] = None
    max_memory: Optional[str] = None
    seamless: Optional[str] = None
    vae_tile: Optional[int] = None  # first-stage tile (latent pixels); None: tile when the canvas is large


# Untiled decodes above this many latent pixels go through the tiled first stage (bounded memory).
_VAE_UNTILED_MAX = 128 * 128


class Engine:
    """One model, loaded once, and the sampling machinery around it."""

    def __init__(self, choice: ModelChoice, sampling: SamplingChoice):
        self.choice = choice
        self.sampling = sampling
        self.axes: Seamless = parse_seamless(sampling.seamless)
        self.bundle: Any = None
        self.device: Optional[torch.device] = None
        self.dtype: Optional[torch.dtype] = None

    # -- loading

    def open(self) -> "Engine":
        self.device = choose_device(self.choice.device)
        self.dtype = choose_dtype(self.choice.precision, self.device)
        self.bundle = self._load(self.dtype)
        return self

    def _load(self, dtype: torch.dtype):
        from ldmtool.checkpoints.api import load_model, resolve_source

        weights, _ = resolve_source(self.choice.model)
        choice = self.choice

        def loader():
            return load_model(weights, config=choice.config, preset=choice.preset, device=self.device, dtype=dtype,
                              use_ema=choice.use_ema, prediction=choice.prediction)

        extra = (str(choice.config), choice.preset, choice.use_ema, choice.prediction)
        try:
            return model_cache().load_file(weights, self.device, dtype, loader, *extra)
        except LdmError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise FatalError(f"{weights}: cannot load the model ({err})") from err

    def in_fp32(self) -> "Engine":
        """The same model in fp32 (from the model cache), for recomputing a non-finite half-precision result."""
        if self.dtype == torch.float32:
            return self
        twin = Engine(self.choice, self.sampling)
        twin.device, twin.dtype = self.device, torch.float32
        twin.bundle = twin._load(torch.float32)
        return twin

    def finite(self, compute: Callable[["Engine"], torch.Tensor], label: str) -> torch.Tensor:
        """`compute(engine)`, recomputed in fp32 when a half-precision result is not finite; ItemError when
        even fp32 gives NaN/Inf (never write a wrong image)."""
        result = compute(self)
        if torch.isfinite(result).all():
            return result
        if self.dtype != torch.float32:
            result = compute(self.in_fp32())
            if torch.isfinite(result).all():
                return result
        raise ItemError(f"{label}: the result is not finite (NaN/Inf) even in fp32; nothing was written")

    @property
    def model_path(self) -> Path:
        return self.bundle.load_info.path

    @property
    def defaults(self) -> dict[str, Any]:
        from ldmtool.checkpoints.config import ldmtool_block

        return ldmtool_block(self.bundle.config)

    @property
    def unet_params(self) -> dict[str, Any]:
        return self.bundle.config["model"]["params"]["unet_config"]["params"]

    @property
    def latent_channels(self) -> int:
        return int(self.unet_params["out_channels"])

    @property
    def downsampling(self) -> int:
        """Pixels per latent pixel of the first stage (4 for f=4, 8 for SD)."""
        dd = self.bundle.config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
        return 2 ** (len(dd["ch_mult"]) - 1)

    @property
    def native_latent(self) -> int:
        return int(self.unet_params.get("image_size", 64))

    # -- resolved sampling parameters (recorded in every output's metadata)

    def resolved(self) -> dict[str, Any]:
        d, s = self.defaults, self.sampling
        sampler = s.sampler or d.get("default_sampler", "ddim")
        info = get_sampler(sampler)
        return {
            "sampler": sampler,
            "steps": s.steps or d.get("default_steps") or info.default_steps,
            "cfg": s.cfg if s.cfg is not None else float(d.get("default_cfg", 1.0)),
            "eta": s.eta,
            "karras": s.karras,
            "seamless": s.seamless or None,
        }

    # -- sampling

    def sample(
        self,
        latent_hw: tuple[int, int],
        seeds: Sequence[int],
        cond: Cond,
        uncond: Optional[Cond] = None,
        *,
        init_latent: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        step_hook: Optional[Callable[[torch.Tensor, float], torch.Tensor]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> torch.Tensor:
        """Latents (B, C, h, w) for one batch; every item's noise comes from its own seed.

        `init_latent` + `strength` < 1 starts part-way down the schedule from the noised latent (img2img);
        `step_hook(x, sigma_next)` may replace x after every step (masked sampling).
        """
        p = self.resolved()
        schedule = default_schedule(p["sampler"], self.bundle.alphas_cumprod, p["steps"], karras=p["karras"])
        steps = schedule.steps
        if init_latent is not None and strength < 1.0:
            steps = max(1, min(steps, round(strength * steps)))
            schedule = schedule.tail(steps)
        sigmas = schedule.sigmas
        noise = NoiseSource(seeds)
        shape = (self.latent_channels, *latent_hw)
        first = noise.randn(shape, device=self.device, dtype=torch.float32)
        if init_latent is not None and strength < 1.0:
            x = init_latent.float() + first * float(sigmas[0])
        else:
            x = start_latent(first, float(sigmas[0]))
        denoise = self._denoiser(latent_hw, len(seeds), p["cfg"], uncond is not None)
        guided = Guided(cond, uncond, p["cfg"]) if uncond is not None and p["cfg"] != 1.0 else cond
        model = bind(denoise, guided)
        options = {"eta": p["eta"]} if "eta" in get_sampler(p["sampler"]).options else {}
        with torch.inference_mode(), seamless(self.bundle.unet, axes=self.axes):
            for step in progressive(p["sampler"], model, x.to(self.dtype), sigmas, noise=noise.like, **options):
                x = step.x
                if step_hook is not None:
                    x = step_hook(x, step.sigma_next)
                if progress is not None:
                    progress(step.index + 1, step.total)
        return x.float()

    def _denoiser(self, latent_hw: tuple[int, int], items: int, cfg: float, has_uncond: bool):
        denoise: Callable = DiscreteDenoiser.from_bundle(self.bundle)
        guided = has_uncond and cfg != 1.0
        if guided:
            from ldmtool.diffusion.guidance import CFGDenoiser

            denoise = CFGDenoiser(denoise)
        s = self.sampling
        budget = parse_memory(s.max_memory) if s.max_memory else None
        tiling = choose_tiling(latent_hw, native_tile=self.native_latent, items=items * (2 if guided else 1),
                               tile=s.tile, overlap=s.tile_overlap, budget=budget,
                               wrap=(self.axes.y, self.axes.x))
        if tiling is None and not self.axes:
            return denoise
        if tiling is None:  # seamless on a canvas that fits one tile: circular padding alone wraps it
            return denoise
        config = TileConfig(tile=tiling.tile, overlap=tiling.overlap, tile_batch=tiling.tile_batch,
                            wrap_y=self.axes.y, wrap_x=self.axes.x, multiple=8)
        return TiledDenoiser(denoise, config)

    # -- first stage

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1] (B, 3, H, W)."""
        first = self.bundle.first_stage
        x = images.to(self.device, self.dtype)
        with torch.inference_mode(), seamless(first, axes=self.axes):
            if self._vae_tiled(x.shape[-2] // self.downsampling, x.shape[-1] // self.downsampling):
                z = tiled_encode(first, x, VAETiling(tile=self._vae_tile() * self.downsampling))
            else:
                z = first.encode(x)
        return z.float() * self.bundle.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) float32 on the CPU from scaled latents (not clamped: callers check
        finiteness first, then clamp)."""
        first = self.bundle.first_stage
        z = (latents / self.bundle.scale_factor).to(self.device, self.dtype)
        with torch.inference_mode(), seamless(first, axes=self.axes):
            if self._vae_tiled(z.shape[-2], z.shape[-1]):
                image = tiled_decode(first, z, VAETiling(tile=self._vae_tile()))
            else:
                image = first.decode(z)
        return (image.float().cpu() + 1) / 2

    def _vae_tiled(self, h: int, w: int) -> bool:
        tile = self.sampling.vae_tile
        if tile == 0 or self.sampling.tile == 0:
            return False
        return h * w > (tile * tile if tile else _VAE_UNTILED_MAX)

    def _vae_tile(self) -> int:
        return self.sampling.vae_tile or 64


def to_model_range(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] → (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1


def to_array(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) float32 numpy."""
    return image.permute(1, 2, 0).contiguous().numpy()

