"""What a model task's run needs, for the run plan (runtime/plan.py): peak memory and about how long.

Peak memory of the largest item: the weights (the file's size until the model is open, then its tensors;
a `--refiner`'s too, which stays loaded beside the model) and, with the model as its safetensors header
describes it until it is open (`described`: a dry run plans as the run does),
the latent canvas and the sampler's copies of it, the network's working memory for one tile call (the tile
the engine will choose, `choose_tiling`), and the full-size image buffers the pipeline keeps
(`output_bytes`). It is compared with what the device holding it has available (host RAM, with what this
process holds already; a GPU's free memory for the device part).

Time, once the model is open: one network call on the run's tile (after a warm-up call on a small one; a
large network's on a small tile, scaled by area) and one first-stage decode of a small latent are timed, then
multiplied by steps, tiles, passes and items. A run that is short by construction (little latent work in all) is not probed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ldmtool.nets.attention import AttentionBlock, SpatialTransformer
from ldmtool.pipelines.engine import method
from ldmtool.runtime.allocator import release_host_memory
from ldmtool.runtime.plan import Demand, Size, available_host_memory, output_bytes, resident_bytes
from ldmtool.tiling.memory import UNetMemory, choose_tiling, parse_memory

if TYPE_CHECKING:
    from ldmtool.pipelines.base import ModelTask
    from ldmtool.pipelines.engine import Engine

LATENT_COPIES = 10  # latent-sized float32 tensors alive while sampling: x, noise, denoised, fusion sums, history
SHORT_WORK = 50 * 2 * 64 * 64  # latent pixels x network calls below which a run is not probed (one 512² image)
PROBE_SIDE = 32  # latent pixels: the side of the probe tile of large networks (warm-up and decode: half)
PROBE_SECONDS = 0.3  # the longest a probe call on the run's own tile may take
CONTEXT_TOKENS = 77


def model_demand(task: "ModelTask", sizes: Mapping[Size, int], batch_size: int) -> Demand:
    """Peak memory (and, with the model open, seconds) of running items of `sizes` through `task`."""
    engine = task.engine
    opened = hasattr(engine, "bundle")
    model = engine if opened else described(engine)  # before it opens: as its file's header describes it
    largest = max(sizes, key=lambda s: s[0] * s[1])
    down = model.info.downsampling if model is not None else 8
    channels = model.info.latent_channels if model is not None else 4
    latents = task.planned_latents(largest, down)
    latent_area = max(h * w for h, w in latents)
    weights = _weights_bytes(engine) if opened else _file_bytes(task.model_file())
    refiner = _refiner_bytes(task)
    largest_latent = max(latents, key=lambda hw: hw[0] * hw[1])
    copies = task.latent_copies(largest_latent) if opened else None
    latent = latent_area * channels * 4 * (LATENT_COPIES if copies is None else copies) * batch_size
    working = _working_bytes(model, largest_latent, batch_size) if model is not None else 0
    images = output_bytes(sizes, batch_size)
    host_available = available_host_memory() + resident_bytes()
    device = model.device if model is not None and model.device is not None else torch.device("cpu")
    seconds = _seconds(task, sizes, down) if opened else None
    if device.type == "cuda":
        on_device = weights + refiner + latent + working
        free, _total = torch.cuda.mem_get_info(device)
        device_available = int(free) + int(torch.cuda.memory_allocated(device))
        if images <= host_available:
            return Demand(on_device, device_available, seconds, str(device),
                          {"weights": weights, "refiner": refiner, "latents": latent, "working": working})
        return Demand(images, host_available, seconds, "host", {"images": images})
    parts = {"weights": weights, "refiner": refiner, "latents": latent, "working": working, "images": images}
    return Demand(sum(parts.values()), host_available, seconds, device.type, parts)


@dataclass(frozen=True)
class Described:
    """What the plan reads of an open engine, for a model not loaded: described from its file on the meta
    device (`checkpoints.api.describe_model`), with the device and precision the engine will choose."""

    info: Any
    bundle: Any
    device: torch.device
    dtype: torch.dtype
    sampling: Any
    axes: Any


def described(engine: "Engine") -> Optional[Described]:
    """The engine's model as its safetensors file describes it (its config, else its keys' names and shapes;
    no weight is read), so a plan made before it loads (a dry run, a run's first check) counts its latent
    channels, tiles and working memory as the open model's does. None where only loading can tell: a pickle
    .ckpt is read whole, and a file that cannot be described fails where it loads. Add-ons (--vae, LoRAs)
    are not applied: they change no size the plan counts."""
    from ldmtool.runtime.device import choose_device, resolve_precision

    choice = engine.choice
    try:
        bundle = described_bundle(choice)
        if bundle is None:
            return None
        device = choose_device(choice.device)
        dtype = resolve_precision(choice.precision, device).dtype
    except Exception:  # describing must never stop the run: loading says what is wrong with the file
        return None
    return Described(bundle.info, bundle, device, dtype, engine.sampling, engine.axes)


_DESCRIBED: dict[tuple[Any, ...], Any] = {}  # a run describes its model for its identity and its plan: once


def described_bundle(choice: Any) -> Any:
    """The model `choice` names, as its safetensors header describes it (`checkpoints.api.describe_model`: on
    the meta device, no weight read), remembered for the file as it is now; None for a file only loading can
    describe (a pickle .ckpt is read whole). Errors propagate: callers decide."""
    from ldmtool.checkpoints.api import describe_model, resolve_source

    weights, beside = resolve_source(choice.model)
    if weights.suffix.lower() != ".safetensors":
        return None
    key = (*_stamp(weights), *_stamp(beside), *_stamp(choice.config), choice.preset)
    if key not in _DESCRIBED:
        if len(_DESCRIBED) >= 8:
            _DESCRIBED.clear()
        _DESCRIBED[key] = describe_model(choice.model, config=choice.config, preset=choice.preset)
    return _DESCRIBED[key]


def _stamp(path: Any) -> tuple[Any, ...]:
    """What tells one version of a file from another (None, or a config given as a mapping: itself, as text)."""
    try:
        file = Path(path)
        info = file.stat()
    except (OSError, TypeError):
        return (str(path),)
    return str(file.resolve()), info.st_ino, info.st_size, info.st_mtime_ns


def _file_bytes(path: Optional[Path]) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _weights_bytes(engine: "Engine") -> int:
    bundle = engine.bundle
    return sum(t.numel() * t.element_size() for t in [*bundle.parameters(), *bundle.buffers()])


def _refiner_bytes(task: "ModelTask") -> int:
    """The weights of the task's `--refiner` (0 without one): its tensors once open, else its file's size."""
    refiner = getattr(task, "refiner", None)
    if refiner is None:
        return 0
    if hasattr(refiner, "bundle"):
        return _weights_bytes(refiner)
    from ldmtool.checkpoints.api import resolve_source

    return _file_bytes(resolve_source(refiner.choice.model)[0])


def _rows(task: "ModelTask", engine: "Engine") -> int:
    """Batch rows one item puts through the network: 2 with classifier-free guidance."""
    has_uncond = getattr(task, "has_uncond", None)
    guided = engine.resolved()["cfg"] not in (None, 1.0) and (has_uncond is None or has_uncond())
    return 2 if guided else 1


def _tiling(engine: "Engine | Described", latent_hw: tuple[int, int], rows: int) -> tuple[tuple[int, int], int, int]:
    """(tile (h, w), tiles per step, tiles per call) the engine will use for a latent of this size."""
    s = engine.sampling
    budget = parse_memory(s.max_memory) if s.max_memory else None
    tiling = choose_tiling(latent_hw, native_tile=engine.info.defaults.tile, items=rows, tile=s.tile,
                           overlap=s.tile_overlap, budget=budget, wrap=(engine.axes.y, engine.axes.x))
    if tiling is None:
        return latent_hw, 1, 1
    (th, tw), overlap = tiling.tile, tiling.overlap
    count = 1
    for side, size in ((latent_hw[0], th), (latent_hw[1], tw)):
        count *= 1 if side <= size else -(-(side - overlap) // (size - overlap))
    return (th, tw), count, tiling.tile_batch


def _working_bytes(engine: "Engine | Described", latent_hw: tuple[int, int], batch_size: int) -> int:
    """The network's activations for one call on the run's tile (`UNetMemory`, with this network's width)."""
    assert engine.dtype is not None, "the engine is open"
    rows = 2
    tile, _count, per_call = _tiling(engine, latent_hw, rows)
    net = engine.bundle.denoiser
    memory = UNetMemory(channels=int(getattr(net, "model_channels", 320)), dtype_bytes=torch.finfo(engine.dtype).bits // 8,
                        materialised_attention=net is None or _full_resolution_attention(net))
    return memory.bytes_for(tile[0] * tile[1], rows * per_call * batch_size)


def _full_resolution_attention(net: torch.nn.Module) -> bool:
    """Whether the network attends at the latent's full resolution (where attention memory is quadratic)."""
    blocks = getattr(net, "input_blocks", None)
    if blocks is None or len(blocks) < 2:
        return True
    return any(isinstance(m, (SpatialTransformer, AttentionBlock)) for m in blocks[1].modules())


def _seconds(task: "ModelTask", sizes: Mapping[Size, int], down: int) -> Optional[float]:
    """Seconds for every item of `sizes`, from a measured probe; None when the run is short by construction."""
    engine = task.engine
    steps = int(engine.resolved()["steps"] * getattr(task, "strength", 1.0) + 0.5) or 1
    rows = _rows(task, engine)
    work = []  # (items, latent (h, w)) per sampling pass
    for size, count in sizes.items():
        work += [(count, hw) for hw in task.planned_latents(size, down)]
    if sum(count * steps * rows * h * w for count, (h, w) in work) <= SHORT_WORK:
        return None
    tilings = [(count, hw, _tiling(engine, hw, rows)) for count, hw in work]
    largest = max((tiling[0] for _, _, tiling in tilings), key=lambda t: t[0] * t[1])
    try:
        probe = _probe(engine, rows, largest)
    except Exception:  # a probe that cannot run must never stop the run: no estimate
        return None
    finally:
        release_host_memory()  # the probe's freed activations, which the run's own peak would otherwise add to
    total = 0.0
    for count, hw, (tile, tiles, _per_call) in tilings:
        call = probe.call * tile[0] * tile[1] / (largest[0] * largest[1])
        total += count * (steps * tiles * call + probe.decode * hw[0] * hw[1])
    return total


@dataclass(frozen=True)
class Probe:
    """Measured costs: seconds of one network call on the run's largest tile, and per latent pixel decoded."""

    call: float
    decode: float


def _probe(engine: "Engine", rows: int, tile: tuple[int, int]) -> Probe:
    """One network call on the run's tile, timed after a warm-up call of the same shape; where a call on a
    small tile says the run's tile would take over `PROBE_SECONDS`, a call on a `PROBE_SIDE` tile scaled
    by area instead (large networks: their time grows with the pixels). One small decode, timed likewise."""
    bundle = engine.bundle
    device, dtype = engine.placement()
    net = bundle.denoiser
    if net is None:
        raise ValueError("the model has no denoising network")
    network: Callable[..., torch.Tensor] = net
    channels, kwargs = _in_channels(net), _dummy_conditioning(net, rows, device, dtype)
    t = torch.full((rows,), 500, device=device, dtype=torch.long)
    decode = method(bundle.first_stage, "decode")
    small, area = PROBE_SIDE // 2, tile[0] * tile[1]

    def call(hw: tuple[int, int]) -> float:
        x = torch.zeros(rows, channels, *hw, device=device, dtype=dtype)
        return _timed(lambda: network(x, t, **kwargs), device)

    with torch.inference_mode():
        call((small, small))  # the first call's set-up (packed weights)
        warm = call((small, small))
        probe = tile if warm * area / (small * small) <= PROBE_SECONDS else (PROBE_SIDE, PROBE_SIDE)
        call(probe)  # a new shape sets up its kernels
        seconds = call(probe) * area / (probe[0] * probe[1])
        z = torch.zeros(1, engine.info.latent_channels, small, small, device=device, dtype=dtype)
        decode(z)  # warm-up
        decoded = _timed(lambda: decode(z), device)
    return Probe(seconds, decoded / (small * small))


def _timed(run: Any, device: torch.device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _in_channels(net: torch.nn.Module) -> int:
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            return int(module.in_channels)
    raise ValueError("no convolution in the network")


def _dummy_conditioning(net: torch.nn.Module, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Zero conditioning of the shapes the network takes (cross-attention context, class label or vector)."""
    kwargs: dict[str, Any] = {}
    for name, module in net.named_modules():
        if name.endswith("attn2"):
            context_dim = module.to_k.in_features
            kwargs["context"] = torch.zeros(rows, CONTEXT_TOKENS, context_dim, device=device, dtype=dtype)
            break
    classes = getattr(net, "num_classes", None)
    if isinstance(classes, int):
        kwargs["y"] = torch.zeros(rows, dtype=torch.long, device=device)
    elif classes is not None:
        first = next(m for m in net.get_submodule("label_emb").modules() if isinstance(m, torch.nn.Linear))
        kwargs["y"] = torch.zeros(rows, first.in_features, device=device, dtype=dtype)
    return kwargs
