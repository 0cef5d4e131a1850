"""Turn a discrete-time VP network (eps, v or x0 prediction) into the shared denoiser form.

The network was trained on x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps at integer timesteps t. Samplers work
on x = x0 + sigma eps with sigma = sqrt((1 - a_t) / a_t), so x_vp = x / sqrt(sigma^2 + 1) (`c_in`), and the
timestep fed to the network is found by interpolating in log-sigma between the model's discrete sigmas
(an exact integer when sigma is one of them, so DDIM/PLMS/DDPM call the network as the reference does).

Conditioning dispatch by the CompVis `conditioning_key` (`Conditioning`):
  None          net(x)
  concat        net(cat([x, cond.concat], channels))
  crossattn     net(x, context=cond.crossattn)
  hybrid        both of the above (SD inpainting)
  adm           net(x, y=cond.y) (class / noise-level labels)
  hybrid-adm    concat + context + y (SD x4 upscaler)
  crossattn-adm context + y
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.schedules import discrete_sigmas, sigma_to_t
from ldmtool.families.info import Conditioning, Parameterization

# Fractional timesteps this close to an integer are snapped to it, so a schedule's sigma that went through
# float32 still calls the network with the integer timestep it stands for.
_SNAP = 1e-3

_FIELDS: dict[Conditioning, frozenset[str]] = {
    Conditioning.NONE: frozenset(),
    Conditioning.CONCAT: frozenset({"concat"}),
    Conditioning.CROSSATTN: frozenset({"crossattn"}),
    Conditioning.HYBRID: frozenset({"concat", "crossattn"}),
    Conditioning.ADM: frozenset({"y"}),
    Conditioning.HYBRID_ADM: frozenset({"concat", "crossattn", "y"}),
    Conditioning.CROSSATTN_ADM: frozenset({"crossattn", "y"}),
}

Network = Callable[..., torch.Tensor]  # net(x, timesteps, context=None, y=None) -> prediction


class DiscreteDenoiser:
    """`denoise(x, sigma, cond) -> x0` over a discrete-time network and its `alphas_cumprod`.

    `quantize=True` rounds every timestep to the nearest training step (what diffusers' Karras schedulers
    feed the network); by default fractional timesteps are passed through, as k-diffusion does.
    """

    def __init__(
        self,
        network: Network,
        alphas_cumprod: torch.Tensor,
        parameterization: Parameterization | str = Parameterization.EPS,
        conditioning: Union[Conditioning, str, None] = Conditioning.NONE,
        *,
        quantize: bool = False,
    ):
        self.network = network
        self.parameterization = Parameterization(parameterization)
        self.conditioning = _conditioning(conditioning)
        self.quantize = quantize
        self.sigmas = discrete_sigmas(alphas_cumprod)  # (T,) ascending, float64, CPU
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_bundle(cls, bundle: Any, *, parameterization: Optional[str] = None, quantize: bool = False,
                    network: Optional[Network] = None) -> "DiscreteDenoiser":
        """Wrap a model bundle (shared contract: `denoiser`, `alphas_cumprod`, `parameterization`, `conditioning_key`;
        duck-typed, hence `Any`: a LatentDiffusionBundle or a stand-in with those attributes)."""
        return cls(
            network or bundle.denoiser,
            bundle.alphas_cumprod,
            parameterization or bundle.parameterization,
            bundle.conditioning_key,
            quantize=quantize,
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Training timestep (float64, CPU) the network is called with for each sigma."""
        t = sigma_to_t(sigma, self.log_sigmas)
        nearest = t.round()
        return nearest if self.quantize else torch.where((t - nearest).abs() < _SNAP, nearest, t)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[Cond] = None) -> torch.Tensor:
        sigma_b = sigma.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)).reshape(-1, 1, 1, 1)
        c_in = 1 / (sigma_b**2 + 1).sqrt()
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32)
        out = self._call_network((x * c_in).to(x.dtype), t, cond or Cond()).to(sigma_b.dtype)
        return self._to_x0(x.to(sigma_b.dtype), out, sigma_b, c_in).to(x.dtype)

    def _to_x0(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor, c_in: torch.Tensor) -> torch.Tensor:
        if self.parameterization is Parameterization.EPS:
            return x - sigma * out
        if self.parameterization is Parameterization.V:
            # v = alpha eps - sigma_vp x0 on the VP sample, with alpha = c_in and sigma_vp = sigma c_in
            return x * c_in**2 - sigma * c_in * out
        return out

    def _call_network(self, x_in: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        fields = {name for name in ("crossattn", "concat", "y") if getattr(cond, name) is not None}
        wanted = _FIELDS[self.conditioning]
        if fields != wanted:
            raise ValueError(
                f"conditioning_key {self.conditioning.value!r} needs {sorted(wanted) or 'no conditioning'}, "
                f"got {sorted(fields) or 'none'}"
            )
        if cond.concat is not None:
            x_in = torch.cat([x_in, cond.concat.to(x_in.dtype)], dim=1)
        control = {} if cond.control is None else {"control": cond.control, "control_scale": cond.control_scale}
        if cond.adapter is not None:
            control["adapter"] = cond.adapter
        return per_row(self.network, x_in, t.expand(x_in.shape[0]), context=cond.crossattn, y=cond.y, **control)


def _conditioning(key: Union[Conditioning, str, None]) -> Conditioning:
    try:
        return Conditioning(key)
    except ValueError:
        known = ", ".join(str(c.value) for c in Conditioning)
        raise ValueError(f"conditioning_key {key!r} is not supported (known: {known})") from None


def per_row(network: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`network(x, *args, **kwargs)` called once per batch row, the results stacked.

    Every kernel then sees the same shapes whatever the batch (items, tiles of a tile batch, cond and uncond
    of guidance), so a row's result, rounding included, does not depend on what shares its batch; CPU and
    GPU libraries pick their kernels, and so their summation order, by shape. Tensor arguments with one row
    per row of `x` are sliced along with it; the others (None, a shared row) are passed as they are.
    """
    def row(value, i: int):
        return value[i : i + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == x.shape[:1] else value

    if x.shape[0] == 1:
        return network(x, *args, **kwargs)
    return torch.cat([network(x[i : i + 1], *(row(a, i) for a in args), **{k: row(v, i) for k, v in kwargs.items()})
                      for i in range(x.shape[0])])


def bind(denoiser: Callable[..., torch.Tensor], cond: Union[Cond, Guided, None]
         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The sampler-facing `model(x, sigma) -> x0` with the conditioning fixed (`Guided` for a guided
    denoiser such as `CFGDenoiser`)."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, cond)

    return model
