"""The tiled engine (DESIGN.md §5): tile plans, latent fusion, exact tiled first stage, seamless mode.

Modules import torch lazily where they can; import the submodules directly:
  planner   plan_tiles, tile_weights, Rect, TilePlan, Weighting
  memory    choose_tiling, parse_memory, free_memory, Tiling, UNetMemory
  fusion    TiledDenoiser, TileConfig
  vae       tiled_decode, tiled_encode, VAETiling
  seamless  seamless, parse_seamless, Seamless
"""
