"""`ldmtool train diffusion`: a latent diffusion UNet on a frozen first stage, in the original LDM layout.

eps-prediction with the LDM linear schedule (linear in sqrt(beta), 1000 steps). The task decides the
conditioning (concat at latent resolution, or cross-attention), exactly as the released CompVis models
take it:
  superres  the degraded low-res image in [-1, 1] (LDM BSR: cond_stage_key LR_image), 3 channels
  inpaint   the masked-image latent (unscaled: the cond stage is the first stage) and the mask in {-1, 1}
            (as inpainting_big and its script: masked pixels are black, masked_image = (1 - mask) * image),
            z + 1 channels
  semantic  one-hot procedural label maps through a trainable SpatialRescaler (as semantic_synthesis256:
            resize to latent size, 1x1 conv to z channels), trained jointly with the UNet
  txt2img   captions of procedural shape scenes through a small LDM-BERT (BERTEmbedder) trained jointly,
            by cross-attention (as text2img256); 10% empty captions for classifier-free guidance
  layout    procedural box layouts as the layout2img box tokens (3 per object + 2 crop tokens, OpenImages
            class numbers) through a small token-input BERTEmbedder, by cross-attention; with --box-raster
            also as per-class box coverage at latent size, concatenated (conditioning_key hybrid)
  uncond    nothing
The export is a single LatentDiffusion file: `model.diffusion_model.*` (EMA weights),
`first_stage_model.*`, the schedule buffers and `scale_factor` (1 / std of the training latents, as
`scale_by_std`), with a CompVis-format config.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import yaml

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.runtime.seeds import derive_seed
from ldmtool.train import common
from ldmtool.train.autoencoder import AUTOENCODER_TARGET, build_autoencoder
from ldmtool.train.data import CropConfig, ImageCrops, to_tensor
from ldmtool.train.degrade import degradation, degrade
from ldmtool.train.masks import random_mask
from ldmtool.train.procedural import CLASSES, Box, layout_sample, semantic_sample, shape_scene

if TYPE_CHECKING:
    import torch
    from torch import nn

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
    # layout: the boxes also as a coverage map per class, concatenated to the UNet input (see
    # pipelines.box_raster). Box tokens alone must learn 8100 coordinate embeddings independently, which a
    # CPU-sized run does not manage; the raster gives every latent pixel its boxes directly.
    box_raster: bool = False

    def __post_init__(self) -> None:
        degradation(self.degradation, self.scale)  # an unknown preset is a usage error before anything loads
        if self.prediction not in ("eps", "v"):
            raise UsageError(f"--prediction {self.prediction!r}: use eps or v")
        if self.box_raster and self.task != Task.LAYOUT:
            raise UsageError("--box-raster is for --task layout")

    @property
    def generated(self) -> bool:
        """Whether the data comes from the project's generators rather than image files."""
        return self.task in PROCEDURAL_TASKS or (self.task == Task.UNCOND and self.procedural)


@dataclass
class TrainBatch:
    z0: "torch.Tensor"  # scaled target latents
    concat: Optional["torch.Tensor"] = None  # concatenated to the noisy latent
    context: Optional["torch.Tensor"] = None  # cross-attention context


@dataclass
class FirstStage:
    """A frozen, loaded KL first stage and its CompVis params."""

    model: "nn.Module"
    params: dict[str, Any]

    @property
    def factor(self) -> int:
        return 2 ** (len(self.params["ddconfig"]["ch_mult"]) - 1)

    @property
    def channels(self) -> int:
        return int(self.params["embed_dim"])


def _first_stage_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        path = path / common.MODEL_FILE
    for config in (path.with_suffix(".yaml"), path.parent / common.CONFIG_FILE):
        if config.is_file():
            return path, config
    raise UsageError(f"--first-stage {path}: no config beside it (expected {path.with_suffix('.yaml').name})")


