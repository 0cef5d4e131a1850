"""Exact denoisers for data with a known density: the closed-form oracle for sampler tests and benchmarks.

For data x0 ~ N(mu, diag(s^2)) and x = x0 + sigma eps, E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu), and
the probability-flow ODE dx/dsigma = (x - E[x0 | x]) / sigma has the solution
x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2), per dimension.
A mixture of such Gaussians has the responsibility-weighted sum of the components' posteriors as its exact
denoiser; its ODE has no closed form, so `ode_reference` integrates it with many RK4 steps in log-sigma.

Tensors are (B, D) or (B, D, 1, 1) (the latter for networks that expect images); sigma is (B,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _vec(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-dimension (D,) vector shaped to broadcast against x of shape (B, D, ...)."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 2)))


@dataclass(frozen=True)
class GaussianData:
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        mu, var, s2 = _vec(self.mean, x), _vec(self.std, x) ** 2, _col(sigma, x) ** 2
        return mu + var / (var + s2) * (x - mu)

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        mu, var = _vec(self.mean, x_start), _vec(self.std, x_start) ** 2
        return mu + (x_start - mu) * ((var + sigma_end**2) / (var + sigma_start**2)).sqrt()

    def prior_sample(self, n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
        """Samples of x at noise level sigma (the exact marginal N(mu, s^2 + sigma^2))."""
        z = torch.randn(n, len(self.mean), generator=generator, dtype=torch.float64)
        return self.mean + (self.std**2 + sigma**2).sqrt() * z


@dataclass(frozen=True)
class GaussianMixture:
    weights: torch.Tensor  # (K,) summing to 1
    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K, D)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)  # (B, D)
        var = self.stds[None] ** 2 + sigma.to(torch.float64).reshape(-1, 1, 1) ** 2  # (B, K, D)
        diff = flat[:, None] - self.means[None]  # (B, K, D)
        log_p = self.weights.log() - 0.5 * (diff**2 / var + var.log()).sum(-1)  # (B, K)
        resp = torch.softmax(log_p, dim=1)
        posterior = self.means[None] + self.stds[None] ** 2 / var * diff  # (B, K, D)
        return (resp[..., None] * posterior).sum(1).reshape(x.shape).to(x.dtype)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and covariance (D, D) of the mixture."""
        mean = (self.weights[:, None] * self.means).sum(0)
        centred = self.means - mean
        within = torch.diag_embed(self.stds**2)  # (K, D, D)
        between = centred[:, :, None] * centred[:, None, :]  # (K, D, D)
        cov = (self.weights[:, None, None] * (within + between)).sum(0)
        return mean, cov

    def prior_sample(self, n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + (self.stds[k] ** 2 + sigma**2).sqrt() * z


def ode_reference(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigma_start: float, sigma_end: float, steps: int = 2000) -> torch.Tensor:
    """Probability-flow ODE solution by classical RK4 in u = log(sigma), where dx/du = x - D(x, sigma)."""
    h = (math.log(sigma_end) - math.log(sigma_start)) / steps

    def slope(x: torch.Tensor, u: float) -> torch.Tensor:
        return x - denoise(x, torch.full((x.shape[0],), math.exp(u), dtype=torch.float64))

    u = math.log(sigma_start)
    for _ in range(steps):
        k1 = slope(x, u)
        k2 = slope(x + h / 2 * k1, u + h / 2)
        k3 = slope(x + h / 2 * k2, u + h / 2)
        k4 = slope(x + h * k3, u + h)
        x, u = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), u + h
    return x
