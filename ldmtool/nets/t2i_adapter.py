"""T2I-Adapter (Mou et al. 2023) in diffusers' `T2IAdapter` layout (keys without its `adapter.` prefix; the
original release files are renamed onto it by `addons/t2i_adapter.py`). The hint is pixel-unshuffled, then
each `body` level yields one feature map, computed once per image and added to the UNet's encoder
(`UNetModel.forward(..., adapter=features)`):

- `FullAdapter` (SD 1.x/2.x, `Adapter` in the original code): unshuffle by 8, a 3x3 `conv_in`, then one level
  per UNet level, average-pooled 2x from the second on, a 1x1 `in_conv` where the width changes, and residual
  blocks of a 3x3 conv, ReLU and a 1x1 conv. With `xl=True` (SDXL, diffusers' `full_adapter_xl`): unshuffle by
  16 and only the third level pooled, so its four maps sit at SDXL's 1/2, 1/2, 1/4, 1/4 of the latent.
- `LightAdapter` (`Adapter_light`, the colour adapter): no `conv_in`; every level is a 1x1 `in_conv` to a
  quarter of its width, residual blocks of two 3x3 convs, and a 1x1 `out_conv`.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ldmtool.nets._layers import Conv2d


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int, kernel: int = 1):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.act(self.block1(x))) + x


class AdapterBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if down else None
        self.in_conv = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(num_res_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        middle = out_channels // 4
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if down else None
        self.in_conv = Conv2d(in_channels, middle, 1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(middle, kernel=3) for _ in range(num_res_blocks)])
        self.out_conv = Conv2d(middle, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


def _full_levels(channels: Sequence[int], xl: bool) -> list[tuple[int, int, bool]]:
    """(input width, output width, pooled first) of each level."""
    if xl:
        if len(channels) != 4:
            raise ValueError(f"an SDXL T2I-Adapter has 4 levels, not {len(channels)}")
        c = channels
        return [(c[0], c[0], False), (c[0], c[1], False), (c[1], c[2], True), (c[3], c[3], False)]
    widths = [channels[0], *channels]
    return [(widths[i], widths[i + 1], i > 0) for i in range(len(channels))]


class FullAdapter(nn.Module):
    """`adapter(hint)` -> one feature per level; hint (B, C, H, W) in [0, 1], H and W multiples of the unshuffle."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (320, 640, 1280, 1280),
                 num_res_blocks: int = 2, xl: bool = False):
        super().__init__()
        self.in_channels = in_channels
        factor = 16 if xl else 8
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.conv_in = nn.Conv2d(in_channels * factor**2, channels[0], 3, padding=1)
        self.body = nn.ModuleList([AdapterBlock(a, b, num_res_blocks, down)
                                   for a, b, down in _full_levels(channels, xl)])

    def forward(self, hint: Tensor) -> list[Tensor]:
        x = self.conv_in(self.unshuffle(hint))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class LightAdapter(nn.Module):
    """`adapter(hint)` -> one feature per level (`channels`: each level's output width)."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (320, 640, 1280, 1280), num_res_blocks: int = 4):
        super().__init__()
        self.in_channels = in_channels
        self.unshuffle = nn.PixelUnshuffle(8)
        widths = [in_channels * 64, *channels]
        self.body = nn.ModuleList([LightAdapterBlock(widths[i], widths[i + 1], num_res_blocks, down=i > 0)
                                   for i in range(len(channels))])

    def forward(self, hint: Tensor) -> list[Tensor]:
        x = self.unshuffle(hint)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


def _levels(shapes: dict[str, tuple[int, ...]]) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in shapes if k.startswith("body.")})


def _blocks_per_level(shapes: dict[str, tuple[int, ...]]) -> int:
    return len({k.split(".")[3] for k in shapes if k.startswith("body.0.resnets.")})


def build_adapter(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The adapter a state dict in diffusers' layout (without prefix) describes, on the current device.

    The hint has 1 or 3 channels (the released ones), so `conv_in`'s input width, 64 C for an unshuffle by 8
    and 256 C for SDXL's by 16, tells the full adapters apart: their keys are otherwise the same."""
    levels, blocks = _levels(shapes), _blocks_per_level(shapes)
    if "body.0.out_conv.weight" in shapes:
        return LightAdapter(shapes["body.0.in_conv.weight"][1] // 64,
                            [shapes[f"body.{i}.out_conv.weight"][0] for i in levels], blocks)
    unshuffled = shapes["conv_in.weight"][1]
    xl = unshuffled % 256 == 0 and unshuffled // 256 in (1, 3)
    return FullAdapter(unshuffled // (256 if xl else 64),
                       [shapes[f"body.{i}.resnets.0.block1.weight"][0] for i in levels], blocks, xl=xl)