def load_first_stage(path: Path, device) -> FirstStage:
    """Load an autoencoder written by `ldmtool train autoencoder` (or any KL first stage + its YAML)."""
    from safetensors.torch import load_file

    weights_path, config_path = _first_stage_files(path)
    if not weights_path.is_file():
        raise UsageError(f"--first-stage {weights_path}: file not found")
    config = yaml.safe_load(config_path.read_text())
    model_config = config.get("model", config)
    if model_config.get("target") != AUTOENCODER_TARGET:
        raise CheckpointError(f"{config_path}: target {model_config.get('target')!r} is not a KL autoencoder ({AUTOENCODER_TARGET})")
    params = model_config["params"]
    model = build_autoencoder(params)
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path}: weights do not match {config_path.name}: {str(err).splitlines()[0]}") from err
    model.to(device).eval().requires_grad_(False)
    return FirstStage(model, params)


def layout_tokens(layouts: Sequence[Sequence[Box]]) -> "torch.Tensor":
    """(B, 3 * LAYOUT_MAX_OBJECTS + 2) token ids of procedural layouts, as the layout2img command builds them."""
    import torch

    from ldmtool.pipelines.layout_tokens import BoxTokenizer, LayoutObject, category_number

    tokenizer = BoxTokenizer.for_sequence(LAYOUT_VOCAB, 3 * LAYOUT_MAX_OBJECTS + 2)
    rows = [tokenizer.tokens([LayoutObject(category_number(LAYOUT_NAMES[CLASSES[b.cls].name]), (b.x0, b.y0, b.x1, b.y1))
                              for b in boxes]) for boxes in layouts]
    return torch.tensor(rows, dtype=torch.long)


def build_cond_stage(task: Task, params: dict[str, Any]) -> "nn.Module":
    from ldmtool.nets.encoders import BERTEmbedder, SpatialRescaler

    return (BERTEmbedder if task in TEXT_TASKS else SpatialRescaler)(**params)


def build_unet(params: dict[str, Any]) -> "nn.Module":
    from ldmtool.nets.unet import UNetModel

    return UNetModel(**params)


def schedule(training: DiffusionTraining) -> dict[str, "torch.Tensor"]:
    from ldmtool.checkpoints.schedule import schedule_buffers

    return schedule_buffers(
        beta_schedule="linear", timesteps=training.timesteps,
        linear_start=training.linear_start, linear_end=training.linear_end,
    )


