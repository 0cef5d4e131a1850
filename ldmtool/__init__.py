"""ldmtool: latent diffusion models over folders of images.

The Python API is imported lazily so that `import ldmtool` and the CLI's `--help` stay free of torch:
`build_model`, `load_model` (models), `load_controlnet` (a ControlNet file, any layout), and one call per task command, each taking and returning images as
NumPy arrays (or Pillow images and files in), with the command's option names and defaults:
`superres`, `inpaint`, `img2img`, `txt2img`, `sample`, `semantic2img`, `layout2img`, `tile_synth`
(see `ldmtool.pipelines.api`).
"""
from __future__ import annotations

import os as _os

# Intel MKL, which computes PyTorch's fp32 matrix products on the CPU, chooses its blocking, and so the order
# of each product's sums, by the thread count: on an AVX-512 Xeon 23 of 96 UNet-sized products changed with
# it (benchmarks/gemm_threads.py). Its strict reproducibility mode removes that at no measured cost. MKL
# reads the setting at its first call, so it is set here, before any ldmtool code can run one; a value the
# user set is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.1"

_MODEL_API = ("build_model", "load_model")
_ADDON_API = ("load_controlnet",)
_TASK_API = ("superres", "inpaint", "img2img", "txt2img", "sample", "semantic2img", "layout2img", "tile_synth")
__all__ = ["__version__", *_MODEL_API, *_ADDON_API, *_TASK_API]


def __getattr__(name: str):
    if name in _MODEL_API:
        from ldmtool.checkpoints import api

        return getattr(api, name)
    if name in _ADDON_API:
        from ldmtool.addons import controlnet

        return getattr(controlnet, name)
    if name in _TASK_API:
        from ldmtool.pipelines import api as task_api

        return getattr(task_api, name)
    raise AttributeError(f"module 'ldmtool' has no attribute {name!r}")
