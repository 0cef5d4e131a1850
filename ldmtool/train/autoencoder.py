"""`ldmtool train autoencoder`: a KL-regularised first stage (CompVis `AutoencoderKL`) trained offline.

Losses that need nothing downloaded: L1, an L1 on image gradients, SSIM, the KL term (tiny weight, as in
the paper), and an optional small patch discriminator (hinge loss) switched on after `disc_start` steps.
The export is the original key layout (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`)
plus a CompVis-format config, so it loads like the released kl-f4 / kl-f8 first stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import derive_seed, seeded_torch
from ldmtool.train import common
from ldmtool.train.data import CropConfig, ImageCrops, to_tensor

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

AUTOENCODER_TARGET = "ldm.models.autoencoder.AutoencoderKL"
CH_MULT = {4: (1, 2, 4), 8: (1, 2, 4, 4)}
DEFAULT_Z_CHANNELS = {4: 3, 8: 4}  # as the released kl-f4 / kl-f8


@dataclass(frozen=True)
class AutoencoderArch:
    """Architecture of the KL autoencoder; `params()` gives the CompVis YAML params."""

    factor: int = 4
    # A multiple of 32 (GroupNorm with 32 groups). The CLI asks for 64 or more: at 32 the decoder's last
    # GroupNorm normalises every channel alone, removing each channel's image-wide mean, so the model can
    # hardly reproduce overall colour and brightness (tests use 32 only for speed).
    ch: int = 64
    num_res_blocks: int = 1
    z_channels: Optional[int] = None  # default: 3 for f=4, 4 for f=8
    # Self-attention in the mid block and at the lowest resolution. Off by default: without it the first
    # stage is purely convolutional, so an exact tiled decode costs linear time in the image area (a
    # global mid-block attention over a 16-megapixel output's latent is quadratic, hours on a CPU).
    attention: bool = False
    ch_mult: Optional[tuple[int, ...]] = None  # default CH_MULT[factor]; one level per halving, plus one

    def __post_init__(self) -> None:
        if self.factor not in CH_MULT:
            raise UsageError(f"--factor {self.factor}: use 4 or 8")
        if self.ch_mult is not None and len(self.ch_mult) != len(CH_MULT[self.factor]):
            raise UsageError(f"--channel-mult {','.join(map(str, self.ch_mult))}: give {len(CH_MULT[self.factor])} "
                             f"multipliers for --factor {self.factor}")
        if self.ch % 32:
            raise UsageError(f"--channels {self.ch}: must be a multiple of 32 (GroupNorm groups)")

    @property
    def latent_channels(self) -> int:
        return self.z_channels or DEFAULT_Z_CHANNELS[self.factor]

    def params(self, resolution: int) -> dict[str, Any]:
        ch_mult = list(self.ch_mult or CH_MULT[self.factor])
        lowest = resolution // self.factor
        return {
            "embed_dim": self.latent_channels,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": self.latent_channels,
                "resolution": resolution,
                "in_channels": 3,
                "out_ch": 3,
                "ch": self.ch,
                "ch_mult": ch_mult,
                "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": [lowest] if self.attention else [],
                "attn_type": "vanilla" if self.attention else "none",
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        }


@dataclass(frozen=True)
class AutoencoderLoss:
    kl_weight: float = 1e-6
    grad_weight: float = 0.5
    ssim_weight: float = 0.2
    # L1 on colour-opponent channels: on a corpus of mostly grey images the plain L1 lets a small first
    # stage settle on grey output (seen on CPU runs); this keeps colour errors from being drowned out.
    chroma_weight: float = 1.0
    disc_weight: float = 0.0  # 0 turns the discriminator off
    disc_start: int = 2000


@dataclass(frozen=True)
class AutoencoderTraining:
    crop: int = 128
    batch_size: int = 4
    lr: float = 2e-4
    ema_decay: float = 0.999
    seed: int = 0
    min_scale: float = 0.5  # random source rescale before cropping (see CropConfig)
    colour_jitter: float = 0.5  # share of crops with random hue/saturation/tint (see data.colour_jitter)
    sample_posterior: bool = True  # decode a posterior sample (as LDM) or its mean (faster to train)
    procedural_share: float = 0.0  # share of crops drawn from the project's procedural generators
    init: Optional[str] = None  # start from this autoencoder's weights (same architecture)
    # Train only the decoder side (decoder, post_quant_conv): the latent space stays exactly that of `init`,
    # so diffusion models trained on it keep working with the new decoder.
    freeze_encoder: bool = False
    loss: AutoencoderLoss = field(default_factory=AutoencoderLoss)

    def __post_init__(self) -> None:
        if self.freeze_encoder and not self.init:
            raise UsageError("--freeze-encoder needs --init AE: a frozen random encoder has no latent space worth keeping")


def build_autoencoder(params: dict[str, Any]) -> "nn.Module":
    from ldmtool.nets.autoencoder import AutoencoderKL

    return AutoencoderKL(**params)


def full_config(params: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The CompVis-format YAML of an exported first stage, with the training recipe recorded beside it."""
    block = {"family": "ldmtool-autoencoder", "task": "autoencoder", **recipe}
    return {"ldmtool": block, "model": {"base_learning_rate": 4.5e-6, "target": AUTOENCODER_TARGET, "params": params}}