class DiffusionTrainer:
    """One run: a UNet learning eps on scaled latents of the frozen first stage, with task conditioning."""

    def __init__(self, arch: UNetArch, training: DiffusionTraining, first_stage: FirstStage, paths: Sequence[Path], device, dtype):
        import torch

        self.arch, self.training, self.first_stage = arch, training, first_stage
        self.device, self.dtype = device, dtype
        if training.crop % (first_stage.factor * 2 ** (len(arch.channel_mult) - 1)):
            raise UsageError(f"--crop {training.crop}: must be divisible by the first stage factor times the UNet's downsampling")
        if training.task == Task.SUPERRES and training.crop % training.scale:
            raise UsageError(f"--crop {training.crop}: must be divisible by --scale {training.scale}")
        self.latent_size = training.crop // first_stage.factor
        self.unet_params = arch.params(self.latent_size, first_stage.channels + self.concat_channels, first_stage.channels)
        if training.task in TEXT_TASKS:
            self.unet_params.update(use_spatial_transformer=True, transformer_depth=1, context_dim=training.text_width)
        self.unet = build_unet(self.unet_params).to(device)
        if training.init:
            self.initialised = init_unet(self.unet, Path(training.init))
        self.ema = common.Ema(self.unet, training.ema_decay)
        self.cond_params = self._cond_stage_params()
        self.cond_stage = None if self.cond_params is None else build_cond_stage(training.task, self.cond_params).to(device)
        trainable = list(self.unet.parameters())
        if self.cond_stage is not None:
            if training.init:  # a jointly trained text encoder starts from the checkpoint's too
                init_cond_stage(self.cond_stage, Path(training.init))
            self.cond_ema = common.Ema(self.cond_stage, training.ema_decay)
            trainable += list(self.cond_stage.parameters())
        self.optimizer = torch.optim.AdamW(trainable, lr=training.lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.data = None if training.generated else ImageCrops(paths, CropConfig(training.crop, True, training.min_scale), training.seed)
        self.buffers = schedule(training)
        self.scale_factor: Optional[float] = None

    @property
    def concat_channels(self) -> int:
        channels = self.first_stage.channels
        if self.training.task == Task.LAYOUT:
            return len(LAYOUT_TEXTURES) if self.training.box_raster else 0
        return {Task.SUPERRES: 3, Task.INPAINT: channels + 1, Task.SEMANTIC: channels}.get(self.training.task, 0)

    def _cond_stage_params(self) -> Optional[dict[str, Any]]:
        """Params of the trainable cond stage: SpatialRescaler (semantic: one-hot classes at pixel size to z
        channels at latent size) or BERTEmbedder (txt2img)."""
        if self.training.task == Task.TXT2IMG:
            return {"n_embed": self.training.text_width, "n_layer": self.training.text_layers}
        if self.training.task == Task.LAYOUT:
            return {"n_embed": self.training.text_width, "n_layer": self.training.text_layers, "vocab_size": LAYOUT_VOCAB,
                    "max_seq_len": 3 * LAYOUT_MAX_OBJECTS + 2, "use_tokenizer": False}
        if self.training.task != Task.SEMANTIC:
            return None
        stages = self.first_stage.factor.bit_length() - 1
        return {"n_stages": stages, "method": "bilinear", "multiplier": 0.5,
                "in_channels": len(CLASSES), "out_channels": self.first_stage.channels}

    def encode(self, x: "torch.Tensor") -> "torch.Tensor":
        """Unscaled latent (posterior mean) of images in [-1, 1]."""
        import torch

        with torch.no_grad(), common.autocast(self.device, self.dtype):
            return self.first_stage.model.encode(x).float()

    def estimate_scale_factor(self) -> float:
        """1 / std of the latents of the first `scale_batches` training batches (as LDM's scale_by_std)."""
        import torch

        latents = [self.encode(self.images(step)) for step in range(self.training.scale_batches)]
        return float(1.0 / torch.cat(latents).flatten().std())

    def samples(self, step: int) -> tuple[np.ndarray, Any]:
        """(B, H, W, 3) uint8 images of step `step`, and what they were generated from: (B, H, W) class maps
        (semantic), captions (txt2img) or boxes (layout); None for image folders and unconditional models."""
        if self.data is not None:
            return self.data.batch(step, self.training.batch_size), None
        first = step * self.training.batch_size
        generate = {Task.SEMANTIC: semantic_sample, Task.TXT2IMG: shape_scene, Task.LAYOUT: layout_sample,
                    Task.UNCOND: semantic_sample}[self.training.task]
        pairs = [generate(derive_seed(self.training.seed, f"{self.training.task.value}/{i}"), self.training.crop)
                 for i in range(first, first + self.training.batch_size)]
        images = np.stack([p[0] for p in pairs])
        if self.training.task == Task.UNCOND:
            return images, None
        sources = [p[1] for p in pairs]
        return images, np.stack(sources) if self.training.task == Task.SEMANTIC else sources

    def images(self, step: int) -> "torch.Tensor":
        return to_tensor(self.samples(step)[0]).to(self.device)

    def batch(self, step: int) -> TrainBatch:
        """Scaled target latents and the task's conditioning for training step `step`."""
        crops, sources = self.samples(step)
        indices = [step * self.training.batch_size + i for i in range(len(crops))]
        x = to_tensor(crops).to(self.device)
        z0 = self.scale_factor * self.encode(x)
        if self.training.task == Task.TXT2IMG:
            return TrainBatch(z0, context=self.cond_stage.encode(self.drop_captions(sources, indices)))
        if self.training.task == Task.LAYOUT:
            context = self.cond_stage.encode(layout_tokens(sources).to(self.device))
            raster = self.layout_raster(sources) if self.training.box_raster else None
            return TrainBatch(z0, context=context, concat=raster)
        return TrainBatch(z0, concat=self.conditioning(crops, indices, x, sources))

    def layout_raster(self, layouts: Sequence[Sequence[Box]]) -> "torch.Tensor":
        """(B, classes, h, w) box coverage of procedural layouts, as the layout2img command builds it."""
        import torch

        from ldmtool.pipelines.box_raster import box_raster

        size, latent = self.training.crop, (self.latent_size, self.latent_size)
        channel = {name: index for index, name in enumerate(LAYOUT_TEXTURES)}
        rasters = [box_raster([(channel[CLASSES[b.cls].name], (b.x0, b.y0, b.x1, b.y1)) for b in boxes],
                              len(LAYOUT_TEXTURES), (size, size), latent, self.first_stage.factor) for boxes in layouts]
        return torch.from_numpy(np.stack(rasters)).to(self.device)

    def drop_captions(self, captions: list[str], indices: list[int]) -> list[str]:
        """Replace a share of captions by "" (the unconditional prompt of the reference txt2img script)."""
        keep = [np.random.default_rng(derive_seed(self.training.seed, f"drop/{i}")).random() >= self.training.caption_dropout
                for i in indices]
        return [caption if k else "" for caption, k in zip(captions, keep)]

    def conditioning(self, crops: np.ndarray, indices: list[int], x: "torch.Tensor", labels: Optional[np.ndarray] = None) -> Optional["torch.Tensor"]:
        import torch.nn.functional as F

        if self.training.task == Task.SEMANTIC:
            import torch

            one_hot = F.one_hot(torch.from_numpy(labels).long(), len(CLASSES)).permute(0, 3, 1, 2).float()
            return self.cond_stage(one_hot.to(self.device))
        rngs = [np.random.default_rng(derive_seed(self.training.seed, f"cond/{i}")) for i in indices]
        size = (self.latent_size, self.latent_size)
        if self.training.task == Task.SUPERRES:
            config = degradation(self.training.degradation, self.training.scale)
            low = to_tensor(np.stack([degrade(c, config, r) for c, r in zip(crops, rngs)])).to(self.device)
            return low if low.shape[-2:] == size else F.interpolate(low, size=size, mode="bicubic", align_corners=False)
        if self.training.task == Task.INPAINT:
            import torch

            height, width = crops.shape[1:3]
            mask = torch.from_numpy(np.stack([random_mask(height, width, r) for r in rngs]))[:, None].to(self.device)
            masked = (1 - mask) * (x + 1) - 1  # hidden pixels become -1 (black), as the LDM script
            c_masked = self.encode(masked)  # the cond stage is the first stage itself: unscaled latent
            return torch.cat([c_masked, F.interpolate(mask * 2 - 1, size=size)], dim=1)
        return None

    def noise_and_timesteps(self, z0: "torch.Tensor", step: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        generator = torch.Generator("cpu").manual_seed(derive_seed(self.training.seed, f"noise/{step}"))
        t = torch.randint(0, self.training.timesteps, (z0.shape[0],), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        return noise.to(z0), t.to(z0.device)

    def loss(self, batch: TrainBatch, noise: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """Simple MSE (LDM `loss_simple`, l2) of the eps or v prediction at timesteps t."""
        import torch

        ac = self.buffers["alphas_cumprod"].to(batch.z0.device)[t].view(-1, 1, 1, 1)
        x_t = ac.sqrt() * batch.z0 + (1 - ac).sqrt() * noise
        target = noise if self.training.prediction == "eps" else ac.sqrt() * noise - (1 - ac).sqrt() * batch.z0
        model_input = x_t if batch.concat is None else torch.cat([x_t, batch.concat], dim=1)
        with common.autocast(self.device, self.dtype):
            predicted = self.unet(model_input, t, context=batch.context)
        return (predicted.float() - target).pow(2).mean()

    def step(self, step: int) -> dict[str, float]:
        if self.scale_factor is None:
            self.scale_factor = self.estimate_scale_factor()
        batch = self.batch(step)
        noise, t = self.noise_and_timesteps(batch.z0, step)
        loss = self.loss(batch, noise, t)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.unet)
        if self.cond_stage is not None:
            self.cond_ema.update(self.cond_stage)
        return {"loss": float(loss.detach())}

    def run_config(self) -> dict[str, Any]:
        return {
            "kind": "diffusion",
            "arch": {**common.config_dict(self.arch), "task": self.training.task.value, "first_stage": self.first_stage.params},
            "training": {**common.config_dict(self.training), "task": self.training.task.value},
        }

    def state(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "run_config": self.run_config(),
            "scale_factor": self.scale_factor,
            "model": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.cond_stage is not None:
            state["cond_stage"] = self.cond_stage.state_dict()
            state["cond_ema"] = self.cond_ema.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> int:
        self.unet.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.cond_stage is not None:
            self.cond_stage.load_state_dict(state["cond_stage"])
            self.cond_ema.load_state_dict(state["cond_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale_factor = state.get("scale_factor")
        return int(state["step"])

    def config(self, step: int) -> dict[str, Any]:
        """The CompVis-format config of the exported model (+ an `ldmtool` section with the recipe)."""
        cond_key, conditioning_key, cond_target = TASK_CONFIG[self.training.task]
        if self.training.box_raster:
            conditioning_key = "hybrid"
        params: dict[str, Any] = {
            "linear_start": self.training.linear_start,
            "linear_end": self.training.linear_end,
            "log_every_t": 100,
            "timesteps": self.training.timesteps,
            "loss_type": "l2",
            "parameterization": self.training.prediction,
            "first_stage_key": "image",
            "cond_stage_key": cond_key,
            "image_size": self.latent_size,
            "channels": self.first_stage.channels,
            "concat_mode": conditioning_key == "concat",
            "cond_stage_trainable": self.cond_stage is not None,
            "conditioning_key": conditioning_key,
            "scale_factor": self.scale_factor,
            "scale_by_std": True,  # scale_factor was measured on the data; the file stores it as a key too
            "monitor": "val/loss_simple_ema",
            "unet_config": {"target": UNET_TARGET, "params": self.unet_params},
            "first_stage_config": {"target": AUTOENCODER_TARGET, "params": self.first_stage.params},
            "cond_stage_config": self._cond_stage_config(cond_target),
        }
        block = {
            "family": f"ldmtool-{self.training.task.value}",
            "task": TASK_COMMAND[self.training.task],
            "description": f"trained by `ldmtool train diffusion --task {self.training.task.value}` ({step} steps)",
            "default_sampler": "ddim",
            "default_steps": 50,
            "default_size": [self.training.crop, self.training.crop],
            "step": step,
            **self.run_config(),
        }
        if self.training.task in (Task.SUPERRES, Task.INPAINT):
            # Small models drift in colour and brightness; by default the output's low frequencies come from
            # the input (superres) or a classical fill of the hole (inpaint). `train export --no-colour-fix`
            # ships a model without it, and --no-colour-fix turns it off for one run.
            block["colour_fix"] = True
        if self.training.task == Task.SUPERRES:
            block["scale"] = self.training.scale
        if self.training.task == Task.SEMANTIC:
            block["classes"] = [{"name": c.name, "colour": list(c.colour)} for c in CLASSES]
        if self.training.task == Task.LAYOUT:
            block["classes"] = [{"name": LAYOUT_NAMES[c.name], "texture": c.name, "colour": list(c.colour)}
                                for c in CLASSES if c.name in LAYOUT_NAMES]
            if self.training.box_raster:
                block["box_raster"] = True  # one channel per entry of `classes`, in that order
        return {"ldmtool": block, "model": {"base_learning_rate": 1e-6, "target": LDM_TARGET, "params": params}}

    def _cond_stage_config(self, target: str) -> Any:
        if target.startswith("__"):
            return target
        if self.cond_params is None:
            return {"target": target}
        return {"target": target, "params": self.cond_params}

    def export_tensors(self) -> dict[str, "torch.Tensor"]:
        """The single-file LatentDiffusion state dict, original key names (UNet weights are the EMA)."""
        import torch

        tensors = {f"model.diffusion_model.{k}": v for k, v in self.ema.averaged_state(self.unet).items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in self.first_stage.model.state_dict().items()})
        if self.cond_stage is not None:
            tensors.update({f"cond_stage_model.{k}": v for k, v in self.cond_ema.averaged_state(self.cond_stage).items()})
        tensors.update(self.buffers)
        tensors["scale_factor"] = torch.tensor(self.scale_factor, dtype=torch.float32)
        return tensors

    def export(self, run_dir: Path, step: int) -> Path:
        if self.scale_factor is None:
            self.scale_factor = self.estimate_scale_factor()
        return common.save_export(run_dir, self.export_tensors(), self.config(step))


UNET_PREFIX = "model.diffusion_model."
UNET_INPUT_CONV = "input_blocks.0.0.weight"  # the conv that takes the noisy latent and the concatenated inputs


def init_unet(unet: "nn.Module", checkpoint: Path) -> int:
    """Copies the UNet weights of a LatentDiffusion checkpoint into `unet` wherever the name and shape
    match (fine-tuning, e.g. a new first stage under a trained model); returns how many tensors were taken.
    A checkpoint matching fewer than half of the UNet's tensors is a usage error: another architecture."""
    if not checkpoint.is_file():
        raise UsageError(f"--init {checkpoint}: no such checkpoint file")
    return _copy_matching(unet, checkpoint, UNET_PREFIX, at_least=0.5, widen=UNET_INPUT_CONV)


COND_PREFIX = "cond_stage_model."


def init_cond_stage(cond_stage: "nn.Module", checkpoint: Path) -> int:
    """Copies a checkpoint's trainable cond stage (BERT, spatial rescaler) into `cond_stage` where names and
    shapes match; a checkpoint without one (or of another shape) leaves it as initialised. Returns the count."""
    return _copy_matching(cond_stage, checkpoint, COND_PREFIX, at_least=0.0)


def _copy_matching(module: "nn.Module", checkpoint: Path, prefix: str, at_least: float,
                   widen: Optional[str] = None) -> int:
    """Copy the checkpoint's `prefix`-ed tensors into `module` where name and shape match (and the conv
    named `widen` where it only takes more input channels); fewer matches than `at_least` of the module's
    tensors is a usage error (another architecture)."""
    from ldmtool.checkpoints.files import read_state_dict

    source = {k[len(prefix):]: v for k, v in read_state_dict(checkpoint).items() if k.startswith(prefix)}
    own = module.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if widen in source and widen in own and _more_inputs(own[widen].shape, source[widen].shape):
        matching[widen] = widen_inputs(source[widen], own[widen].shape)
    if len(matching) < at_least * len(own):
        raise UsageError(f"--init {checkpoint}: only {len(matching)} of the UNet's {len(own)} weights match "
                         "this architecture (name and shape); give a checkpoint of the same UNet")
    return common.copy_weights(module, matching)


def _more_inputs(own: Sequence[int], source: Sequence[int]) -> bool:
    """Whether a conv weight differs from the checkpoint's only by taking more input channels."""
    return (len(own) == len(source) == 4 and own[1] > source[1]
            and own[0] == source[0] and tuple(own[2:]) == tuple(source[2:]))


def widen_inputs(weight: "torch.Tensor", shape: Sequence[int]) -> "torch.Tensor":
    """A conv weight with zero weights for the added input channels: a UNet given a new concatenated input
    (e.g. the box raster) starts as the checkpoint's UNet, which ignores it until training says otherwise."""
    import torch

    wide = torch.zeros(tuple(shape), dtype=weight.dtype)
    wide[:, :weight.shape[1]] = weight
    return wide


def train_diffusion(arch: UNetArch, training: DiffusionTraining, first_stage: Path, paths: Sequence[Path], run: common.RunOptions) -> Path:
    """Train (or resume) a latent diffusion model in `run.out`; returns the exported `model.safetensors`."""
    device, dtype = common.device_and_dtype(run)
    trainer = DiffusionTrainer(arch, training, load_first_stage(first_stage, device), paths, device, dtype)
    return common.run_loop(trainer, run, f"diffusion ({training.task.value})")
