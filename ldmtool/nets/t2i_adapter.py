"""T2I-Adapter (Mou et al. 2023), the full adapter in diffusers' `T2IAdapter` layout (keys without its
`adapter.` prefix): the hint pixel-unshuffled by 8, a 3x3 `conv_in`, then one `body` block per UNet level
(average-pooled 2x from the second on, a 1x1 `in_conv` where the width changes, residual blocks of a 3x3 conv,
ReLU and a 1x1 conv). Its features, one per level, are computed once per image and added to the UNet's
encoder at the end of each level (`UNetModel.forward(..., adapter=features)`).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.act(self.block1(x))) + x


class AdapterBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(num_res_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class FullAdapter(nn.Module):
    """`adapter(hint)` -> one feature per UNet level; hint (B, C, 8h, 8w) in [0, 1]."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (320, 640, 1280, 1280),
                 num_res_blocks: int = 2, downscale_factor: int = 8):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(downscale_factor)
        self.conv_in = nn.Conv2d(in_channels * downscale_factor**2, channels[0], 3, padding=1)
        widths = [channels[0], *channels]
        self.body = nn.ModuleList([AdapterBlock(widths[i], widths[i + 1], num_res_blocks, down=i > 0)
                                   for i in range(len(channels))])

    def forward(self, hint: Tensor) -> list[Tensor]:
        x = self.conv_in(self.unshuffle(hint))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


def adapter_params(shapes: dict[str, tuple[int, ...]]) -> dict:
    """FullAdapter's parameters from its keys (diffusers layout without the `adapter.` prefix)."""
    levels = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("body.")})
    per_level = len({k.split(".")[3] for k in shapes if k.startswith("body.0.resnets.")})
    conv_in = shapes["conv_in.weight"]
    return {"in_channels": conv_in[1] // 64, "channels": [shapes[f"body.{i}.resnets.0.block1.weight"][0] for i in levels],
            "num_res_blocks": per_level}
