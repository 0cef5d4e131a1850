"""What every task pipeline shares: the loaded model, sampling with guidance and tiling, and the first stage.

A pipeline builds conditioning for its task, then calls `Engine.sample` (noise → latent through the chosen
sampler, the tiled denoiser and classifier-free guidance) and `Engine.decode`; everything that can be done
once per run (loading through the process-wide model cache, the schedule, the tile plan and its weights)
is done once. Results that are not finite (the classic fp16 overflow) are recomputed in fp32 and, if still
bad, fail the item instead of writing a wrong image.
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ldmtool.checkpoints.bundle import LatentDiffusionBundle
from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import DiscreteDenoiser, per_row
from ldmtool.diffusion.guidance import CFGDenoiser
from ldmtool.diffusion.handoff import Handoff
from ldmtool.diffusion.names import SPACING_NAMES, sampler_name, spacing_name
from ldmtool.diffusion.run import SamplerSettings, sample_latents
from ldmtool.diffusion.samplers import check_options, chosen_spacing, default_schedule, get_sampler
from ldmtool.errors import FatalError, ItemError, LdmError, UsageError
from ldmtool.families.info import ModelInfo
from ldmtool.nets.compiled import decoder
from ldmtool.options import ModelChoice, SamplingChoice
from ldmtool.pipelines.arrays import to_model_range
from ldmtool.pipelines.control_engine import check_adapter_cells
from ldmtool.runtime.allocator import release_host_memory
from ldmtool.runtime.cache import model_cache
from ldmtool.runtime.device import PrecisionChoice, choose_device, resolve_precision
from ldmtool.runtime.seeds import NoiseSource
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.memory import check_tile, choose_tiling, parse_memory, tiles_across_the_wrap
from ldmtool.tiling.seamless import Seamless, parse_seamless, seamless
from ldmtool.tiling.vae import PixelCanvas, PixelSource, TensorCanvas, VAETiling, tiled_decode, tiled_encode

if TYPE_CHECKING:
    from ldmtool.addons.apply import ModelAddons
    from ldmtool.addons.distilled import DistilledSettings
    from ldmtool.pipelines.control import ControlRun
    from ldmtool.pipelines.flow_engine import FlowRun

# Untiled decodes above this many latent pixels go through the tiled first stage (bounded memory).
_VAE_UNTILED_MAX = 128 * 128


class Engine:
    """One model, loaded once, and the sampling machinery around it."""

    bundle: LatentDiffusionBundle  # set by open()

    def __init__(self, choice: ModelChoice, sampling: SamplingChoice):
        self.choice = choice
        self.sampling = sampling
        self.axes: Seamless = parse_seamless(sampling.seamless)
        check_tile(sampling.tile, sampling.tile_overlap)
        self.device: Optional[torch.device] = None
        self.dtype: Optional[torch.dtype] = None
        self.precision: Optional[PrecisionChoice] = None  # the dtype and why (recorded in every output)
        self.budget: Optional[int] = None  # --max-memory in bytes, parsed once by validate()
        self.networks: tuple[Any, ...] = ()  # LoRAs of a prompt's <lora:...> tags (`with_networks`)
        self.control: Optional["ControlRun"] = None  # --controlnet (set by tasks that take it)
        self._distilled: Optional[tuple[Optional["DistilledSettings"]]] = None  # found once (`distilled`)
        self.flow: Optional["FlowRun"] = None  # a flow-matching model's side of sampling (set by open())

    def validate(self) -> None:
        """UsageError for a sampling or tiling option that every item would fail on, before anything loads
        (the model's defaults are checked by `open()`); parses `--max-memory` once for every canvas."""
        s = self.sampling
        self.budget = parse_memory(s.max_memory) if s.max_memory is not None else None
        for name, value in (("cfg", s.cfg), ("eta", s.eta), ("temperature", s.temperature)):
            if value is not None and not math.isfinite(value):
                raise UsageError(f"--{name} {value}: must be a finite number")
        if s.sampler is not None:
            check_options(s.sampler, eta=s.eta, tcd_gamma=s.tcd_gamma)
        self.addons()  # --lora, --vae files and the add-on folders exist (UsageError naming the one that does not)
        self._user_spacing(s.karras if s.karras is not None else sampler_name(s.sampler or "")[1])

    def _user_spacing(self, karras: Optional[bool]) -> Optional[str]:
        """--spacing as ldmtool names it (A1111's labels too); UsageError for an unknown name, or one that
        contradicts --karras/--no-karras (or a sampler name that says Karras)."""
        given = self.sampling.spacing
        if given is None:
            return None
        spacing = spacing_name(given)
        if spacing is None:
            raise UsageError(f"--spacing {given!r} is not a spacing (choose one of {', '.join(SPACING_NAMES)})")
        if karras is not None and karras != (spacing == "karras"):
            raise UsageError(f"--spacing {given} contradicts {'--karras' if karras else '--no-karras'}: give one of them")
        return spacing

    # -- loading

    def open(self) -> "Engine":
        self.validate()
        self.device = choose_device(self.choice.device)
        self.precision = resolve_precision(self.choice.precision, self.device)
        self.dtype = self.precision.dtype
        self.bundle = self._load(self.dtype)
        from ldmtool.pipelines.flow_engine import flow_run

        self.flow = flow_run(self)  # checks a flow model's parts (text encoders, autoencoder) itself
        if self.flow is None:
            self._check_parts()
        self._check_schedule()
        return self

    def _check_parts(self) -> None:
        """A file that holds one part of a model (a transformer without its autoencoder and text encoders, an
        autoencoder alone) cannot run a task, nor can a model whose family has no pipeline yet: one line saying so."""
        info = self.bundle.info
        problems = [info.not_runnable] if info.not_runnable else []
        if info.missing_parts:
            problems.insert(0, f"this file holds only part of a {info.family} model; a run also needs "
                               f"{' and '.join(info.missing_parts)}, which ldmtool cannot load beside it yet")
        if problems:
            raise FatalError(f"{self.model_path}: {'; '.join(problems)}")

    def _check_schedule(self) -> None:
        """Step counts the model's schedule cannot take are a usage error when the command starts, not a
        failure of every item (the schedule itself is cheap; sampling builds it again)."""
        if self.flow is not None:
            self.flow.check_schedule(self)
            return
        p = self.resolved()
        check_options(p["sampler"], eta=p["eta"], tcd_gamma=p.get("tcd_gamma"))  # the default sampler may take neither
        default_schedule(p["sampler"], self._alphas_cumprod(), p["steps"], spacing=p["spacing"])

    def _alphas_cumprod(self) -> torch.Tensor:
        """The model's schedule buffer (a registered buffer, which mypy reads through `nn.Module.__getattr__`
        as `Tensor | Module`)."""
        alphas = self.bundle.alphas_cumprod
        assert isinstance(alphas, torch.Tensor), "alphas_cumprod is a registered buffer of every bundle"
        return alphas

    def _load(self, dtype: torch.dtype) -> LatentDiffusionBundle:
        from ldmtool.checkpoints.api import load_model, resolve_source

        weights, _ = resolve_source(self.choice.model)
        choice = self.choice
        device = self.device
        assert device is not None, "open() or in_fp32() chooses the device before loading"

        addons = self.addons()

        def loader() -> Any:
            bundle = load_model(weights, config=choice.config, preset=choice.preset, device=device, dtype=dtype,
                                use_ema=choice.use_ema, prediction=choice.prediction)
            bundle = addons.apply(bundle, device=device, dtype=dtype)
            if choice.compile:
                from ldmtool.nets.compiled import compile_decode, compile_network

                if bundle.denoiser is not None:
                    compile_network(bundle.denoiser, dtype)  # after the add-ons: it freezes the weights
                if bundle.first_stage is not None:
                    compile_decode(bundle.first_stage, dtype)
            return bundle

        # A compiled network is another cache entry: a run without --compile must not get it.
        extra = (str(choice.config), choice.preset, choice.use_ema, choice.prediction, *addons.cache_key(),
                 *(("compiled",) if choice.compile else ()))
        try:
            bundle: LatentDiffusionBundle = model_cache().load_file(weights, device, dtype, loader, *extra)
            return bundle
        except LdmError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise FatalError(f"{weights}: cannot load the model ({err})") from err

    def addons(self) -> "ModelAddons":
        """The LoRAs (`--lora` and the run's prompt tags, `self.networks`) and `--vae` this engine's model has."""
        from ldmtool.addons.apply import ModelAddons

        return ModelAddons.of(self.choice, self.networks)

    def with_networks(self, networks: tuple[Any, ...]) -> "Engine":
        """This engine with another set of LoRAs: the model with them applied, from the model cache."""
        twin = copy.copy(self)
        twin.networks = networks
        assert self.dtype is not None, "open() chooses the dtype before networks change"
        twin.bundle = twin._load(self.dtype)
        return twin

    def in_fp32(self) -> "Engine":
        """The same model in fp32 (from the model cache), for recomputing a non-finite half-precision result."""
        if self.dtype == torch.float32:
            return self
        twin = Engine(self.choice, self.sampling)
        twin.device, twin.dtype, twin.budget, twin.networks = self.device, torch.float32, self.budget, self.networks
        twin.control = self.control
        twin.bundle = twin._load(torch.float32)
        twin.flow = self.flow
        return twin

    def finite(self, compute: Callable[["Engine"], torch.Tensor], label: str) -> torch.Tensor:
        """`compute(engine)`, recomputed in fp32 when a half-precision result is not finite (a NaN/Inf float
        result, or `NonFiniteResult` raised); ItemError when even fp32 fails (never write a wrong image)."""
        for engine in self._precisions():
            try:
                result = compute(engine)
            except NonFiniteResult:
                continue
            if not result.is_floating_point() or torch.isfinite(result).all():
                return result
        raise ItemError(f"{label}: the result is not finite (NaN/Inf) even in fp32; nothing was written")

    def _precisions(self) -> Iterator["Engine"]:
        """This engine, then (half precision only) its fp32 twin, loaded only if it is needed."""
        yield self
        if self.dtype != torch.float32:
            yield self.in_fp32()

    @property
    def model_path(self) -> Path:
        return self.bundle.load_info.path

    @property
    def info(self) -> ModelInfo:
        """What the model is (latent shape, conditioning, run defaults), built when it was loaded."""
        return self.bundle.info

    def cond_stage(self, purpose: str) -> torch.nn.Module:
        """The model's conditioning stage; UsageError for a model (config) that has none: the wrong model."""
        stage = self.bundle.cond_stage
        if stage is None:
            raise UsageError(f"{self.model_path}: the {self.info.family} model has no conditioning stage "
                             f"(cond_stage_config), so it cannot {purpose}")
        return stage

    # -- resolved sampling parameters (recorded in every output's metadata)

    def resolved(self) -> dict[str, Any]:
        d, s = self.info.defaults, self.sampling
        fill = self.from_file_name()
        sampler, named_karras = sampler_name(s.sampler or fill.get("sampler") or d.sampler)  # A1111 names too
        info = get_sampler(sampler)
        karras = s.karras if s.karras is not None else named_karras
        spacing = self._user_spacing(karras) or fill.get("spacing") or (d.spacing if karras is None else None)
        resolved = {
            "sampler": sampler,
            "steps": s.steps or fill.get("steps") or d.steps or info.default_steps,
            "cfg": s.cfg if s.cfg is not None else fill.get("cfg", d.cfg),
            "eta": s.eta,
            "temperature": s.temperature if s.temperature is not None else d.temperature,
            "karras": karras,
            "seamless": s.seamless or None,
            "spacing": chosen_spacing(sampler, karras, spacing).value,
        }
        gamma = s.tcd_gamma if s.tcd_gamma is not None else fill.get("tcd_gamma")
        resolved = resolved if gamma is None else {**resolved, "tcd_gamma": gamma}
        return resolved if self.flow is None else self.flow.resolved(self, resolved)

    def item_recorded(self, latent_hw: tuple[int, int]) -> dict[str, Any]:
        """What an output records of its sampling that depends on its latent size (a flow model's resolution shift)."""
        return {} if self.flow is None else self.flow.item_recorded(self, latent_hw)

    # -- distilled few-step models named by their files (addons/distilled.py)

    def distilled(self) -> Optional["DistilledSettings"]:
        """The published settings of a distilled model named by the checkpoint or a --lora file, if any."""
        if self._distilled is None:
            from ldmtool.addons.apply import ModelAddons
            from ldmtool.addons.distilled import distilled_settings

            loras = [network.path.name for network in ModelAddons.of(self.choice).networks]
            self._distilled = (distilled_settings([Path(self.choice.model).name, *loras]),)
        return self._distilled[0]

    def from_file_name(self) -> dict[str, Any]:
        """The distilled model's settings this run uses: those of options the user left out (a spacing only
        when --karras/--no-karras is not given either; TCD's gamma only for the tcd sampler)."""
        distilled = self.distilled()
        if distilled is None:
            return {}
        s = self.sampling
        fill = distilled.unset_in(lambda name: getattr(s, name))
        if s.karras is not None or sampler_name(s.sampler or "")[1] is not None:
            fill.pop("spacing", None)
        if sampler_name(s.sampler or fill.get("sampler") or "")[0] != "tcd":
            fill.pop("tcd_gamma", None)
        return fill

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
        repaint: Optional[torch.Tensor] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        handoff: Optional[Handoff] = None,
        start: Optional[torch.Tensor] = None,
        noise: Optional[NoiseSource] = None,
        hints: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Scaled latents (B, C, h, w) for one batch; every item's noise comes from its own seed.

        `init_latent` (scaled) starts part-way down the schedule at `strength` (img2img); with `repaint`
        (B, 1, h, w), 1 = repaint, the rest of `init_latent` is kept (masked sampling, any model).
        Guidance runs when `uncond` is given and the cfg scale is not 1. With `handoff`, one side of a base ->
        refiner hand-off runs (of the schedule `strength` runs); the second side starts from the first's latent
        (`start`) and takes the first side's `noise` source, so each item's noise stream goes on across it.
        `hints`: one (B, 3, H, W) image in [0, 1] per ControlNet of `self.control`.
        """
        if self.flow is not None:
            if handoff is not None or start is not None or hints is not None:
                raise UsageError(f"{self.info.family}: a refiner hand-off, ControlNets and adapters do not run with "
                                 "flow-matching models yet")
            return self.flow.sample(self, latent_hw, seeds, cond, uncond, init_latent=init_latent, strength=strength,
                                    repaint=repaint, progress=progress, noise=noise)
        p = self.resolved()
        settings = SamplerSettings(sampler=p["sampler"], steps=p["steps"], karras=p["karras"], eta=p["eta"],
                                   strength=strength, temperature=p["temperature"], handoff=handoff,
                                   spacing=p["spacing"], tcd_gamma=p.get("tcd_gamma"))
        guided = uncond is not None and p["cfg"] != 1.0
        network = None
        if hints is not None and self.control:
            network, cond, uncond = self._controlled(settings, init_latent is not None, hints, cond, uncond)
        denoise = self._denoiser(latent_hw, 2 if guided else 1, guided, network)
        conditioning = Guided(cond, uncond, p["cfg"]) if guided else cond
        callback = None if progress is None else (lambda step: progress(step.index + 1, step.total))
        shape = None if init_latent is not None or start is not None else (self.info.latent_channels, *latent_hw)
        device, _ = self.placement()
        # The sampler's state stays fp32 whatever the networks compute in (they take and give back fp32): in
        # bf16 a latent rounded at every step drifts from the fp32 trajectory far more than the network's own
        # rounding moves it (benchmarks/precision_quality.py), and this arithmetic costs nothing next to them.
        if init_latent is not None:
            init_latent = init_latent.to(device, torch.float32)
        if start is not None:
            start = start.to(device, torch.float32)
        with torch.inference_mode(), seamless(self.bundle.denoiser, axes=self.axes):
            z = sample_latents(denoise, conditioning, self._alphas_cumprod(), noise or NoiseSource(seeds), settings,
                               shape=shape, init_latent=init_latent, repaint=repaint, start=start, callback=callback,
                               device=device, dtype=torch.float32)
        return z

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype the model was loaded on (set by `open()`, which every task calls first)."""
        assert self.device is not None and self.dtype is not None, "Engine.open() was not called"
        return self.device, self.dtype

    def _controlled(self, settings: SamplerSettings, from_image: bool, hints: Sequence[torch.Tensor], cond: Cond,
                    uncond: Optional[Cond]) -> tuple[Any, Cond, Optional[Cond]]:
        """The UNet with the run's ControlNets before it, and the conditioning carrying their hints."""
        from ldmtool.pipelines.control_engine import controlled

        return controlled(self, settings, from_image, hints, cond, uncond)

    def _denoiser(self, latent_hw: tuple[int, int], rows_per_item: int, guided: bool, network: Any = None
                  ) -> Callable[..., torch.Tensor]:
        """The model's denoiser, with guidance inside and the tiled engine outside when the canvas needs it.

        The tiling is planned for one item (its cond and uncond rows), never for the batch: how many items
        share a batch must not change the tile, or `--batch-size` would change the pixels."""
        return self.denoiser_around(DiscreteDenoiser.from_bundle(self.bundle, network=network), latent_hw,
                                    rows_per_item, guided, align=getattr(network, "tile_align", 1))

    def denoiser_around(self, denoise: Callable[..., torch.Tensor], latent_hw: tuple[int, int], rows_per_item: int,
                        guided: bool, *, patch: int = 1, align: int = 1, wrap_by_tiles: bool = False
                        ) -> Callable[..., torch.Tensor]:
        """`denoise` with guidance inside and the tiled engine outside when the canvas needs it; tiles start on whole
        `patch`es (a transformer's tokens) and `align`-pixel cells (a T2I-Adapter's); `wrap_by_tiles`: --seamless
        is made by tiles across the wrap edge alone (a network without padded convolutions)."""
        if guided:
            denoise = CFGDenoiser(denoise)
        s = self.sampling
        tiling = choose_tiling(latent_hw, native_tile=self.info.defaults.tile, items=rows_per_item, tile=s.tile,
                               overlap=s.tile_overlap, budget=self.budget, wrap=(self.axes.y, self.axes.x))
        if wrap_by_tiles and self.axes:
            tiling = tiles_across_the_wrap(tiling, latent_hw, (self.axes.y, self.axes.x), patch=patch,
                                           overlap=s.tile_overlap)
        # No `device=` on purpose: without --max-memory, canvases larger than the model's native size are always
        # tiled, so memory stays bounded by the tile (cron jobs share machines), not by whatever is free.
        if tiling is None:  # fits one tile (seamless then wraps through circular padding alone)
            return denoise
        check_adapter_cells(tiling, latent_hw, align)
        config = TileConfig(tile=tiling.tile, overlap=tiling.overlap, tile_batch=tiling.tile_batch,
                            wrap_y=self.axes.y, wrap_x=self.axes.x, shift=bool(s.tile_shift), align=align)
        return TiledDenoiser(denoise, config)

    # -- first stage

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1] (B, 3, H, W), one image at a time (see `per_row`)."""
        first = self.bundle.first_stage
        x = images.to(self.device, self._first_stage_dtype())
        down = self.info.downsampling
        tiled = self._vae_tiled(x.shape[-2] // down, x.shape[-1] // down)
        with torch.inference_mode(), seamless(first, axes=self.axes):
            if tiled:
                z = torch.cat([tiled_encode(first, row, VAETiling(tile=self._vae_tile() * down))
                               for row in torch.split(x, 1)])
            else:
                z = per_row(method(first, "encode"), x)
        return self._scaled(z)

    def _scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's latent of a raw first-stage latent: (raw - shift) * scale (the shift is 0 but for FLUX.1 and SD3)."""
        return (raw.float() - getattr(self.bundle, "shift_factor", 0.0)) * self.bundle.scale_factor

    def encode_pixels(self, pixels: np.ndarray, multiple: int) -> torch.Tensor:
        """Scaled latent (1, C, h, w) of one uint8 image (H, W, 3), edges replicated up to `multiple`. A tiled
        encode reads the pixels tile by tile (`PixelSource`), so no full-size float image is made."""
        height, width = pixels.shape[:2]
        padded = (height + (-height) % multiple, width + (-width) % multiple)
        down = self.info.downsampling
        if not self._vae_tiled(padded[0] // down, padded[1] // down):
            image = to_model_range(pixels)
            return self.encode(torch.nn.functional.pad(image, (0, padded[1] - width, 0, padded[0] - height),
                                                       mode="replicate"))
        first = self.bundle.first_stage
        with torch.inference_mode(), seamless(first, axes=self.axes):
            z = tiled_encode(first, PixelSource(pixels, padded), VAETiling(tile=self._vae_tile() * down))
        return self._scaled(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) float32 on the CPU from scaled latents (not clamped: callers check
        finiteness first, then clamp)."""
        images = self._decode_rows(latents, lambda shape, dtype: TensorCanvas.empty(shape, dtype, "cpu"))
        return (torch.cat(images).float() + 1) / 2

    def decode_pixels(self, latents: torch.Tensor, add: Optional[Callable[[int, int, int, int], torch.Tensor]] = None
                      ) -> torch.Tensor:
        """Like `decode`, but straight to uint8 pixels (B, H, W, 3) on the CPU, rounded as the image writer
        rounds. Tiled decodes convert tile by tile, so no full-size float image is ever made (it would be
        the largest buffer of a big super-resolution). `add(top, left, height, width)` gives values in model
        range added to each decoded tile before rounding. Raises `NonFiniteResult` for NaN/Inf."""
        canvas = PixelCanvas if add is None else functools.partial(PixelCanvas, add=add)
        canvases = self._decode_rows(latents, canvas)
        if not all(canvas.finite for canvas in canvases):
            raise NonFiniteResult
        return torch.cat([canvas.pixels for canvas in canvases])

    def _decode_rows(self, latents: torch.Tensor, make_canvas: Callable[[Sequence[int], torch.dtype], Any]) -> list[Any]:
        """The first stage's decode of scaled latents, one latent at a time (see `per_row`), each pasted into
        `make_canvas(shape, dtype)` (tile by tile when the canvas is large, whole otherwise); returns the
        canvases' `result()`s."""
        first = self.bundle.first_stage
        tiled = self._vae_tiled(latents.shape[-2], latents.shape[-1])
        # A pointwise first stage decodes strip by strip, each unscaled as it goes: no latent-sized copy.
        by_strip = tiled and getattr(first, "pointwise", False)
        z = latents if by_strip else self._unscaled(latents)
        decode = decoder(first, seamless=bool(self.axes))
        results = []
        with torch.inference_mode(), seamless(first, axes=self.axes):
            for row in torch.split(z, 1):
                if tiled:
                    results.append(tiled_decode(first, row, VAETiling(tile=self._vae_tile()), output=make_canvas,
                                                prepare=self._unscaled if by_strip else None))
                    release_host_memory()
                    continue
                image = decode(row)
                canvas = make_canvas(image.shape, image.dtype)
                canvas.paste(image, 0, 0)
                results.append(canvas.result())
        return results

    def _unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        """The first stage's raw latent of scaled latents, on its device and in its dtype."""
        raw = (latents / self.bundle.scale_factor).add_(getattr(self.bundle, "shift_factor", 0.0))
        return raw.to(self.device, self._first_stage_dtype())

    def _first_stage_dtype(self) -> Optional[torch.dtype]:
        """The run's precision, but float32 for a first stage without weights (a reshape: half precision would
        only drop bits)."""
        first = self.bundle.first_stage
        return torch.float32 if next(first.parameters(), None) is None else self.dtype

    def _vae_tiled(self, h: int, w: int) -> bool:
        tile = self.sampling.vae_tile
        if tile == 0 or self.sampling.tile == 0:
            return False
        return h * w > (tile * tile if tile else _VAE_UNTILED_MAX)

    def _vae_tile(self) -> int:
        return self.sampling.vae_tile or 64


class NonFiniteResult(Exception):
    """A decoded image had NaN/Inf values (`Engine.finite` recomputes in fp32)."""


def method(module: torch.nn.Module, name: str) -> Callable[..., torch.Tensor]:
    """`module.<name>`, a network method that returns a tensor (`encode`, `decode`), typed as such: the
    bundle's networks are typed `nn.Module`, whose attributes mypy reads through `nn.Module.__getattr__`
    (`Tensor | Module`)."""
    bound: Callable[..., torch.Tensor] = getattr(module, name)
    return bound
