"""What `ldmtool train diffusion` trains: the tasks, what each records in the CompVis config, the UNet
architecture and the training options."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from ldmtool.errors import UsageError
from ldmtool.train.degrade import degradation
from ldmtool.train.procedural import CLASSES

LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"


class Task(str, enum.Enum):
    SUPERRES = "superres"
    INPAINT = "inpaint"
    SEMANTIC = "semantic"
    TXT2IMG = "txt2img"
    LAYOUT = "layout"
    UNCOND = "uncond"


# What each task records in the CompVis config (cond_stage_key, conditioning_key, cond_stage_config target).
TASK_CONFIG = {
    Task.SUPERRES: ("LR_image", "concat", "torch.nn.Identity"),
    Task.INPAINT: ("masked_image", "concat", "__is_first_stage__"),
    Task.SEMANTIC: ("segmentation", "concat", "ldm.modules.encoders.modules.SpatialRescaler"),
    Task.TXT2IMG: ("caption", "crossattn", "ldm.modules.encoders.modules.BERTEmbedder"),
    Task.LAYOUT: ("objects_bbox", "crossattn", "ldm.modules.encoders.modules.BERTEmbedder"),
    Task.UNCOND: ("image", None, "__is_unconditional__"),
}


# The ldmtool command that runs each task's model (the `task` of the config's `ldmtool:` block).
TASK_COMMAND = {
    Task.SUPERRES: "superres", Task.INPAINT: "inpaint", Task.SEMANTIC: "semantic2img", Task.TXT2IMG: "txt2img",
    Task.LAYOUT: "layout2img", Task.UNCOND: "sample",
}
PROCEDURAL_TASKS = (Task.SEMANTIC, Task.TXT2IMG, Task.LAYOUT)
TEXT_TASKS = (Task.TXT2IMG, Task.LAYOUT)  # a BERTEmbedder cond stage, by cross-attention
# Procedural layout objects by the OpenImages class names the layout2img command reads (texture -> name).
LAYOUT_NAMES = {"water": "Swimming pool", "rock": "Building", "tree": "Tree"}
LAYOUT_TEXTURES = tuple(c.name for c in CLASSES if c.name in LAYOUT_NAMES)  # raster channel order
LAYOUT_VOCAB = 8192  # as layout2img-openimages256: 90 x 90 coordinate cells, 340 classes x 16 modifiers
LAYOUT_MAX_OBJECTS = 8
PROCEDURAL = "procedural"  # the data source of tasks that train on the project's own generators


@dataclass(frozen=True)
class UNetArch:
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)  # downsampling factors inside the UNet, as CompVis
    num_head_channels: int = 32

    def params(self, image_size: int, in_channels: int, out_channels: int) -> dict[str, Any]:
        return {
            "image_size": image_size,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": self.model_channels,
            "attention_resolutions": list(self.attention_resolutions),
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(self.channel_mult),
            "num_head_channels": self.num_head_channels,
        }


@dataclass(frozen=True)
class DiffusionTraining:
    task: Task = Task.SUPERRES
    crop: int = 128  # high-res crop in pixels
    batch_size: int = 8
    lr: float = 1e-4
    ema_decay: float = 0.999
    seed: int = 0
    scale: int = 4  # super-resolution factor
    min_scale: float = 0.5
    timesteps: int = 1000
    linear_start: float = 0.0015  # the LDM BSR schedule
    linear_end: float = 0.0155
    scale_batches: int = 4  # batches encoded to estimate scale_factor
    text_width: int = 128  # txt2img / layout: BERTEmbedder width (= UNet context_dim)
    text_layers: int = 2
    caption_dropout: float = 0.1  # txt2img: share of empty captions (classifier-free guidance)
    init: Optional[str] = None  # checkpoint whose UNet weights start the run (where names and shapes match)
    procedural: bool = False  # uncond: train on the procedural landscapes instead of image crops
    degradation: str = "realistic"  # superres: low-res inputs' degradation preset (see train.degrade)
    # What the UNet predicts: the noise ("eps", as LDM) or v = sqrt(a) eps - sqrt(1 - a) x0 (as SD 2). A UNet
    # with 32 base channels has one channel per GroupNorm group in its output block, so it cannot see the
    # image-wide mean of its input: with eps it cannot remove the mean of the starting noise, and at high
    # noise x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) turns that mean into a random colour cast. With v the
    # image-wide mean of x0 is mostly the output's own (learnable) offset.
    prediction: str = "eps"
    # Weight each example's loss as the squared error of the x0 its prediction implies: (1 - a) times the v
    # error, (1 - a) / a times the eps error. The plain loss is dominated by the low-noise steps, where the
    # model must tell tiny noise from detail (hard in a lossless pixel latent); this one is the MMSE of the
    # image at every noise level, what a few-step, PSNR-measured super-resolution model needs.
    x0_loss: bool = False
    # superres: the UNet learns the latent of the high-res image minus that of its input's bicubic upscale
    # (residual learning, as VDSR and SRDiff): a model that outputs nothing gives bicubic, not a blank image.
    residual: bool = False
    # layout: the boxes also as a coverage map per class, concatenated to the UNet input (see
    # pipelines.box_raster). Box tokens alone must learn 8100 coordinate embeddings independently, which a
    # CPU-sized run does not manage; the raster gives every latent pixel its boxes directly.
    box_raster: bool = False
    # A fixed latent scale instead of 1 / std of the training latents: a fine-tune from `init` keeps the
    # scale its UNet learnt (another seed's estimate differs by a few per cent).
    scale_factor: Optional[float] = None
    # Share of each batch trained on the state a one-step, temperature-0 sampler starts from: the last timestep
    # with x_T = 0 (the noise is replaced by the one that makes x_t vanish), so the loss there is the image's MSE
    # from the conditioning alone. Uniform timesteps train that case on a few examples in a thousand, and with
    # noise the network never sees at sampling time; the rest of the batch keeps the diffusion objective.
    terminal_share: float = 0.0

    def __post_init__(self) -> None:
        degradation(self.degradation, self.scale)  # an unknown preset is a usage error before anything loads
        if self.prediction not in ("eps", "v"):
            raise UsageError(f"--prediction {self.prediction!r}: use eps or v")
        if self.residual and self.task != Task.SUPERRES:
            raise UsageError("--residual is for --task superres")
        if not 0.0 <= self.terminal_share <= 1.0:
            raise UsageError(f"--terminal-share {self.terminal_share}: give a share between 0 and 1")
        if self.box_raster and self.task != Task.LAYOUT:
            raise UsageError("--box-raster is for --task layout")

    @property
    def generated(self) -> bool:
        """Whether the data comes from the project's generators rather than image files."""
        return self.task in PROCEDURAL_TASKS or (self.task == Task.UNCOND and self.procedural)

