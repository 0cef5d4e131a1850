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

This module is the training run; the tasks and options are in `diffusion_config`, the networks, first
stage, schedule and `--init` weight copying in `diffusion_parts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import derive_seed, seeded_torch
from ldmtool.train import common
from ldmtool.train.data import CropConfig, ImageCrops, to_tensor
from ldmtool.train.degrade import degradation, degrade
from ldmtool.train.diffusion_config import (
    LAYOUT_MAX_OBJECTS,
    LAYOUT_NAMES,
    LAYOUT_TEXTURES,
    LAYOUT_VOCAB,
    LDM_TARGET,
    PROCEDURAL,
    PROCEDURAL_TASKS,
    TASK_COMMAND,
    TASK_CONFIG,
    TEXT_TASKS,
    UNET_TARGET,
    DiffusionTraining,
    Task,
    UNetArch,
)
from ldmtool.train.diffusion_parts import (
    COND_PREFIX,
    UNET_PREFIX,
    FirstStage,
    build_cond_stage,
    build_unet,
    init_cond_stage,
    init_unet,
    layout_tokens,
    load_first_stage,
    schedule,
    widen_inputs,
)
from ldmtool.train.masks import random_mask
from ldmtool.train.procedural import CAPTION_WORDS, CLASSES, Box, layout_sample, semantic_sample, shape_scene

if TYPE_CHECKING:
    import torch

# Importable from here as before the split (the CLI, tests and benchmarks use this module's names).
__all__ = [
    "COND_PREFIX", "LAYOUT_MAX_OBJECTS", "LAYOUT_NAMES", "LAYOUT_TEXTURES", "LAYOUT_VOCAB", "PROCEDURAL",
    "PROCEDURAL_TASKS", "TASK_COMMAND", "TASK_CONFIG", "TEXT_TASKS", "UNET_PREFIX", "DiffusionTrainer",
    "DiffusionTraining", "FirstStage", "Task", "TrainBatch", "UNetArch", "build_cond_stage", "build_unet",
    "init_cond_stage", "init_unet", "layout_tokens", "load_first_stage", "schedule", "train_diffusion",
    "widen_inputs",
]


@dataclass
class TrainBatch:
    z0: "torch.Tensor"  # scaled target latents
    concat: Optional["torch.Tensor"] = None  # concatenated to the noisy latent
    context: Optional["torch.Tensor"] = None  # cross-attention context


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
        with seeded_torch(derive_seed(training.seed, "diffusion/init")):
            self.unet = build_unet(self.unet_params).to(device)
        if training.init:
            self.initialised = init_unet(self.unet, Path(training.init))
        self.ema = common.Ema(self.unet, training.ema_decay)
        self.cond_params = self._cond_stage_params()
        self.cond_stage = None if self.cond_params is None else self._build_cond_stage()
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
        self.scale_factor: Optional[float] = training.scale_factor

    def _build_cond_stage(self) -> Any:
        with seeded_torch(derive_seed(self.training.seed, "diffusion/cond-init")):
            return build_cond_stage(self.training.task, self.cond_params).to(self.device)

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
        """1 / std of the latents of the first `scale_batches` training batches (as LDM's scale_by_std; of the
        residual latents for a residual model)."""
        import torch

        latents = [self.batch(step, scale=1.0).z0 if self.training.residual else self.encode(self.images(step))
                   for step in range(self.training.scale_batches)]
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

    def batch(self, step: int, scale: Optional[float] = None) -> TrainBatch:
        """Target latents scaled by `scale` (default: the run's scale_factor) and the task's conditioning for
        training step `step`. A residual superres model's target is the latent of the image minus that of its
        low-res input's bicubic upscale."""
        crops, sources = self.samples(step)
        indices = [step * self.training.batch_size + i for i in range(len(crops))]
        x = to_tensor(crops).to(self.device)
        z = self.encode(x)
        scale = self.scale_factor if scale is None else scale
        if self.training.task == Task.TXT2IMG:
            return TrainBatch(scale * z, context=self.cond_stage.encode(self.drop_captions(sources, indices)))
        if self.training.task == Task.LAYOUT:
            context = self.cond_stage.encode(layout_tokens(sources).to(self.device))
            raster = self.layout_raster(sources) if self.training.box_raster else None
            return TrainBatch(scale * z, context=context, concat=raster)
        concat = self.conditioning(crops, indices, x, sources)
        if self.training.residual:
            from ldmtool.pipelines.superres import bicubic_base

            z = z - self.encode(bicubic_base(concat, x.shape[-2:]))
        return TrainBatch(scale * z, concat=concat)

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
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        if self.training.terminal_share > 0:
            noise, t = self.terminal(z0, noise, t, step)
        return noise, t.to(z0.device)

    def terminal(self, z0: "torch.Tensor", noise: "torch.Tensor", t: "torch.Tensor", step: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Move a `terminal_share` of the batch to the last timestep with the noise that makes x_t = 0 there
        (sqrt(a) z0 + sqrt(1 - a) noise = 0): what a one-step sampler at temperature 0 feeds the network."""
        import torch

        generator = torch.Generator("cpu").manual_seed(derive_seed(self.training.seed, f"terminal/{step}"))
        chosen = torch.rand(z0.shape[0], generator=generator) < self.training.terminal_share
        last = self.training.timesteps - 1
        a = self.buffers["alphas_cumprod"][last].to(z0)
        vanishing = -(a / (1 - a)).sqrt() * z0
        mask = chosen.to(z0.device).view(-1, 1, 1, 1)
        return torch.where(mask, vanishing, noise), torch.where(chosen, torch.full_like(t, last), t)

    def loss(self, batch: TrainBatch, noise: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """Simple MSE (LDM `loss_simple`, l2) of the eps or v prediction at timesteps t (`x0_loss`: weighted as
        the error of the implied x0)."""
        import torch

        ac = self.buffers["alphas_cumprod"].to(batch.z0.device)[t].view(-1, 1, 1, 1)
        x_t = ac.sqrt() * batch.z0 + (1 - ac).sqrt() * noise
        target = noise if self.training.prediction == "eps" else ac.sqrt() * noise - (1 - ac).sqrt() * batch.z0
        model_input = x_t if batch.concat is None else torch.cat([x_t, batch.concat], dim=1)
        with common.autocast(self.device, self.dtype):
            predicted = self.unet(model_input, t, context=batch.context)
        error = (predicted.float() - target).pow(2)
        if self.training.x0_loss:  # x0 = sqrt(a) x_t - sqrt(1 - a) v = (x_t - sqrt(1 - a) eps) / sqrt(a)
            error = error * ((1 - ac) if self.training.prediction == "v" else (1 - ac) / ac)
        return error.mean()

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
            "first_stage_config": {"target": self.first_stage.target, "params": self.first_stage.params},
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
            if self.training.residual:
                block["residual"] = "bicubic"  # the pipeline adds the input's bicubic upscale back
        if self.training.task == Task.TXT2IMG:
            block["vocabulary"] = list(CAPTION_WORDS)  # its captions' words: others get a warning
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


def train_diffusion(arch: UNetArch, training: DiffusionTraining, first_stage: Path, paths: Sequence[Path], run: common.RunOptions) -> Path:
    """Train (or resume) a latent diffusion model in `run.out`; returns the exported `model.safetensors`."""
    device, dtype = common.device_and_dtype(run)
    trainer = DiffusionTrainer(arch, training, load_first_stage(first_stage, device), paths, device, dtype)
    return common.run_loop(trainer, run, f"diffusion ({training.task.value})")
