"""Super-resolution: the LDM BSR family (low-res image concatenated at latent resolution) and the SD2 x4
upscaler (noise-augmented low-res image + noise level as class label + optional prompt).

Any `--scale`: the native ×4 model runs `passes` times (see `native_passes`), then the remainder is resampled
with a high-quality filter (area when shrinking, Lanczos when enlarging) to exactly round(s·h) × round(s·w).
Alpha is upscaled separately with Lanczos. Large outputs go through the tiled engine and tiled first stage.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ldmtool.diffusion.cond import Cond
from ldmtool.errors import ItemError, UsageError
from ldmtool.families.info import Conditioning
from ldmtool.io.discover import Item
from ldmtool.io.images import LoadedImage, read_image
from ldmtool.pipelines.arrays import to_model_range
from ldmtool.pipelines.base import ModelTask, carried, input_path, input_size
from ldmtool.pipelines.colour_fix import colour_fix_, config_switch
from ldmtool.pipelines.consistency import back_project_
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.stream_decode import one_step_streamed, streams
from ldmtool.runtime.jobs import Job, Output

NATIVE_SCALE = 4


def native_passes(scale: float) -> int:
    """How many ×4 model passes a scale takes: the nearest power of 4 in log space, at least one.

    2 and 3 → one pass then shrink; 4 → one; 6 → one then enlarge ×1.5; 8 → two then shrink ×0.5; 16 → two.
    """
    return max(1, round(math.log(scale, NATIVE_SCALE)))


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W[, C]) uint8, or float32 in [0, 1], to (width, height) with area (shrink) or Lanczos
    (enlarge); the dtype is kept (OpenCV rounds and saturates uint8)."""
    width, height = size
    if (array.shape[1], array.shape[0]) == (width, height):
        return array
    shrinking = width * height < array.shape[0] * array.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    return out if array.dtype == np.uint8 else np.clip(out, 0.0, 1.0).astype(np.float32)


def resample_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample (H, W) float32 alpha like `resample`, without Lanczos ringing: each output value is clamped to
    the range of the input values around it (3x3), so a fully transparent or opaque region stays exactly so
    and no value leaves the input alpha's own range."""
    out = resample(alpha, size)
    if out is alpha:
        return alpha
    kernel = np.ones((3, 3), np.uint8)
    low = cv2.resize(cv2.erode(alpha, kernel), size, interpolation=cv2.INTER_LINEAR)
    high = cv2.resize(cv2.dilate(alpha, kernel), size, interpolation=cv2.INTER_LINEAR)
    clamped: np.ndarray = np.clip(out, low, high).astype(np.float32)
    return clamped


