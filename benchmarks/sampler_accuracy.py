"""Sampler accuracy versus steps against exact solutions (issue 4), as JSON lines.

Data with a known exact denoiser stands in for the network (`ldmtool.diffusion.oracle`):
  gaussian  N(mu, diag(s^2)) in 3 dimensions: the probability-flow ODE solution is closed form;
  mixture   a 2-component Gaussian mixture in 2 dimensions: reference solution by RK4 (1000 steps).
Deterministic samplers: max abs error of x at sigma_min = 0.02 against the exact ODE solution, starting from
the same 64 points at sigma_max = 20, on Karras sigmas (rho 7). Stochastic samplers: error of the sample
mean and covariance (max abs entry) over 20000 samples, ending at sigma 0. `nfe` counts network calls.

    python benchmarks/sampler_accuracy.py              # every sampler, 5..80 steps
    python benchmarks/sampler_accuracy.py --quick      # fewer steps and samples
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ldmtool.diffusion import samplers as SM
from ldmtool.diffusion.oracle import GaussianData, GaussianMixture, ode_reference
from ldmtool.diffusion.schedules import karras_schedule, karras_sigmas

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.02, 20.0
DATASETS = {
    "gaussian": GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.2, 0.6], dtype=F64)),
    "mixture": GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=F64),
        torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
        torch.tensor([[0.3, 0.2], [0.4, 0.5]], dtype=F64),
    ),
}


class Counting:
    """The exact denoiser, counting its calls (network function evaluations)."""

    def __init__(self, data):
        self.data, self.calls = data, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.data.denoise(x, sigma)


def exact_solution(name: str, data, x_start: torch.Tensor) -> torch.Tensor:
    if name == "gaussian":
        return data.ode_solution(x_start, SIGMA_MAX, SIGMA_MIN)
    return ode_reference(data.denoise, x_start, SIGMA_MAX, SIGMA_MIN, steps=1000)


def deterministic_rows(sampler: str, steps_list: list[int]):
    for data_name, data in DATASETS.items():
        x_start = data.prior_sample(64, SIGMA_MAX, torch.Generator().manual_seed(0))
        exact = exact_solution(data_name, data, x_start)
        for steps in steps_list:
            model = Counting(data)
            out = SM.sample(sampler, model, x_start, karras_sigmas(steps + 1, SIGMA_MIN, SIGMA_MAX))
            error = (out - exact).abs().max().item()
            yield {"sampler": sampler, "data": data_name, "steps": steps, "nfe": model.calls,
                   "metric": "max_abs_error_to_ode_solution", "value": error}


def moments(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, GaussianData):
        return data.mean, torch.diag(data.std**2)
    return data.moments()


def stochastic_rows(sampler: str, steps_list: list[int], samples: int):
    for data_name, data in DATASETS.items():
        mean, cov = moments(data)
        for steps in steps_list:
            generator = torch.Generator().manual_seed(1)
            x = data.prior_sample(samples, SIGMA_MAX, generator)
            model = Counting(data)
            noise = lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype)  # noqa: E731
            out = SM.sample(sampler, model, x, karras_schedule(steps, SIGMA_MIN, SIGMA_MAX).sigmas, noise=noise)
            row = {"sampler": sampler, "data": data_name, "steps": steps, "nfe": model.calls, "samples": samples}
            yield {**row, "metric": "mean_error", "value": (out.mean(0) - mean).abs().max().item()}
            yield {**row, "metric": "covariance_error", "value": (torch.cov(out.T) - cov).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps_list = [5, 10, 20] if args.quick else [5, 10, 20, 40, 80]
    samples = 4000 if args.quick else 20000
    for name, info in SM.SAMPLERS.items():
        start = time.perf_counter()
        rows = stochastic_rows(name, steps_list, samples) if info.stochastic else deterministic_rows(name, steps_list)
        for row in rows:
            print(json.dumps({**row, "value": float(f"{row['value']:.4g}")}), flush=True)
        print(json.dumps({"sampler": name, "metric": "benchmark_seconds", "value": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
