"""ControlNets in a run (`--controlnet FILE[:S]`, `--control-image`, `--control-start/--control-end`,
`--control-mode`): parsed and checked once, loaded through the model cache beside the model, and turned
into per-item hints (a file for every item, or a folder of hints named like the inputs) that `Engine.sample`
hands to the network with the conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ldmtool.errors import ItemError, LdmError, UsageError
from ldmtool.io.images import IMAGE_SUFFIXES, header_size, read_image

if TYPE_CHECKING:
    import torch

    from ldmtool.addons.controlnet import ActiveControl
    from ldmtool.options import ControlInputs
    from ldmtool.pipelines.engine import Engine
    from ldmtool.runtime.jobs import Job

MODES = ("balanced", "control")
INPAINT = "inpaint"  # `--control-image inpaint`: the hint made from an inpaint item's input and mask


@dataclass(frozen=True)
class ControlUnit:
    """One `--controlnet FILE[:S]` with its `--control-image`."""

    path: Path
    strength: float
    image: Optional[Path]  # None: the item's own (upscaled) input is the hint (ControlNet tile), or with
    from_mask: bool = False  # its input with the pixels to repaint set to -1 (ControlNet inpaint)


def parse_unit(spec: str) -> tuple[Path, float]:
    """FILE or FILE:S, FILE also the name of a shipped ControlNet such as default-canny (a file whose own
    name holds a colon is taken whole)."""
    from ldmtool.checkpoints.presets import controlnet_file
    from ldmtool.pipelines.prompt_syntax import finite_number

    path = controlnet_file(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and path is None:
        try:
            strength = finite_number(tail)
        except ValueError as err:
            raise UsageError(f"--controlnet {spec}: the strength after ':' {err}") from None
        path = controlnet_file(head)
    else:
        strength = 1.0
    if path is None:
        raise UsageError(f"--controlnet {spec}: no such file or shipped ControlNet")
    return path, strength


class ControlRun:
    """The run's ControlNets: `validate()` before anything loads, `open(engine)` once the model is open,
    `hints(key, size)` per item."""

    def __init__(self, choice: "ControlInputs", *, input_hint: bool = False):
        self.choice = choice
        self.input_hint = input_hint  # img2img --scale: a ControlNet without --control-image reads the upscaled input
        self.mask_hint = False  # inpaint: `--control-image inpaint` makes the hint from the input and its mask
        self.matches_inputs = True  # hints in a folder are found by their inputs' names (txt2img has none)
        self.start = 0.0 if choice.control_start is None else choice.control_start
        self.end = 1.0 if choice.control_end is None else choice.control_end
        self.mode = choice.control_mode or "balanced"
        self.units: list[ControlUnit] = []
        self.adapters: list[ControlUnit] = []  # --adapter: T2I-Adapters, their hints after the ControlNets'
        self.notes: list[str] = []  # things said once per run (hint resized)

    def __bool__(self) -> bool:
        return bool(self.choice.controlnet or self.choice.adapter)

    def validate(self) -> None:
        c = self.choice
        images = [Path(p) for p in c.control_image or []]  # replay hands recorded paths back as strings
        specs = [*(c.controlnet or []), *(c.adapter or [])]
        if not specs:
            given = [name for name, value in (("--control-image", images), ("--control-start", c.control_start),
                                              ("--control-end", c.control_end), ("--control-mode", c.control_mode))
                     if value]
            if given:
                raise UsageError(f"{given[0]} goes with --controlnet FILE")
            return
        if len(images) not in (0 if self.input_hint else 1, 1, len(specs)):
            raise UsageError(f"--control-image: give one, or one per --controlnet and --adapter ({len(specs)})")
        if self.mode not in MODES:
            raise UsageError(f"--control-mode {self.mode!r}: choose balanced or control")
        if self.start >= self.end:
            raise UsageError(f"--control-start {self.start} must be below --control-end {self.end}")
        units = []
        for index, spec in enumerate(specs):
            path, strength = parse_unit(spec)
            image = (images[index] if len(images) > 1 else images[0]).expanduser() if images else None
            if image is None and not self.input_hint:
                raise UsageError(f"--controlnet {spec}: give its hint with --control-image PATH")
            if image is not None and str(image) == INPAINT:
                if not self.mask_hint:
                    raise UsageError("--control-image inpaint: the hint made from the input and its mask is for "
                                     "inpaint (a file or folder named inpaint: give its full path)")
                units.append(ControlUnit(path, strength, None, from_mask=True))
                continue
            if image is not None:
                self._check_hint_path(image)
            units.append(ControlUnit(path, strength, image))
        count = len(c.controlnet or [])
        self.units, self.adapters = units[:count], units[count:]
        for index, (spec, unit) in enumerate(zip(specs, units)):
            if unit.strength < 0:  # diffusers takes a negative conditioning scale too: allowed, but said
                flag = "--controlnet" if index < count else "--adapter"
                note = f"{flag} {spec}: a negative strength subtracts its residuals (pushes away from the hint; 0 turns it off)"
                self.notes += [] if note in self.notes else [note]

    def _check_hint_path(self, image: Path) -> None:
        """UsageError for a hint every item would fail on: none there, a folder without inputs to match
        (txt2img), a file that is not an image."""
        if not image.exists():
            raise UsageError(f"--control-image {image}: no such file or folder")
        if image.is_dir():
            if not self.matches_inputs:
                raise UsageError(f"--control-image {image}: a folder of hints needs input files to match by "
                                 "name; give one hint file")
            return
        if header_size(image) is None:  # read it to say why
            try:
                read_image(image)
            except LdmError as err:
                raise UsageError(f"--control-image {err}") from None

    def open(self, engine: "Engine") -> list["ActiveControl"]:
        """The ControlNets on the model's device and dtype (once per process, through the model cache),
        their attention heads those of the model's UNet."""
        from ldmtool.addons.controlnet import ActiveControl, base_heads, check_fits, load_controlnet
        from ldmtool.runtime.cache import model_cache

        device, dtype = engine.placement()
        heads = base_heads(engine.bundle)
        nets = []
        for unit in self.units:
            def loader(path: Path = unit.path) -> Any:
                return load_controlnet(path, heads=heads, device=device, dtype=dtype)

            net = model_cache().load_file(unit.path, device, dtype, loader, "controlnet", tuple(sorted(heads.items())))
            check_fits(net, engine.bundle, str(unit.path))
            nets.append(ActiveControl(net, unit.strength, lambda t: True, net.config["hint_channels"],
                                      soft=self.mode == "control"))
        return nets

    def hint_file(self, unit: ControlUnit, key: Optional[str]) -> Path:
        """The unit's hint for an item: its file, or the file in its folder named like the item's input."""
        if unit.image is None:
            raise ValueError("this ControlNet's hint is the item's input (ControlRun.input_hint)")
        if not unit.image.is_dir():
            return unit.image
        if key is None:
            raise ItemError(f"--control-image {unit.image}: a folder of hints needs input files to match by name")
        found = [p for p in sorted(unit.image.iterdir()) if p.stem == key and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ItemError(f"--control-image {unit.image}: no hint named {key}.* for this input")
        return found[0]

    def hint_files(self, key: Optional[str]) -> list[Path]:
        """Each ControlNet's, then each T2I-Adapter's hint file for an item (hints made from the mask have none)."""
        return [self.hint_file(u, key) for u in (*self.units, *self.adapters) if not u.from_mask]

    def open_adapters(self, engine: "Engine") -> list[tuple[Any, float]]:
        """The T2I-Adapters (through the model cache) and their weights."""
        from ldmtool.addons.t2i_adapter import load_adapter
        from ldmtool.runtime.cache import model_cache

        device, dtype = engine.placement()
        loaded = []
        for unit in self.adapters:
            def loader(path: Path = unit.path) -> Any:
                return load_adapter(path, device=device, dtype=dtype)

            loaded.append((model_cache().load_file(unit.path, device, dtype, loader, "t2i-adapter"), unit.strength))
        return loaded

    def hints(self, key: Optional[str], size: tuple[int, int],
              masked: Optional[tuple[np.ndarray, np.ndarray]] = None) -> list[tuple[Path, np.ndarray]]:
        """Each unit's hint file and its pixels (H, W, 3) float32 in [0, 1] at `size` (width, height); a hint
        made from the mask is `preprocess.inpaint_hint` of `masked`, the item's (image in [0, 1], repaint mask)."""
        from ldmtool.pipelines.preprocess import inpaint_hint

        rows = []
        for unit in (*self.units, *self.adapters):
            if unit.from_mask:
                assert masked is not None, "ControlRun.mask_hint is set by tasks that hand their masks over"
                rows.append((Path(INPAINT), inpaint_hint(*masked)))
            else:
                path = self.hint_file(unit, key)
                rows.append((path, self._pixels(path, size)))
        return rows

    def scaled_hints(self, key: Optional[str], pixels: np.ndarray) -> list[tuple[Path, np.ndarray]]:
        """The hints of an upscale by diffusion of `pixels` (uint8 (H, W, 3); img2img --scale, txt2img --hires):
        each unit's hint file resized to the upscaled size (as A1111's hires pass; not said, the upscale is the
        point), or, for a unit without one, the upscaled image itself (ControlNet tile)."""
        size = (pixels.shape[1], pixels.shape[0])
        own = (Path("input"), pixels.astype(np.float32) / 255)
        files = [None if u.image is None else self.hint_file(u, key) for u in (*self.units, *self.adapters)]
        return [own if path is None else (path, self._pixels(path, size, say=False)) for path in files]

    def given_hint_files(self, key: Optional[str]) -> list[Path]:
        """The hint files of the units that have one (with --scale, the others read the input)."""
        return [self.hint_file(u, key) for u in (*self.units, *self.adapters) if u.image is not None]

    def _pixels(self, path: Path, size: tuple[int, int], say: bool = True) -> np.ndarray:
        rgb = read_image(path).rgb
        if (rgb.shape[1], rgb.shape[0]) == size:
            return rgb
        from PIL import Image

        note = f"control hint {path.name} is {rgb.shape[1]}x{rgb.shape[0]}; resized to {size[0]}x{size[1]}"
        if say and note not in self.notes:
            self.notes.append(note)
        image = Image.fromarray((rgb * 255 + 0.5).clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image).astype(np.float32) / 255

    def batch(self, keys: Sequence[Optional[str]], size: tuple[int, int], multiple: int, warn: Any,
              masked: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None) -> Optional[list["torch.Tensor"]]:
        """Each ControlNet's hints for a batch of items (keys: their inputs' stems) of one size, padded to
        `multiple` as their images are; `warn(topic, message)` says a resize once. None without ControlNets.
        `masked`: each item's (image, repaint mask), for hints made from the mask (inpaint)."""
        if not self:
            return None
        rows = [self.hints(key, size, None if masked is None else masked[i]) for i, key in enumerate(keys)]
        for note in self.notes:
            warn(note, note)
        return hint_batch(rows, multiple)

    def recorded(self) -> dict[str, Any]:
        """What every output records: each ControlNet (name, hash, strength), which take their hint from the
        mask, the window and the mode."""
        from ldmtool.runtime.cache import file_sha256

        if not self:
            return {}
        adapters = {} if not self.adapters else {
            "adapter": [f"{u.path.name}:{u.strength}" for u in self.adapters],
            "adapter_hashes": [file_sha256(u.path)[:10] for u in self.adapters]}
        from_mask = [u.path.name for u in (*self.units, *self.adapters) if u.from_mask]
        return {"controlnet": [f"{u.path.name}:{u.strength}" for u in self.units],
                "controlnet_hashes": [file_sha256(u.path)[:10] for u in self.units], **adapters,
                **({"control_hint_from_mask": from_mask} if from_mask else {}),
                "control_start": self.start, "control_end": self.end, "control_mode": self.mode}

    def job_identity(self) -> dict[str, Any]:
        """The ControlNet files' and single hint files' contents (a folder's hints join each item's record)."""
        from ldmtool.runtime.cache import file_sha256

        if not self:
            return {}
        if not (self.units or self.adapters):  # the runner asks before it validates the run
            self.validate()
        units = [*self.units, *self.adapters]
        return {"controlnet_sha256": [[file_sha256(u.path), u.strength] for u in self.units],
                **({"adapter_sha256": [[file_sha256(u.path), u.strength] for u in self.adapters]} if self.adapters else {}),
                "control_image_sha256": [self._hint_identity(u, None) for u in units]}

    def item_identity(self, key: Optional[str]) -> dict[str, Any]:
        """An item's `control_image_sha256` with its hints' contents in place of their folders' paths, so a hint
        redone in a folder is another job ({} without hint folders: the run's identity holds it all)."""
        units = [*self.units, *self.adapters]
        if not any(u.image is not None and u.image.is_dir() for u in units):
            return {}
        return {"control_image_sha256": [self._hint_identity(u, key) for u in units]}

    def _hint_identity(self, unit: ControlUnit, key: Optional[str]) -> str:
        """A hint file's sha256; a folder's path when no item (or no hint in it) is named; `inpaint` for a hint
        made from the mask."""
        from ldmtool.runtime.cache import file_sha256

        if unit.from_mask:
            return INPAINT
        if unit.image is None or (unit.image.is_dir() and key is None):
            return str(unit.image)
        try:
            return file_sha256(self.hint_file(unit, key))
        except (ItemError, OSError):  # no hint for this input: the item fails when it loads
            return str(unit.image)


def hint_key(job: "Job") -> Optional[str]:
    """The name an item's hint is found by in a folder of hints: its input's stem (None for an image given in
    memory through the Python API, whose hints are single images)."""
    return None if job.item.path is None else job.item.path.stem


def hint_params(files: Sequence[Path]) -> dict[str, Any]:
    """An item's record of its hints: file names and content hashes (so `replay` can check them)."""
    from ldmtool.runtime.cache import file_sha256

    return {"control_images": [p.name for p in files], "control_image_hashes": [file_sha256(p)[:10] for p in files]}


def hint_batch(rows: Sequence[Sequence[tuple[Path, np.ndarray]]], multiple: int = 1) -> list["torch.Tensor"]:
    """Per ControlNet, the hints of a batch's items as (B, 3, H, W) float32 in [0, 1], edges replicated up to
    `multiple` (as the images they go with are padded)."""
    import torch
    import torch.nn.functional as F

    batches = []
    for k in range(len(rows[0])):
        batch = torch.stack([torch.from_numpy(np.ascontiguousarray(row[k][1])).permute(2, 0, 1) for row in rows])
        pad_h, pad_w = (-batch.shape[-2]) % multiple, (-batch.shape[-1]) % multiple
        batches.append(F.pad(batch, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else batch)
    return batches