class SuperresTask(ModelTask):
    """Each item: read the image → ×4 model passes (low-res conditioning → sample → decode to pixels → colour
    fix and back-projection) → resample to the exact output size; alpha resampled beside it."""

    command = "superres"
    reads_images = True

    def __init__(self, engine: Engine, *, scale: float, prompt: str = "", negative: str = "",
                 noise_level: Optional[int] = None, max_pixels: Optional[int] = None,
                 colour_fix: Optional[bool] = None, consistency: Optional[bool] = None):
        super().__init__(engine, params={"scale": scale})
        self.scale = scale
        self.prompt, self.negative = prompt, negative
        self.noise_level = noise_level
        self.max_pixels = max_pixels
        self.colour_fix = colour_fix  # None: the model config's `ldmtool.colour_fix` (absent = off)
        self.consistency = consistency  # None: the model config's `ldmtool.consistency` (absent = off)
        self._context: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # -- once per run

    def validate(self) -> None:
        super().validate()
        if not (self.scale > 1 and math.isfinite(self.scale)):
            raise UsageError(f"--scale {self.scale}: must be a finite number more than 1 (e.g. 2, 4 or 8)")

    def check_model(self, engine: Engine) -> None:
        info = engine.info
        if info.conditioning not in (Conditioning.CONCAT, Conditioning.HYBRID_ADM):
            raise UsageError(f"{engine.model_path}: a {info.family} model cannot do super-resolution "
                             "(it needs a low-resolution image as concat conditioning)")
        self.upscaler = info.conditioning is Conditioning.HYBRID_ADM
        if not self.upscaler:
            self._check_unconditioned(engine)
        if self.colour_fix is None:
            self.colour_fix = config_switch(info.defaults.colour_fix, "colour_fix", engine.model_path)
        if self.consistency is None:
            self.consistency = config_switch(info.defaults.consistency, "consistency", engine.model_path)
        if self.upscaler:
            self.noise_level = self.noise_level if self.noise_level is not None else info.defaults.noise_level
            self._context = self._encode_text()  # once per run, shared by every item and tile

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """--colour-fix and --consistency: the model config's switches; --noise-level: an upscaler's."""
        switches = {name: getattr(info.defaults, name) for name in ("colour_fix", "consistency")}
        defaults = {name: value for name, value in switches.items() if isinstance(value, bool)}  # else: fatal at open
        if info.conditioning is Conditioning.HYBRID_ADM:
            defaults["noise_level"] = info.defaults.noise_level
        return defaults

    def _check_unconditioned(self, engine: Engine) -> None:
        """A model conditioned on the low-res image alone (LDM BSR) takes no prompt and no guidance: options
        that would change nothing are a usage error, not silently ignored."""
        where = f"the {engine.info.family} model {engine.model_path}"
        for flag, text in (("--prompt", self.prompt), ("--negative", self.negative)):
            if text:
                raise UsageError(f"{flag} {text!r}: {where} takes no prompt (only the low-resolution image); "
                                 f"drop {flag}, or use a text-guided upscaler")
        cfg = engine.sampling.cfg
        if cfg is not None and cfg != 1.0:
            raise UsageError(f"--cfg {cfg}: {where} has no unconditional input, so classifier-free guidance "
                             "cannot run; drop --cfg (1 = off is the only value it takes)")

    def recorded(self, engine: Engine) -> dict[str, Any]:
        params = {**super().recorded(engine), "colour_fix": self.colour_fix, "consistency": self.consistency}
        if self.upscaler:
            params.update(noise_level=self.noise_level, prompt=self.prompt, negative=self.negative)
        return params

    def _encode_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt and negative in A1111's syntax (pipelines/prompt_encoding.py), as the text commands read them."""
        from ldmtool.pipelines.text import text_conditioner

        texts = text_conditioner(self.engine, self.engine.cond_stage("encode the prompt"))
        return texts.pair([self.prompt], [self.negative])

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The input's size (from its header) times --scale."""
        size = input_size(item, self.max_pixels)
        return None if size is None else output_size(*size, self.scale)

    def planned_latents(self, size: tuple[int, int], down: int) -> list[tuple[int, int]]:
        """Each native ×4 pass samples a latent of 4x its input's size."""
        width, height = size[0] / self.scale, size[1] / self.scale
        latents = []
        for _ in range(native_passes(self.scale)):
            width, height = width * NATIVE_SCALE, height * NATIVE_SCALE
            latents.append((math.ceil(height / down), math.ceil(width / down)))
        return latents

    def latent_copies(self, latent_hw: tuple[int, int]) -> Optional[int]:
        """None (the planner's count), or 0 where the one step is decoded band by band (`stream_decode`)."""
        return 0 if streams(self.engine, latent_hw) else None

    # -- each item

    def load(self, job: Job) -> LoadedImage:
        return self.check_input(read_image(input_path(job), max_pixels=self.max_pixels), job.item.label)

    def check_input(self, image: LoadedImage, label: str) -> LoadedImage:
        if image.size[0] < 2 or image.size[1] < 2:
            raise ItemError(f"{label}: {image.size[0]}x{image.size[1]} is too small to upscale")
        return image

    def run(self, jobs: list[Job]) -> list[Output]:
        return [self._upscale_item(job) for job in jobs]

    def _upscale_item(self, job: Job) -> Output:
        image: LoadedImage = job.payload
        size = output_size(*image.size, self.scale)
        rgb = image.rgb
        deep = image.bit_depth > 8  # finish in float, so a 16-bit input's precision reaches the output
        for index in range(native_passes(self.scale)):
            rgb = self._native_pass(rgb, job.seed + index, job.item.label, deep=deep)
        rgb = resample(rgb, size)
        alpha = None if image.alpha is None else resample_alpha(image.alpha, size)
        return Output(image=rgb, alpha=alpha, params={"input_size": list(image.size), "output_size": list(size)},
                      **carried(image))

    def _native_pass(self, rgb: np.ndarray, seed: int, label: str, *, deep: bool = False) -> np.ndarray:
        """One ×4 pass of the model on (H, W, 3) uint8 or float in [0, 1]; returns (4H, 4W, 3) uint8, or
        float32 in [0, 1] when `deep` (colour fix and back-projection then keep the input's finer steps)."""
        low = self._low_res(rgb)
        latent_hw = self._latent_size(low)
        upscale = functools.partial(self._sample_and_decode, low=low, latent_hw=latent_hw, seed=seed)
        pixels = self.engine.finite(upscale, label)[0]  # (H, W, 3) uint8, the decode's rounding
        height, width = rgb.shape[:2]
        out = pixels[: height * NATIVE_SCALE, : width * NATIVE_SCALE].numpy()
        return self._finish_pass(out.astype(np.float32) / 255.0 if deep else out, rgb)

    def _low_res(self, rgb: np.ndarray) -> torch.Tensor:
        """(1, 3, H', W') in [-1, 1], edges replicated up to a size whose latent the UNet can take."""
        height, width = rgb.shape[:2]
        pad_h, pad_w = _padding(height, width, self._pixel_multiple())
        low = to_model_range(rgb)
        return F.pad(low, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else low

    def _pixel_multiple(self) -> int:
        """Low-res sizes must map to latents divisible by the UNet's total downsampling (8)."""
        return max(1, 8 * self.engine.info.downsampling // NATIVE_SCALE)

    def _latent_size(self, low: torch.Tensor) -> tuple[int, int]:
        down = self.engine.info.downsampling
        return low.shape[-2] * NATIVE_SCALE // down, low.shape[-1] * NATIVE_SCALE // down

    def _sample_and_decode(self, engine: Engine, *, low: torch.Tensor, latent_hw: tuple[int, int],
                           seed: int) -> torch.Tensor:
        """Uint8 pixels (1, H, W, 3) of one pass at `engine`'s precision (`Engine.finite` retries in fp32)."""
        cond, uncond = self._conditioning(engine, low, latent_hw, seed)
        add = self._residual_in_pixels(engine, low, latent_hw, cond)
        streamed = one_step_streamed(engine, latent_hw, cond, uncond, add=add, progress=self.step_progress())
        if streamed is not None:
            return streamed
        z = engine.sample(latent_hw, [seed], cond, uncond, progress=self.step_progress())
        if engine.info.residual_base is not None and add is None:
            z = z + engine.encode(bicubic_base(self._residual_source(low, latent_hw, cond), _size(engine, latent_hw)))
        return engine.decode_pixels(z, add=add)

    def _residual_in_pixels(self, engine: Engine, low: torch.Tensor, latent_hw: tuple[int, int], cond: Cond
                            ) -> Optional[Callable[[int, int, int, int], torch.Tensor]]:
        """For a residual model on a pointwise first stage (which decodes sums to sums), the input's bicubic
        upscale as windows added to the decoded pixels as they are pasted: no full-size upscale or latent of
        it is ever made. None otherwise (without a residual, or added as a latent)."""
        if engine.info.residual_base is None or not getattr(engine.bundle.first_stage, "pointwise", False):
            return None
        source = self._residual_source(low, latent_hw, cond).float()
        return functools.partial(bicubic_window, source, _size(engine, latent_hw))

    def _residual_source(self, low: torch.Tensor, latent_hw: tuple[int, int], cond: Cond) -> torch.Tensor:
        """The low-res image the residual's bicubic upscale starts from: the fp32 input (as in training) whatever
        precision the networks run in, or the conditioning where the latent grid is not the input's."""
        source = low if tuple(low.shape[-2:]) == latent_hw else cond.concat
        assert source is not None, "a residual model is a concat (BSR-style) superres model"
        return source


    def _conditioning(self, engine: Engine, low: torch.Tensor, latent_hw: tuple[int, int], seed: int
                      ) -> tuple[Cond, Optional[Cond]]:
        """The low-res image at latent size (BSR: concatenated), or noise-augmented with its level as the class
        label and the prompt by cross-attention (SD x4 upscaler: guided)."""
        low = low.to(engine.device, engine.dtype)
        if low.shape[-2:] != latent_hw:
            low = F.interpolate(low.float(), size=latent_hw, mode="bicubic", align_corners=False).clamp(-1, 1)
            low = low.to(engine.dtype)
        if not self.upscaler:
            return Cond(concat=low), None
        generator = torch.Generator("cpu").manual_seed(seed ^ 0x5EED)
        noise = torch.randn(low.shape, generator=generator).to(low)
        low_scale = engine.bundle.low_scale_model
        assert low_scale is not None and self._context is not None, "check_model() found an upscaler"
        # nn.Module's attributes read as `Tensor | Module` to mypy; the noise augmentation returns (noised, level).
        augment = cast(Callable[..., tuple[torch.Tensor, torch.Tensor]], low_scale.encode)
        noised, level = augment(low, self.noise_level, noise=noise)
        context, uncontext = self._context
        cond = Cond(crossattn=context.to(engine.device, engine.dtype), concat=noised, y=level)
        uncond = Cond(crossattn=uncontext.to(engine.device, engine.dtype), concat=noised, y=level)
        return cond, uncond

    def _finish_pass(self, out: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """The pass's pixels with the input's colours (colour fix) and back-projected onto it (consistency)."""
        if self.colour_fix:
            colour_fix_(out, rgb)
        return back_project_(out, rgb) if self.consistency else out


def bicubic_base(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bicubic upscale (B, 3, *size) of low-res images in [-1, 1] that a residual model's output is added
    to: the same float32 operation in training and in the pipeline, not clamped (the residual makes up for
    its overshoot)."""
    return F.interpolate(low.float(), size=tuple(size), mode="bicubic", align_corners=False).to(low.dtype)


def bicubic_window(low: torch.Tensor, size: tuple[int, int], top: int, left: int, height: int, width: int
                   ) -> torch.Tensor:
    """`bicubic_base(low, size)[..., top:top + height, left:left + width]` computed from a window of `low` (`size`
    an integer multiple of its sides). Bicubic reads 2 input pixels on either side of the point it samples, and
    a window of whole input pixels keeps every sample's position and weights, so with a margin of 2 input
    pixels the window's values are those of the whole upscale: bit for bit where the factors are powers of two
    (the positions are then exact in float), within float rounding otherwise."""
    factor_y, factor_x = size[0] // low.shape[-2], size[1] // low.shape[-1]
    y0, y1 = _window(top, height, factor_y, low.shape[-2])
    x0, x1 = _window(left, width, factor_x, low.shape[-1])
    up = bicubic_base(low[..., y0:y1, x0:x1], ((y1 - y0) * factor_y, (x1 - x0) * factor_x))
    top, left = top - y0 * factor_y, left - x0 * factor_x
    return up[..., top : top + height, left : left + width]


def _window(start: int, length: int, factor: int, size: int, margin: int = 2) -> tuple[int, int]:
    """The input pixels [first, end) whose upscale covers output pixels [start, start + length) with `margin`."""
    return max(0, start // factor - margin), min(size, -(-(start + length) // factor) + margin)


def _size(engine: Engine, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The decoded image's size for a latent of `latent_hw`."""
    down = engine.info.downsampling
    return latent_hw[0] * down, latent_hw[1] * down


def _padding(height: int, width: int, multiple: int) -> tuple[int, int]:
    return (-height) % multiple, (-width) % multiple
