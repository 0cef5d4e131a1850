"""Small denoisers shared by the tiling tests: networks with a known, finite receptive field."""
from torch import nn


class BlurDenoiser(nn.Module):
    """x0 = x blurred by three 5x5 box filters (receptive-field radius 6): samples have structure across
    neighbouring pixels, and tiles narrower than the radius are visibly inexact."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.blur = nn.Sequential(*[nn.Conv2d(channels, channels, 5, padding=2, groups=channels, bias=False)
                                    for _ in range(3)])
        for conv in self.blur:
            nn.init.constant_(conv.weight, 1 / 25)

    def forward(self, x, sigma, cond=None):
        return self.blur(x)
