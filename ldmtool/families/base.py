"""What a family entry declares, and the checkpoint key names its detection rules look at.

Detection rules look at structure only (which conditioner is present, UNet input channels, first-stage
kind and depth, vocabulary and sequence sizes), never at widths, so they hold for small models of a family
as well as for the released checkpoints. Some families share one architecture; the weights cannot tell
them apart, so detection names the first and lists the others as `alternatives`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from ldmtool.families.info import ModelInfo

Shapes = Mapping[str, Sequence[int]]

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Detection:
    family: str
    alternatives: tuple[str, ...] = ()
    note: str = ""
    evidence: tuple[str, ...] = field(default=())
    # Families without reference configs (FLUX.1, SD3) read the architecture from the shapes: the config
    # document to build, used instead of the preset's full-size one.
    config: Optional[Mapping[str, Any]] = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        alt = f" (same architecture as {', '.join(self.alternatives)})" if self.alternatives else ""
        return f"{self.family}{alt}{'; ' + self.note if self.note else ''}"


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: its presets (presets/<name>.yaml, CompVis configs), how a checkpoint of it is
    recognised from its keys, and how a bundle built from one of its configs is described."""

    name: str
    presets: tuple[str, ...]
    detect: Callable[[Shapes], Optional[Detection]]
    describe: Callable[[Any, "Family"], "ModelInfo"]  # (bundle, family) -> its ModelInfo
    conditioner: str = ""  # what conditions it, for people reading the registry
    # A flow-matching family: how its models run (text encoders, network call, time shift), made on first use
    # (`pipelines/flow_engine.py` is the one place that runs it).
    flow: Optional[Callable[[], "FlowRecipe"]] = None

    def owns(self, name: str) -> bool:
        return name == self.name or name in self.presets

    def model_info(self, bundle: Any) -> "ModelInfo":
        return self.describe(bundle, self)


FlowCall = Callable[["torch.Tensor", "torch.Tensor", Any], "torch.Tensor"]  # (x_t, t in [0, 1], Cond) -> velocity


class FlowRecipe(Protocol):
    """What a flow-matching family says about running one of its bundles (`families/flux_flow.py`, `sd3_flow.py`)."""

    name: str  # as messages name the family
    required_encoders: tuple[str, ...]  # text encoder kinds a run needs ('clip_l', 'clip_g', 't5xxl')
    t5_tokenizer_folder: str  # where a diffusers folder of the family keeps T5's tokenizer.json
    encoder_folders: tuple[str, ...]  # a diffusers folder's text encoder subfolders
    takes_cfg: bool  # classifier-free guidance with a negative prompt (else the network has no uncond)

    def takes_guidance(self, bundle: Any) -> bool: ...  # a guidance-distilled network's guidance input
    def t5_padding(self, bundle: Any) -> Any: ...  # nets.t5.T5Padding
    def times(self, bundle: Any, latent_hw: tuple[int, int]) -> Any: ...  # diffusion.flow.FlowTimes
    def encode(self, bundle: Any, encoders: Any, texts: Sequence[str], *, negative: bool,
               clip_skip: Optional[int]) -> tuple["torch.Tensor", "torch.Tensor"]: ...  # (tokens, pooled)
    def network(self, bundle: Any, canvas_hw: tuple[int, int], guidance: Optional[float],
                dtype: "torch.dtype") -> FlowCall: ...


def unet_in_channels(shapes: Shapes) -> Optional[int]:
    return int(shapes[UNET_IN][1]) if UNET_IN in shapes else None
