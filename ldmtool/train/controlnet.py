"""`ldmtool train controlnet`: a ControlNet for a trained latent diffusion model, as the reference trains one
(Zhang et al. 2023; lllyasviel/ControlNet `cldm.ControlLDM` with `sd_locked`).

The ControlNet starts as a copy of the base UNet's encoder and middle block (`time_embed`, `input_blocks`,
`middle_block` under the same names, as the reference's `tool_add_control.py` copies them); its zero convs
and the hint encoder's last conv start at zero, so the controlled UNet first predicts exactly what the base
does. The base UNet, text encoder and first stage stay frozen. The loss is the base model's own objective
(eps or v, its parameterization and schedule) on the controlled UNet's output. Hints are made from each
training image by a preprocessor of `ldmtool preprocess` (`pipelines/preprocess.py`), so training and
inference hints are the same function. Captions are dropped at `caption_dropout` (the paper: 50%), so the
net learns to read the scene from the hint alone.

The hint encoder downsamples by the base model's first-stage factor (reference widths for f8; two stride-2
convs for f4), so hints enter at latent resolution; `load_controlnet` reads the factor back from the keys.
The export is `model.safetensors` in the released layout without prefix (EMA weights) and `model.yaml`, a
cldm config (`cldm.cldm.ControlLDM` with its `control_stage_config`) whose `ldmtool:` block names the base.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import numpy as np

from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import derive_seed, seeded_torch
from ldmtool.train import common
from ldmtool.train.data import CropConfig, ImageCrops, to_tensor
from ldmtool.train.procedural import shape_scene

if TYPE_CHECKING:
    import torch

    from ldmtool.nets.controlnet import ControlNet

CONTROL_LDM_TARGET = "cldm.cldm.ControlLDM"
CONTROLNET_TARGET = "cldm.cldm.ControlNet"
PROCEDURAL = "procedural"  # captioned shape scenes, the data default-txt2img was trained on
SCENE_STREAM = "txt2img"  # the seed stream of `train diffusion --task txt2img`'s scenes: the same images
COPIED = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # from the base UNet, same names


@dataclass(frozen=True)
class HintSource:
    """Which preprocessor makes the hints, and its settings (those of `ldmtool preprocess`)."""

    kind: str = "canny"
    low: int = 100
    high: int = 200
    threshold: int = 127
    down: float = 4.0
    cells: int = 256

    def settings(self) -> Any:
        from ldmtool.pipelines.preprocess import PreprocessSettings

        return PreprocessSettings(low=self.low, high=self.high, threshold=self.threshold, down=self.down,
                                  cells=self.cells)

    def recorded(self) -> dict[str, Any]:
        """The preprocessor and the settings it reads (what `ldmtool preprocess` records)."""
        from ldmtool.pipelines.preprocess import USES

        return {"preprocessor": self.kind, **{name: getattr(self, name) for name in USES[self.kind]}}

    def make(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """(B, H, W, 3) uint8 images -> (B, H, W, 3) uint8 hints."""
        from ldmtool.pipelines.preprocess import PREPROCESSORS

        settings = self.settings()
        return np.stack([PREPROCESSORS[self.kind](image, settings, seed) for image, seed in zip(images, seeds)])


@dataclass(frozen=True)
class ControlNetTraining:
    base: str  # --model: a shipped default name or a LatentDiffusion file
    hint: HintSource = HintSource()
    crop: int = 64
    batch_size: int = 8
    lr: float = 1e-4
    ema_decay: float = 0.999
    seed: int = 0
    min_scale: float = 0.5
    caption_dropout: float = 0.5
    procedural: bool = True  # the captioned shape scenes; False: the image folder (empty captions)


def hint_widths(factor: int) -> tuple[int, ...]:
    """Hint encoder widths for a first stage that downsamples by `factor`: one stride-2 conv per halving,
    the reference's (16, 32, 96, 256) for f8, else 16 doubling per level (f4: 16, 32, 64)."""
    from ldmtool.nets.controlnet import HINT_CHANNELS

    halvings = factor.bit_length() - 1
    if factor < 1 or 2**halvings != factor:
        raise UsageError(f"first stage factor {factor}: a hint encoder needs a power of two")
    if halvings == len(HINT_CHANNELS) - 1:
        return HINT_CHANNELS
    return tuple(16 * 2**i for i in range(halvings + 1))


