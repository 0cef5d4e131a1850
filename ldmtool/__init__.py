"""ldmtool: latent diffusion models over folders of images.

The Python API (`build_model`, `load_model`) is imported lazily so that `import ldmtool` and the CLI's
`--help` stay free of torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "load_model"]


def __getattr__(name: str):
    if name in ("build_model", "load_model"):
        from ldmtool.checkpoints import api

        return getattr(api, name)
    raise AttributeError(f"module 'ldmtool' has no attribute {name!r}")
