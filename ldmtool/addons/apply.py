"""The add-ons of one model load: its networks (`--lora` plus a prompt's tags) and `--vae`, applied once to a
freshly loaded bundle, and the part of the model cache's key they make."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Optional

from ldmtool.addons.networks import NetworkSet, apply_networks, run_networks
from ldmtool.errors import CheckpointError

if TYPE_CHECKING:
    from ldmtool.checkpoints.bundle import Bundle
    from ldmtool.options import ModelChoice


@dataclass(frozen=True)
class ModelAddons:
    networks: NetworkSet = ()
    vae: Optional[Path] = None

    @classmethod
    def of(cls, choice: "ModelChoice", extra: NetworkSet = ()) -> "ModelAddons":
        from ldmtool.errors import UsageError

        vae = choice.vae.expanduser() if choice.vae is not None else None
        if vae is not None and not vae.is_file():
            raise UsageError(f"--vae {choice.vae}: no such file")
        for flag, folder in (("--lora-dir", choice.lora_dir), ("--embeddings-dir", choice.embeddings_dir)):
            if folder is not None and not folder.expanduser().is_dir():
                raise UsageError(f"{flag} {folder}: not a folder")
        return cls(run_networks(choice.lora, choice.lora_dir) + tuple(extra), vae)

    def cache_key(self) -> tuple[Hashable, ...]:
        """What the model cache must tell apart: each network's file identity and weight, the VAE's identity."""
        if not self.networks and self.vae is None:
            return ()
        from ldmtool.runtime.cache import FileIdentity

        vae = FileIdentity.of(self.vae) if self.vae is not None else None
        return (tuple(n.identity() for n in self.networks), vae)

    def job_identity(self) -> dict[str, Any]:
        """What a job's identity holds of the add-ons' files: their contents (sha256), so an output made with a
        LoRA or VAE file that has since been replaced under the same name is not taken as this job's."""
        from ldmtool.runtime.cache import file_sha256

        identity: dict[str, Any] = {}
        if self.networks:
            identity["lora_sha256"] = [[file_sha256(n.path), *n.weight_record()] for n in self.networks]
        if self.vae is not None:
            identity["vae_sha256"] = file_sha256(self.vae)
        return identity

    def recorded(self, choice: "ModelChoice") -> dict[str, Any]:
        """What outputs record of the add-ons, under the names A1111 writes them (only those in use)."""
        from ldmtool.addons.networks import lora_hashes
        from ldmtool.runtime.cache import file_sha256

        params: dict[str, Any] = {}
        if choice.clip_skip is not None:
            params["clip_skip"] = choice.clip_skip
        if self.networks:
            params["lora_hashes"] = lora_hashes(self.networks)
        if self.vae is not None:
            params.update(vae=self.vae.name, vae_hash=file_sha256(self.vae)[:10])
        return params

    def apply(self, bundle: "Bundle", *, device: Any = "cpu", dtype: Any = None) -> Any:
        if self.vae is not None:
            from ldmtool.addons.vae import apply_vae

            first = bundle.first_stage
            if first is None:
                add_first_stage(bundle, self.vae, device, dtype)
            else:
                apply_vae(first, self.vae)
        apply_networks(bundle, self.networks)
        return bundle


def add_first_stage(bundle: Any, vae: Path, device: Any, dtype: Any) -> None:
    """A transformer file's missing autoencoder from `--vae` (FLUX.1's ae.safetensors beside flux1-dev.safetensors)."""
    import torch

    from ldmtool.checkpoints.api import load_model

    if not hasattr(bundle, "add_parts"):
        raise CheckpointError(f"--vae {vae}: the model file holds no autoencoder to replace")
    other = load_model(vae, device=device, dtype=dtype or torch.float32)
    if other.first_stage is None:
        raise CheckpointError(f"--vae {vae}: the file holds no autoencoder")
    bundle.add_parts(other)
