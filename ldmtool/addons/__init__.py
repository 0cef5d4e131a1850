"""Add-ons: files a Stable Diffusion user brings besides the checkpoint (LoRA and LyCORIS networks,
textual-inversion embeddings, a separate VAE). Each file format is one entry in `addons/registry.py`;
pipelines only ask the registry for "the networks of this run" or "the embeddings in this folder"."""