def controlnet_params(unet_params: dict[str, Any], factor: int) -> dict[str, Any]:
    """`ControlNet` parameters for a base UNet's config: the same encoder, a hint encoder for `factor`."""
    from ldmtool.nets.controlnet import ControlNet

    accepted = set(inspect.signature(ControlNet.__init__).parameters) - {"self"}
    params = {k: v for k, v in unet_params.items() if k in accepted}
    params.update(hint_channels=3, hint_block_channels=list(hint_widths(factor)))
    return params


def copy_encoder(net: "ControlNet", unet: "torch.nn.Module") -> int:
    """Copy the base UNet's encoder and middle block into the ControlNet (same names and shapes); returns
    how many tensors were copied. Everything else (hint encoder, zero convs) keeps its initialisation."""
    base = unet.state_dict()
    copied = {k: base[k] for k in net.state_dict() if k.startswith(COPIED)}
    missing = [k for k in net.state_dict() if k.startswith(COPIED) and k not in base]
    if missing:
        raise UsageError(f"the base UNet has no {missing[0]} to start the ControlNet from")
    return common.copy_weights(net, copied)


class ControlNetTrainer:
    """One run: a ControlNet trained against a frozen base model (the `common.Trainer` protocol)."""

    def __init__(self, training: ControlNetTraining, paths: Sequence[Path], device: "torch.device", dtype: "torch.dtype"):
        import torch

        from ldmtool.addons.controlnet import base_unet_params
        from ldmtool.checkpoints.api import load_model
        from ldmtool.nets.controlnet import ControlNet

        self.training, self.device, self.dtype = training, device, dtype
        self.base = load_model(training.base, device=device)
        self.base.requires_grad_(False).eval()
        self.check_base()
        self.unet: Any = cast(Any, self.base.denoiser)  # frozen, as the text encoder and the first stage
        self.text: Any = self.base.cond_stage
        self.first_stage: Any = self.base.first_stage
        alphas: Any = self.base.alphas_cumprod
        self.alphas_cumprod: "torch.Tensor" = alphas.float()
        self.factor = self.base.info.downsampling
        if training.crop % self.base.info.pixel_multiple:
            raise UsageError(f"--crop {training.crop}: must be a multiple of {self.base.info.pixel_multiple} "
                             f"for {training.base}")
        self.params = controlnet_params(base_unet_params(self.base), self.factor)
        with seeded_torch(derive_seed(training.seed, "controlnet/init")):  # the hint encoder's first convs
            self.net = ControlNet(**self.params).to(device)
        self.net.config = self.params
        copy_encoder(self.net, self.unet)
        self.ema = common.Ema(self.net, training.ema_decay)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=training.lr, weight_decay=0.0)
        self.data = None if training.procedural else ImageCrops(paths, CropConfig(training.crop, True, training.min_scale),
                                                                training.seed)

    def check_base(self) -> None:
        key = self.base.conditioning_key
        if self.base.denoiser is None or key not in (None, "crossattn"):
            raise UsageError(f"--model {self.training.base}: train controlnet takes a text-to-image or unconditional "
                             f"latent diffusion model (this one is conditioned by {key})")
        if self.training.procedural and self.base.cond_stage is None:
            raise UsageError(f"--data {PROCEDURAL}: the captioned scenes need a text model; give --data DIR")

    def samples(self, step: int) -> tuple[np.ndarray, list[str], list[int]]:
        """(B, H, W, 3) uint8 images of step `step`, their captions ("" for folders) and item indices."""
        first = step * self.training.batch_size
        indices = list(range(first, first + self.training.batch_size))
        if self.data is not None:
            return self.data.batch(step, self.training.batch_size), [""] * len(indices), indices
        scenes = [shape_scene(derive_seed(self.training.seed, f"{SCENE_STREAM}/{i}"), self.training.crop) for i in indices]
        return np.stack([s[0] for s in scenes]), [s[1] for s in scenes], indices

    def context(self, captions: list[str], indices: list[int]) -> Optional["torch.Tensor"]:
        """The frozen text encoder's context, a `caption_dropout` share of captions replaced by ""."""
        import torch

        if self.text is None:
            return None
        keep = [np.random.default_rng(derive_seed(self.training.seed, f"drop/{i}")).random() >= self.training.caption_dropout
                for i in indices]
        with torch.no_grad():
            return self.text.encode([c if k else "" for c, k in zip(captions, keep)]).float()

    def batch(self, step: int) -> tuple["torch.Tensor", "torch.Tensor", Optional["torch.Tensor"]]:
        """Scaled latents, hints (B, 3, H, W) in [0, 1] and context of training step `step`."""
        import torch

        images, captions, indices = self.samples(step)
        hints = self.training.hint.make(images, [derive_seed(self.training.seed, f"hint/{i}") for i in indices])
        with torch.no_grad():
            z0 = self.base.scale_factor * self.first_stage.encode(to_tensor(images).to(self.device)).float()
        hint = torch.from_numpy(hints).permute(0, 3, 1, 2).float().div(255).to(self.device)
        return z0, hint, self.context(captions, indices)

    def loss(self, z0: "torch.Tensor", hint: "torch.Tensor", context: Optional["torch.Tensor"], step: int) -> "torch.Tensor":
        """MSE of the controlled UNet's prediction against the base's target (eps or v) at random timesteps."""
        import torch

        alphas = self.alphas_cumprod
        generator = torch.Generator("cpu").manual_seed(derive_seed(self.training.seed, f"noise/{step}"))
        t = torch.randint(0, len(alphas), (z0.shape[0],), generator=generator)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        ac = alphas.to(z0.device)[t].view(-1, 1, 1, 1)
        t = t.to(z0.device)
        x_t = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
        target = noise if self.base.parameterization == "eps" else ac.sqrt() * noise - (1 - ac).sqrt() * z0
        with common.autocast(self.device, self.dtype):
            residuals = self.net(x_t, hint, t, context)
            predicted = self.unet(x_t, t, context=context, control=residuals)
        return (predicted.float() - target).pow(2).mean()

    def step(self, step: int) -> dict[str, float]:
        loss = self.loss(*self.batch(step), step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.net)
        return {"loss": float(loss.detach())}

    def run_config(self) -> dict[str, Any]:
        training = common.config_dict(self.training)
        return {"kind": "controlnet",
                "arch": {"base": self.base_identity(), "hint_block_channels": self.params["hint_block_channels"],
                         "hint": self.training.hint.kind},
                "training": training}

    def base_identity(self) -> str:
        from ldmtool.runtime.cache import file_sha256

        return f"{self.training.base}@{file_sha256(self.base.load_info.path)[:10]}"

    def state(self, step: int) -> dict[str, Any]:
        return {"step": step, "run_config": self.run_config(), "model": self.net.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict[str, Any]) -> int:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def config(self, step: int) -> dict[str, Any]:
        """The cldm config of the export, with the base model, the hint it reads and the run in `ldmtool:`."""
        hint = self.training.hint.recorded()
        block = {
            "family": "ldmtool-controlnet",
            "task": "control",
            "description": f"{hint['preprocessor']} ControlNet for {self.training.base}, trained by "
                           f"`ldmtool train controlnet` ({step} steps)",
            "base_model": self.training.base,
            "hint": hint,
            "step": step,
            **self.run_config(),
        }
        control = {"target": CONTROLNET_TARGET, "params": self.params}
        params = {"control_key": "hint", "only_mid_control": False, "control_stage_config": control}
        return {"ldmtool": block, "model": {"target": CONTROL_LDM_TARGET, "params": params}}

    def export(self, run_dir: Path, step: int) -> Path:
        return common.save_export(run_dir, self.ema.averaged_state(self.net), self.config(step))


def train_controlnet(training: ControlNetTraining, paths: Sequence[Path], run: common.RunOptions) -> Path:
    """Train (or resume) a ControlNet in `run.out`; returns the exported `model.safetensors`."""
    device, dtype = common.device_and_dtype(run)
    trainer = ControlNetTrainer(training, paths, device, dtype)
    return common.run_loop(trainer, run, f"controlnet ({training.hint.kind})")
