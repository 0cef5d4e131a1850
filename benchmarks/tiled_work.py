"""Tiled vs untiled work (issue 5), as JSON lines.

1. `unet_work`: latent pixels the network processes per denoiser call with the default tiling
   (`choose_tiling`, 64-pixel native tile, default overlap), over untiled pixels of the same canvas.
   Exact accounting through `TiledDenoiser.pixels_run`; no network is run. Target: <= 1.3.
2. `unet_time`: measured seconds per denoiser call, tiled (default settings) vs untiled, with a small
   UNet (SD layout, narrow channels) on the same canvas.
3. `vae_work`: multiply-accumulates of the convolutions in an exact tiled decode/encode over the untiled
   ones, for the SD-size KL autoencoder (counted on the meta device, so any machine gives the same
   numbers), per checkpoint store budget: the cost of exact global GroupNorm statistics.
4. `vae_time`: exact tiled decode vs untiled decode of a narrow f8 KL decoder (SD layout), for several
   checkpoint store budgets: the price of exact global GroupNorm statistics, and the max abs difference.

    python benchmarks/tiled_work.py            # everything (a few minutes on 2 CPU cores)
    python benchmarks/tiled_work.py --quick    # work accounting and small timings only
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.memory import choose_tiling
from ldmtool.tiling.vae import VAETiling, tiled_decode, tiled_encode


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} cpu x{torch.get_num_threads()}"


def emit(**record) -> None:
    print(json.dumps({"machine": machine(), **record}), flush=True)


def tiled(inner, latent_hw, native=64):
    tiling = choose_tiling(latent_hw, native_tile=native)
    if tiling is None:
        return None, None
    config = TileConfig(tile=tiling.tile, overlap=tiling.overlap, tile_batch=1)
    return TiledDenoiser(inner, config), tiling


def unet_work(sizes) -> None:
    for side in sizes:
        denoiser, tiling = tiled(lambda x, sigma, cond: x, (side, side))
        if denoiser is None:
            emit(bench="unet_work", latent=side, ratio=1.0, tiles=1)
            continue
        denoiser(torch.zeros(1, 1, side, side), torch.ones(1))
        emit(bench="unet_work", latent=side, image=side * 8, tile=list(tiling.tile), overlap=tiling.overlap,
             tiles=denoiser.tiles_run, ratio=round(denoiser.pixels_run / side**2, 4), target=1.3)


def small_unet():
    from ldmtool.nets.unet import UNetModel

    unet = UNetModel(image_size=64, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                     channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], num_heads=4,
                     use_spatial_transformer=True, context_dim=64, legacy=False)
    return unet.eval()


def unet_time(sizes, repeat: int) -> None:
    unet = small_unet()
    context = torch.zeros(1, 8, 64)

    def inner(x, sigma, cond):
        return unet(x, sigma * 100, context=context.expand(x.shape[0], -1, -1))

    for side in sizes:
        x, sigma = torch.randn(1, 4, side, side), torch.ones(1)
        denoiser, tiling = tiled(inner, (side, side))
        with torch.no_grad():
            untiled_s, tiled_s = interleaved_times(lambda: inner(x, sigma, None), lambda: denoiser(x, sigma, None), repeat)
        emit(bench="unet_time", latent=side, untiled_s=round(untiled_s, 4), tiled_s=round(tiled_s, 4),
             ratio=round(tiled_s / untiled_s, 3), tile=list(tiling.tile) if tiling else None, repeat=repeat)


def interleaved_times(first, second, repeat: int) -> tuple[float, float]:
    """Best-of-`repeat` times of two functions, alternated so that load from other processes hits both alike."""
    first(), second()
    times = ([], [])
    for _ in range(repeat):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def conv_macs(model):
    """A counter of conv multiply-accumulates, and the hook handles that feed it."""
    count = [0]

    def hook(module, args, out):
        count[0] += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]

    return count, [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def vae_work(sides, budgets) -> None:
    from ldmtool.nets.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "x"}, embed_dim=4).eval()
    count, _handles = conv_macs(vae)
    for side in sides:
        z = torch.empty(1, 4, side, side, device="meta", dtype=torch.float16)
        x = torch.empty(1, 3, side * 8, side * 8, device="meta", dtype=torch.float16)
        for name, untiled, tiled_fn, tile in (("decode", lambda: vae.decode(z.float()), tiled_decode, 64),
                                              ("encode", lambda: vae.encode(x.float()), tiled_encode, 512)):
            count[0] = 0
            untiled()
            base = count[0]
            for budget in budgets:
                count[0] = 0
                source = z if name == "decode" else x
                tiled_fn(vae, source.float(), VAETiling(tile=tile, store_bytes=budget, store_device="meta"))
                emit(bench="vae_work", op=name, model="sd-kl-f8 (ch 128, fp32)", image=side * 8, tile_latent=64,
                     store_mib=budget >> 20, ratio=round(count[0] / base, 2))


def small_vae():
    from ldmtool.nets.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    return AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "x"}, embed_dim=4).eval()


def vae_time(side: int, tile: int, budgets) -> None:
    vae = small_vae()
    z = torch.randn(1, 4, side, side)
    with torch.no_grad():
        start = time.perf_counter()
        expected = vae.decode(z)
        untiled_s = time.perf_counter() - start
        for budget in budgets:
            start = time.perf_counter()
            got = tiled_decode(vae, z, VAETiling(tile=tile, store_bytes=budget))
            tiled_s = time.perf_counter() - start
            emit(bench="vae_time", latent=side, image=side * 8, tile=tile, store_mib=budget / 2**20,
                 untiled_s=round(untiled_s, 3), tiled_s=round(tiled_s, 3), ratio=round(tiled_s / untiled_s, 2),
                 max_abs_diff=float((got - expected).abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    unet_work([96, 128, 192, 256, 384, 512, 768, 1024])
    if args.quick:
        vae_work([128], [0, 2**30])
        unet_time([128], repeat=2)
        vae_time(32, 16, [0, 2**30])
        return
    vae_work([128, 256, 512], [0, 2**30, 4 * 2**30])
    unet_time([128, 256], repeat=3)
    vae_time(64, 16, [0, 64 * 2**20, 2**30])


if __name__ == "__main__":
    main()