def posterior(model: "nn.Module", x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(mean, logvar) of the diagonal Gaussian posterior, through the original module names."""
    moments = model.quant_conv(model.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def kl_divergence(mean: "torch.Tensor", logvar: "torch.Tensor") -> "torch.Tensor":
    """KL(q || N(0, I)) summed over latent dimensions, averaged over the batch (as LDM's loss)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def gradient_l1(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """L1 distance between horizontal and vertical finite differences: penalises blurred edges."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def ssim(a: "torch.Tensor", b: "torch.Tensor", window: int = 7) -> "torch.Tensor":
    """Mean SSIM (Wang et al. 2004) of images in [-1, 1], with a uniform window, per channel."""
    import torch.nn.functional as F

    a, b = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return score.mean()


def patch_discriminator(channels: int = 64, layers: int = 3) -> "nn.Module":
    """A small PatchGAN: strided 4x4 convolutions, one logit per overlapping patch."""
    from torch import nn

    blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
    width = channels
    for _ in range(layers - 1):
        blocks += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
        width *= 2
    blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
    return nn.Sequential(*blocks)


def chroma(x: "torch.Tensor") -> "torch.Tensor":
    """(B, 2, H, W) colour-opponent channels of RGB images: red - green, blue - yellow."""
    import torch

    r, g, b = x.unbind(1)
    return torch.stack([r - g, b - (r + g) / 2], dim=1)


def reconstruction_loss(rec: "torch.Tensor", x: "torch.Tensor", loss: AutoencoderLoss) -> dict[str, "torch.Tensor"]:
    terms = {"l1": (rec - x).abs().mean(), "grad": gradient_l1(rec, x)}
    total = terms["l1"] + loss.grad_weight * terms["grad"]
    if loss.chroma_weight:
        terms["chroma"] = (chroma(rec) - chroma(x)).abs().mean()
        total = total + loss.chroma_weight * terms["chroma"]
    if loss.ssim_weight:
        terms["ssim"] = ssim(rec, x)
        total = total + loss.ssim_weight * (1 - terms["ssim"])
    terms["rec"] = total
    return terms


class AutoencoderTrainer:
    """One training run: model, optimizers, EMA, data; `step(i)` trains on batch i and returns metrics."""

    def __init__(self, arch: AutoencoderArch, training: AutoencoderTraining, paths: Sequence[Path], device, dtype):
        import torch

        self.arch, self.training, self.device, self.dtype = arch, training, device, dtype
        self.params = arch.params(training.crop)
        with seeded_torch(derive_seed(training.seed, "autoencoder/init")):
            self.model = build_autoencoder(self.params).to(device)
        if training.init:
            init_autoencoder(self.model, Path(training.init))
        if training.freeze_encoder:
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith(DECODER_SIDE))
        self.ema = common.Ema(self.model, training.ema_decay)
        # GAN-style betas only when a discriminator is trained; plain Adam converges faster without one.
        betas = (0.5, 0.9) if training.loss.disc_weight > 0 else (0.9, 0.999)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=training.lr, betas=betas)
        self.disc = None
        if training.loss.disc_weight > 0:
            with seeded_torch(derive_seed(training.seed, "autoencoder/discriminator-init")):
                self.disc = patch_discriminator().to(device)
            self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=training.lr, betas=(0.5, 0.9))
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.data = ImageCrops(paths, CropConfig(training.crop, True, training.min_scale, training.colour_jitter), training.seed)

    def batch(self, step: int) -> "torch.Tensor":
        return to_tensor(self.crops(step)).to(self.device)

    def crops(self, step: int) -> "np.ndarray":
        """(B, crop, crop, 3) uint8: image crops, each replaced by a procedural image with `procedural_share`."""
        import numpy as np

        from ldmtool.train.procedural import procedural_image

        crops = self.data.batch(step, self.training.batch_size)
        if self.training.procedural_share:
            rng = np.random.default_rng(derive_seed(self.training.seed, f"procedural/{step}"))
            for i in range(len(crops)):
                if rng.random() < self.training.procedural_share:
                    crops[i] = procedural_image(int(rng.integers(0, 2**31)), self.training.crop)
        return crops

    def losses(self, x: "torch.Tensor", step: int, generator: Optional["torch.Generator"] = None) -> dict[str, "torch.Tensor"]:
        """All loss terms for batch `x`; `total` is what the autoencoder minimises."""
        import torch

        mean, logvar = posterior(self.model, x)
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean)
        z = mean + (0.5 * logvar).exp() * noise if self.training.sample_posterior else mean
        rec = self.model.decode(z)
        terms = reconstruction_loss(rec, x, self.training.loss)
        terms["kl"] = kl_divergence(mean, logvar)
        total = terms["rec"] + self.training.loss.kl_weight * terms["kl"]
        if self.disc is not None and step >= self.training.loss.disc_start:
            terms["g"] = -self.disc(rec).mean()
            total = total + self.training.loss.disc_weight * terms["g"]
        terms["total"] = total
        terms["_rec_image"] = rec
        return terms

    def step(self, step: int) -> dict[str, float]:
        import torch

        x = self.batch(step)
        generator = torch.Generator("cpu").manual_seed(self.training.seed * 1_000_003 + step)
        with common.autocast(self.device, self.dtype):
            terms = self.losses(x, step, generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.disc is not None and step >= self.training.loss.disc_start:
            self._discriminator_step(x, terms["_rec_image"].detach())
        self.ema.update(self.model)
        return {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_") and v.ndim == 0}

    def _discriminator_step(self, real: "torch.Tensor", fake: "torch.Tensor") -> None:
        import torch.nn.functional as F

        with common.autocast(self.device, self.dtype):
            loss = 0.5 * (F.relu(1.0 - self.disc(real)).mean() + F.relu(1.0 + self.disc(fake)).mean())
        self.disc_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.disc_optimizer)
        self.scaler.update()

    def run_config(self) -> dict[str, Any]:
        return {"kind": "autoencoder", "arch": common.config_dict(self.arch), "training": common.config_dict(self.training)}

    def state(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "run_config": self.run_config(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> int:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        return int(state["step"])

    def export(self, run_dir: Path, step: int) -> Path:
        recipe = {"step": step, **self.run_config()}
        weights = self.ema.averaged_state(self.model)
        return common.save_export(run_dir, weights, full_config(self.params, recipe))


DECODER_SIDE = ("decoder.", "post_quant_conv.")
AE_PREFIXES = ("", "first_stage_model.")  # an autoencoder file, or a LatentDiffusion checkpoint's first stage


def init_autoencoder(model: "nn.Module", checkpoint: Path) -> None:
    """Load every weight of `model` from an autoencoder checkpoint (or a LatentDiffusion checkpoint's first
    stage); a missing or differently shaped tensor is a usage error (another architecture)."""
    from ldmtool.checkpoints.files import read_state_dict

    if not checkpoint.is_file():
        raise UsageError(f"--init {checkpoint}: no such checkpoint file")
    source = read_state_dict(checkpoint)
    own = model.state_dict()
    for prefix in AE_PREFIXES:
        found = {k: source[prefix + k] for k in own if prefix + k in source}
        if len(found) == len(own):
            break
    else:
        raise UsageError(f"--init {checkpoint}: not an autoencoder with this architecture "
                         f"(found {len(found)} of its {len(own)} weights by name)")
    wrong = [k for k, v in found.items() if v.shape != own[k].shape]
    if wrong:
        raise UsageError(f"--init {checkpoint}: {len(wrong)} weights differ in shape (e.g. {wrong[0]}); "
                         "give --channels/--res-blocks/--z-channels of that autoencoder")
    common.copy_weights(model, found)


def train_autoencoder(arch: AutoencoderArch, training: AutoencoderTraining, paths: Sequence[Path], run: common.RunOptions) -> Path:
    """Train (or resume) an autoencoder in `run.out`; returns the exported `model.safetensors`."""
    trainer = AutoencoderTrainer(arch, training, paths, *common.device_and_dtype(run))
    return common.run_loop(trainer, run, "autoencoder")
