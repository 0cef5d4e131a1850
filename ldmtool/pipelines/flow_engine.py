"""`Engine`'s side of the flow-matching families (FLUX.1, SD3 / SD3.5): their text encoders, schedule and network
call, chosen by the family entry's `FlowRecipe` (`families/flux_flow.py`, `families/sd3_flow.py`).

A `FlowRun` is made once per run when the model loads: it finds the text encoders (those an SD3 single file holds,
a diffusers folder's `text_encoder*/`, `--text-encoder` files) and T5's tokenizer, and names in one line every part
a run still needs. Sampling builds the family's schedule (`diffusion.flow.FlowTimes`), wraps the network in a
`FlowDenoiser` (classifier-free guidance where the family takes it; the tiled engine outside, as for every model)
and runs `sample_flow_latents`. Every row's `Cond.position` holds the (row, column) of each latent pixel in the
canvas, so a tile knows where it sits (its crop's top-left entry) and takes its global position there.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.flow import FlowDenoiser, FlowTimes, check_flow_sampler, flow_schedule, sample_flow_latents
from ldmtool.diffusion.run import SamplerSettings
from ldmtool.diffusion.samplers import check_options
from ldmtool.errors import FatalError, UsageError
from ldmtool.families.base import FlowRecipe
from ldmtool.families.info import Parameterization
from ldmtool.nets.text3 import encoder_kinds
from ldmtool.runtime.seeds import NoiseSource

if TYPE_CHECKING:
    from ldmtool.nets.text3 import TextEncoders
    from ldmtool.pipelines.engine import Engine

Sources = list[tuple[str, Mapping[str, torch.Tensor]]]
GUIDANCE = 3.5  # FLUX.1 dev's reference guidance value, when the model's preset names none


def flow_run(engine: "Engine") -> Optional["FlowRun"]:
    """The flow side of an engine whose model is a flow-matching transformer of a family with a recipe, else None."""
    from ldmtool.families.registry import family_named

    info = engine.info
    family = family_named(info.entry)
    if info.parameterization is not Parameterization.FLOW or engine.bundle.denoiser is None or family is None \
            or family.flow is None:
        return None
    return FlowRun(engine, family.flow())


class FlowRun:
    def __init__(self, engine: "Engine", recipe: FlowRecipe):
        self.recipe = recipe
        self.sources = _encoder_sources(engine, recipe)
        kinds = set(encoder_kinds(self.sources))
        self.tokenizer = _t5_tokenizer(engine, recipe) if "t5xxl" in kinds else None
        self._check_parts(engine, kinds)
        self._check_options(engine)

    # -- once per run

    def _check_parts(self, engine: "Engine", kinds: set[str]) -> None:
        """One line naming everything a run still needs and how to give it (FatalError: nothing can run)."""
        from ldmtool.nets.clip_text import ENCODER_NAMES

        missing = [] if engine.bundle.first_stage is not None else ["its autoencoder (pass --vae FILE, e.g. ae.safetensors)"]
        missing += [f"the {ENCODER_NAMES[kind]} text encoder (pass --text-encoder FILE)"
                    for kind in self.recipe.required_encoders if kind not in kinds]
        if "t5xxl" in kinds and self.tokenizer is None:
            missing.append("T5's tokenizer.json (pass --tokenizer DIR)")
        if missing:
            raise FatalError(f"{engine.model_path}: a run of this {self.recipe.name} model needs {', '.join(missing)}")

    def _check_options(self, engine: "Engine") -> None:
        s, name, bundle = engine.sampling, self.recipe.name, engine.bundle
        if s.cfg is not None and s.cfg != 1.0 and not self.recipe.takes_cfg:
            hint = "; it takes --guidance instead" if self.recipe.takes_guidance(bundle) else ""
            raise UsageError(f"--cfg {s.cfg}: {name} has no unconditional input, so classifier-free guidance cannot "
                             f"run; drop --cfg{hint}")
        if s.guidance is not None and not self.recipe.takes_guidance(bundle):
            raise UsageError(f"--guidance {s.guidance}: this {name} model takes no guidance input (only guidance-"
                             "distilled models such as FLUX.1 dev do); drop --guidance")
        for flag, value in (("--karras/--no-karras", s.karras), ("--spacing", s.spacing)):
            if value is not None:
                raise UsageError(f"{flag}: a flow-matching model samples on its own schedule (its time shift); drop it")
        if s.seamless and s.tile == 0:
            raise UsageError(f"--seamless with --tile 0: a {name} model wraps around only through tiles that cross "
                             "the edge; drop --tile 0")
        patch = patch_size(engine)
        if s.tile_overlap is not None and s.tile_overlap % patch:
            raise UsageError(f"--tile-overlap {s.tile_overlap}: this model's tiles must start on its {patch}x{patch} "
                             f"patches; give a multiple of {patch}")
        if engine.control:
            raise UsageError(f"--controlnet/--adapter: ControlNets and T2I-Adapters do not run with {name} models yet")

    def check_schedule(self, engine: "Engine") -> None:
        p = engine.resolved()
        check_flow_sampler(p["sampler"])
        check_options(p["sampler"], eta=p["eta"], tcd_gamma=p.get("tcd_gamma"))
        flow_schedule(p["steps"], FlowTimes())

    def resolved(self, engine: "Engine", values: dict[str, Any]) -> dict[str, Any]:
        """The engine's resolved values for a flow model: no Karras or spacing (the time shift decides), the
        guidance input where the network takes one, and the shift (a resolution-dependent one per item)."""
        out = {k: v for k, v in values.items() if k not in ("karras", "spacing")}
        bundle = engine.bundle
        if self.recipe.takes_guidance(bundle):
            out["guidance"] = self.guidance(engine)
        times = self.recipe.times(bundle, (64, 64))
        shift = {"flow_shift": "resolution"} if times.shift.mu is not None else times.shift.recorded()
        return {**out, "parameterization": "flow", **shift, "flow_spacing": times.spacing.value}

    def item_recorded(self, engine: "Engine", latent_hw: tuple[int, int]) -> dict[str, Any]:
        """What an item records of its schedule that depends on its size (the resolution shift's mu)."""
        times = self.recipe.times(engine.bundle, latent_hw)
        return {} if times.shift.mu is None else times.shift.recorded()

    def guidance(self, engine: "Engine") -> Optional[float]:
        if not self.recipe.takes_guidance(engine.bundle):
            return None
        given = engine.sampling.guidance
        default = engine.info.defaults.guidance
        return given if given is not None else default if default is not None else GUIDANCE

    def texts(self, engine: "Engine", *, concat: bool = False) -> "FlowTexts":
        """The run's text conditioning; UsageError for a model that needs image inputs besides (`concat`: the task
        gives them, as inpaint gives FLUX.1 Fill its masked image and mask)."""
        if engine.info.concat_channels and not concat:
            raise UsageError(f"{engine.model_path}: the {engine.info.family} model takes a masked image and its mask "
                             "beside the prompt, so it runs with inpaint only")
        return FlowTexts(self, engine)

    # -- sampling

    def sample(self, engine: "Engine", latent_hw: tuple[int, int], seeds: Sequence[int], cond: Cond,
               uncond: Optional[Cond], *, init_latent: Optional[torch.Tensor] = None, strength: float = 1.0,
               repaint: Optional[torch.Tensor] = None, progress: Optional[Callable[[int, int], None]] = None,
               noise: Optional[NoiseSource] = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w) as `Engine.sample` gives them, on the family's flow schedule."""
        p = engine.resolved()
        settings = SamplerSettings(sampler=p["sampler"], steps=p["steps"], eta=p["eta"], strength=strength,
                                   temperature=p["temperature"])
        guided = uncond is not None and p["cfg"] != 1.0
        device, dtype = engine.placement()
        call = self.recipe.network(engine.bundle, latent_hw, p.get("guidance"), dtype)
        patch = patch_size(engine)  # --tile-overlap is a multiple of it (checked when the run opens)
        # Tiles start on whole patches (a tile's positions are its top-left patch's); with --seamless, tiles cross
        # the wrap edge, each counting its positions on past it.
        denoise = engine.denoiser_around(FlowDenoiser(call), latent_hw, 2 if guided else 1, guided, patch=patch,
                                         align=patch, wrap_by_tiles=bool(engine.axes))
        placed = positions(latent_hw, len(seeds), device)
        cond = replace(cond, position=placed)
        conditioning: Any = Guided(cond, replace(uncond, position=placed), p["cfg"]) if guided and uncond else cond
        callback = None if progress is None else (lambda step: progress(step.index + 1, step.total))
        shape = None if init_latent is not None else (engine.info.latent_channels, *latent_hw)
        if init_latent is not None:
            init_latent = init_latent.to(device, torch.float32)
        times = self.recipe.times(engine.bundle, latent_hw)
        with torch.inference_mode():
            return sample_flow_latents(denoise, conditioning, noise or NoiseSource(seeds), settings, times, shape=shape,
                                       init_latent=init_latent, repaint=repaint, callback=callback, device=device,
                                       dtype=torch.float32)


def patch_size(engine: "Engine") -> int:
    """The side of the network's patches in latent pixels (2 for FLUX.1 and SD3)."""
    return engine.info.pixel_multiple // engine.info.downsampling


def positions(latent_hw: tuple[int, int], batch: int, device: Any) -> torch.Tensor:
    """(B, 2, h, w): each latent pixel's row and column in the canvas."""
    rows, cols = torch.meshgrid(torch.arange(latent_hw[0]), torch.arange(latent_hw[1]), indexing="ij")
    return torch.stack([rows, cols]).float()[None].expand(batch, -1, -1, -1).to(device)


class FlowTexts:
    """The text conditioning of a flow model's run, each (text, role) encoded once (the most recent `keep` kept);
    the encoders open when a batch has texts not encoded yet, and T5 (the largest by far) is freed after them."""

    def __init__(self, run: FlowRun, engine: "Engine", keep: int = 512):
        self.run, self.engine, self.keep = run, engine, keep
        self.clip_skip = engine.choice.clip_skip
        self._encoders: Optional["TextEncoders"] = None
        self._encoded: OrderedDict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encoded = 0  # texts that went through the encoders (tests check the caching)

    def conds(self, engine: "Engine", prompts: Sequence[str], negatives: Sequence[str],
              image_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        """(cond, uncond) on the engine's device (uncond None for a family without classifier-free guidance)."""
        wanted = [(text, False) for text in prompts]
        if self.run.recipe.takes_cfg:
            wanted += [(text, True) for text in negatives]
        self._encode_missing(wanted)
        cond = self._cond(engine, [(text, False) for text in prompts])
        uncond = self._cond(engine, [(text, True) for text in negatives]) if self.run.recipe.takes_cfg else None
        return cond, uncond

    @property
    def t5_open(self) -> bool:
        """Whether T5 is in memory (only while a batch's new texts are encoded)."""
        return self._encoders is not None and self._encoders.t5 is not None

    def chunk_count(self, *texts: str) -> int:
        return 1  # T5 and CLIP are padded to fixed lengths: every prompt of a batch shares one shape

    def ti_hashes(self, *texts: str) -> Optional[str]:
        return None

    def _cond(self, engine: "Engine", keys: Sequence[tuple[str, bool]]) -> Cond:
        tokens = torch.cat([self._encoded[key][0] for key in keys])
        pooled = torch.cat([self._encoded[key][1] for key in keys])
        return Cond(crossattn=tokens.to(engine.device, torch.float32), y=pooled.to(engine.device, torch.float32))

    def _encode_missing(self, keys: Sequence[tuple[str, bool]]) -> None:
        missing = [key for key in dict.fromkeys(keys) if key not in self._encoded]
        for key in keys:
            if key in self._encoded:
                self._encoded.move_to_end(key)
        if not missing:
            return
        encoders = self._open()
        recipe, bundle = self.run.recipe, self.engine.bundle
        with torch.inference_mode():
            for negative in (False, True):
                texts = [text for text, role in missing if role == negative]
                if texts:
                    tokens, pooled = recipe.encode(bundle, encoders, texts, negative=negative, clip_skip=self.clip_skip)
                    for i, text in enumerate(texts):
                        self._encoded[(text, negative)] = (tokens[i:i + 1].float().cpu(), pooled[i:i + 1].float().cpu())
        self.encoded += len(missing)
        encoders.t5 = None  # freed after each batch's prompts; opened again for the next new ones
        while len(self._encoded) > self.keep:
            self._encoded.popitem(last=False)

    def _open(self) -> "TextEncoders":
        from ldmtool.nets.text3 import open_text_encoders

        run, engine = self.run, self.engine
        device, _ = engine.placement()
        if self._encoders is None or (self._encoders.t5 is None and run.tokenizer is not None):
            self._encoders = open_text_encoders(run.sources, t5_tokenizer=run.tokenizer,
                                                t5_padding=run.recipe.t5_padding(engine.bundle), device=device)
        return self._encoders


def _encoder_sources(engine: "Engine", recipe: FlowRecipe) -> Sources:
    """(name, state) of every text encoder source: the model file's own (an SD3 single file's `text_encoders.*`), a
    diffusers model folder's encoder subfolders, and the `--text-encoder` files and folders."""
    from ldmtool.checkpoints.files import read_state_dict
    from ldmtool.nets.t5 import t5_folder_state
    from ldmtool.nets.text3 import text_encoder_sources
    from ldmtool.runtime.cache import FileIdentity
    from ldmtool.runtime.watch import note_loaded

    path: Path = engine.model_path
    sources: Sources = []
    held = getattr(engine.bundle, "left_out_keys", ())
    given = [Path(p).expanduser() for p in engine.choice.text_encoder or ()]
    # read (mapped) when the first prompt is encoded: the run must still have the model file it loaded, and
    # these must not change under it (runtime/watch.py)
    note_loaded(*(FileIdentity.of(p) for p in ([path] if held else []) + given if p.is_file()))
    if held and path.is_file():
        state = read_state_dict(path)
        sources.append((path.name, {key: state[key] for key in held if key in state}))
    if path.is_dir():
        sources += [(str(path / sub), t5_folder_state(path / sub)) for sub in recipe.encoder_folders
                    if (path / sub).is_dir()]
    return sources + [(name, state) for name, state in text_encoder_sources(given)]


def _t5_tokenizer(engine: "Engine", recipe: FlowRecipe) -> Optional[Path]:
    """T5's tokenizer.json from --tokenizer, else the diffusers model folder's; None when neither has one."""
    from ldmtool.nets.t5 import find_t5_tokenizer

    given = None if engine.choice.tokenizer is None else Path(engine.choice.tokenizer)
    folder = engine.model_path if engine.model_path.is_dir() else None
    if given is None and (folder is None or not (folder / recipe.t5_tokenizer_folder).is_dir()):
        return None
    return find_t5_tokenizer(given.expanduser() if given is not None else None, folder, recipe.t5_tokenizer_folder)
