"""What the rest of the tool needs to know about a loaded model, typed and frozen (`bundle.info`).

A family entry builds a `ModelInfo` once, when the bundle is built or loaded; pipelines, tiling, sampling
and the runner read it instead of the config document, and never ask which family a model is.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional


class Conditioning(Enum):
    """How conditioning reaches the network: the reference `conditioning_key`, whose value it keeps."""

    NONE = None
    CONCAT = "concat"
    CROSSATTN = "crossattn"
    HYBRID = "hybrid"  # concat + crossattn
    ADM = "adm"  # class / noise-level label `y`
    HYBRID_ADM = "hybrid-adm"  # concat + crossattn + y (SD 2 x4 upscaler)
    CROSSATTN_ADM = "crossattn-adm"


class Parameterization(str, Enum):
    """What the network predicts. Flow matching joins here with the first flow family."""

    EPS = "eps"
    V = "v"
    X0 = "x0"
    FLOW = "flow"  # rectified flow: velocity (noise - x0) at x_t = (1 - t) x0 + t noise (FLUX.1, SD3)


class InpaintKind(str, Enum):
    """How a model inpaints (see pipelines/inpaint.py); the value is recorded in every output."""

    LDM_CONCAT = "ldm-concat"  # 7-channel UNet, masked image through the shared first stage
    SD_HYBRID = "sd-hybrid"  # 9-channel UNet with a text encoder
    MASKED = "masked"  # any text-to-image or unconditional model, by masked sampling
    FILL = "fill"  # FLUX.1 Fill: the masked image's latent and the mask's 8x8 blocks beside the noise


@dataclass(frozen=True, kw_only=True)
class BoxTokens:
    """The box-token sequence a layout model's BERT cond stage takes (ids, no text tokenizer)."""

    vocab_size: int
    max_seq_len: int


@dataclass(frozen=True, kw_only=True)
class RunDefaults:
    """The model's defaults for a run (the config's `ldmtool:` block); the command line overrides them."""

    sampler: str = "ddim"
    steps: Optional[int] = None  # None: the sampler's own default
    cfg: float = 1.0
    temperature: float = 1.0
    size: tuple[int, int]  # (width, height) of generated images
    tile: int  # denoiser tile side in latent pixels
    noise_level: int = 20  # x4 upscaler's low-res noise augmentation
    # As written in the config: a value that is not true/false fails only the commands that use it.
    colour_fix: Any = False
    consistency: Any = False
    # A guidance-distilled flow model's guidance input (FLUX.1 dev: 3.5); None: the network takes none.
    guidance: Optional[float] = None
    spacing: Optional[str] = None  # timestep spacing when --spacing is not given (None: the sampler's)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A loaded model as the pipelines see it."""

    family: str  # the name recorded in metadata and shown in messages ("sd2-v", "default-superres", ...)
    entry: str  # the registry entry that described it
    conditioning: Conditioning
    parameterization: Optional[Parameterization]  # None for a first stage alone
    latent_channels: int
    downsampling: int  # image pixels per latent pixel (first stage)
    pixel_multiple: int  # image sizes must be multiples of this (first stage and UNet together)
    native_latent: Optional[int]  # the UNet's training size in latent pixels, when the config gives it
    concat_channels: int  # UNet input channels beyond the latent (concat conditioning)
    takes_text: bool  # its cond stage encodes prompts (`cond_stage.encode(list[str])`)
    class_count: Optional[int]  # a class-embedding cond stage's classes, else None
    inpaint_kind: Optional[InpaintKind]  # None: cannot inpaint
    label_classes: Optional[int]  # semantic synthesis: classes of the label map, else None
    box_tokens: Optional[BoxTokens]  # layout models only
    box_raster: bool  # a layout model that also takes a box raster by concat
    raster_classes: tuple[Any, ...]  # the raster channels' class names, in order, as the config lists them
    defaults: RunDefaults
    # A model trained by ldmtool itself: the words of its training captions (None: not recorded), and whether
    # `defaults.size` is the size it was trained at (larger outputs get a warning past twice that).
    vocabulary: Optional[frozenset[str]] = None
    trained_size: Optional[tuple[int, int]] = None
    # A text model whose network also takes a vector `y` of the pooled prompt and the image's size (SDXL's
    # micro-conditioning, `cond_stage.vector`): the size inputs it takes, in order (empty: no such vector);
    # whether an empty negative prompt is zero embeddings rather than the encoded "" (as the reference
    # samples); and the aesthetic scores (prompt, negative) of a model that takes one.
    micro_conditioning: tuple[str, ...] = ()
    zero_empty_negative: bool = False
    aesthetic_scores: Optional[tuple[float, float]] = None
    # Parts a run needs that the loaded file does not hold (a FLUX.1 transformer file has no autoencoder or
    # text encoders): named in the one-line error of the commands that need them.
    missing_parts: tuple[str, ...] = ()
    # Why no command can run this model yet although it loads (a family whose pipeline is not built): the
    # commands' one-line error; "" when they can.
    not_runnable: str = ""
    # A super-resolution model trained on the residual over this upscale of its input ("bicubic"): the
    # pipeline adds that upscale's latent to the sampled one. None: the model gives the whole latent.
    residual_base: Optional[str] = None
    # The largest output side (pixels) the network can place, whatever the tiling: SD3's MMDiT has a learned
    # grid of positions (pos_embed_max_size patches a side) that the whole canvas must fit in. None: any.
    max_side: Optional[int] = None
