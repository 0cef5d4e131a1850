"""Sampling math: schedules, the denoiser form, samplers and guidance (DESIGN.md section 4).

  cond.py        Cond / Guided conditioning records and the denoiser signature
  schedules.py   training betas, timestep spacings, Karras sigmas -> SamplingSchedule
  denoisers.py   DiscreteDenoiser: eps / v / x0 networks as denoise(x, sigma, cond) -> x0
  guidance.py    CFGDenoiser: classifier-free guidance and negative conditioning in one batch
  samplers.py    the samplers, their Step record, the registry and sample(name, ...)
  fewstep.py     the timestep arithmetic of lcm and tcd (distilled few-step models)
  img2img.py     which steps run for a strength, and the noised start
  masked.py      masked sampling for any model, feathered composite
  run.py         sample_latents: settings to latents in one call (what pipelines use)
  oracle.py      exact denoisers of Gaussian data (tests and benchmarks)
  names.py       sampler names without importing torch (CLI)
"""
