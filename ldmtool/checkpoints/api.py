"""The Python API of DESIGN.md §6: `build_model(config)` and `load_model(path_or_name, ...)`.

Loading builds the bundle on the meta device, checks the checkpoint's keys and shapes strictly, then
assigns the (memory-mapped) checkpoint tensors into it, so a large file is not held twice in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional, Union

import torch
from torch import nn

from ldmtool.checkpoints.bundle import PARAMETERIZATIONS, Bundle, LatentDiffusionBundle, build_bundle
from ldmtool.checkpoints.config import CONTROL_TARGETS, ConfigLike, instantiate, ldmtool_block, load_config, model_block
from ldmtool.checkpoints.detect import Detection, detect_checkpoint
from ldmtool.checkpoints.files import header_tensors, read_state_dict
from ldmtool.checkpoints.presets import load_preset, preset_names, shipped_model, shipped_models
from ldmtool.checkpoints.transformer_bundle import TransformerBundle
from ldmtool.checkpoints.weights import PreparedWeights, check_state_dict, prepare_weights
from ldmtool.errors import CheckpointError, LdmError, UsageError
from ldmtool.families.registry import model_info
from ldmtool.io.files import file_kind
from ldmtool.nets._layers import cast_keeping_storage
from ldmtool.nets.meta import meta_device

__all__ = ["LoadInfo", "build_model", "load_model", "resolve_config", "resolve_source"]


@dataclass(frozen=True)
class LoadInfo:
    """Where a loaded bundle came from (kept as `bundle.load_info`)."""

    path: Path
    config_used: str  # "--config FILE", "preset NAME", "FILE.yaml beside the weights", "detected: NAME"
    detection: Optional[Detection]
    ema_present: bool
    ema_used: int
    file_dtype: str
    ema_missing: tuple[str, ...] = ()  # network weights without an EMA copy (kept raw): weights.partial_ema_note


def build_model(config: Union[ConfigLike, str], *, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = None, family: Optional[str] = None) -> Bundle:
    """A bundle with freshly initialised weights from a CompVis config (path, dict, or preset name).
    `device="meta"` builds the architecture without allocating any weight. A ControlNet config (preset
    `controlnet-sd15`, ...) gives the ControlNet network alone, its `state_dict()` the released keys."""
    doc = _config_doc(config)
    if model_block(doc)["target"] in CONTROL_TARGETS:
        return _build_controlnet(doc, device, dtype)  # type: ignore[no-any-return]  # a network, not a bundle
    with _building_on(device):
        bundle = build_checked(doc, family, "config" if isinstance(config, Mapping) else str(config))
    if dtype is not None:
        schedule = _schedule_copies(bundle)
        bundle.to(dtype=dtype)
        _schedule_to_fp32(bundle, schedule)
    bundle.info = model_info(bundle)
    return bundle


def build_checked(doc: dict[str, Any], family: Optional[str], origin: str) -> Bundle:
    """`build_bundle`, with any failure of a network's constructor on the config's values (a negative width,
    zero heads, an empty channel_mult, a params list, an unknown target) reported as that config's error:
    `origin` says where the config came from ('--config FILE', 'X.yaml beside the weights', ...)."""
    try:
        return build_bundle(doc, family)
    except CheckpointError as err:  # 'config for UNetModel: ...' says which config: `origin`
        if str(err).startswith(f"{origin}:"):
            raise
        raise CheckpointError(f"{origin}: {err}") from err
    except LdmError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{origin}: cannot build the model from this config "
                              f"({type(err).__name__}{': ' + first[:200] if first else ''})") from err


def _building_on(device: Union[str, torch.device]) -> ContextManager[Any]:
    """Modules made in the block live on `device`; on the meta device they skip their random initialisation."""
    return meta_device() if torch.device(device).type == "meta" else torch.device(device)


def _build_controlnet(doc: dict[str, Any], device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> Any:
    params = model_block(doc).get("params") or {}
    if not isinstance(params.get("control_stage_config"), Mapping):
        raise CheckpointError("config model.params has no control_stage_config block")
    with _building_on(device):
        net = instantiate(params["control_stage_config"])
    net.config = dict(params["control_stage_config"].get("params") or {})
    return net.to(dtype=dtype) if dtype is not None else net


def load_model(path_or_name: Union[str, Path], *, config: Optional[ConfigLike] = None, preset: Optional[str] = None,
               device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.float32,
               use_ema: bool = True, prediction: Optional[str] = None) -> Bundle:
    """Build and load a checkpoint: a file, or a shipped default name. Architecture from `config`, else
    `preset`, else a YAML beside the weights, else detection from the keys."""
    weights, default_config, raw = _read_source(path_or_name)
    prepared = prepare_weights(raw, use_ema=use_ema)
    detection = detect_checkpoint({k: tuple(v.shape) for k, v in prepared.state.items()}, default_config)
    doc, config_used = resolve_config(weights, config=config, preset=preset, default_config=default_config,
                                      detection=detection)
    family = ldmtool_block(doc).get("family") or "custom"
    prepared = with_shared_first_stage(prepared, weights, ldmtool_block(doc).get("first_stage_weights"))
    with meta_device():
        bundle = build_checked(doc, family, config_used)
    prepared = replace(prepared, state=bundle.file_state(prepared.state))
    _load_into(bundle, prepared, source=str(weights), family=family, detection=detection)
    schedule = _schedule_copies(bundle)  # before the cast: fp16/bf16 would round alphas_cumprod near 1
    # fp8-stored weights stay fp8, and a transformer family's bf16/fp16 ones stay so under fp32 compute: upcast
    # per layer when run
    cast_keeping_storage(bundle, device, dtype, keep_half=isinstance(bundle, TransformerBundle))
    _schedule_to_fp32(bundle, schedule)
    if prediction is not None:
        if prediction not in PARAMETERIZATIONS:
            raise UsageError(f"--prediction {prediction!r} is not one of {', '.join(PARAMETERIZATIONS)}")
        if bundle.parameterization == "flow":  # the networks of FLUX.1 and SD3 predict a flow velocity, nothing else
            raise UsageError(f"--prediction {prediction}: {Path(weights).name} is a flow-matching model; drop --prediction")
        bundle.parameterization = prediction
    bundle.info = model_info(bundle)  # after --prediction, which it records
    bundle.load_info = LoadInfo(weights, config_used, detection, prepared.ema_present, prepared.ema_used,
                                _main_dtype(raw), tuple(prepared.ema_missing))
    return bundle.eval().requires_grad_(False)


def describe_model(path_or_name: Union[str, Path], *, config: Optional[ConfigLike] = None,
                   preset: Optional[str] = None) -> Bundle:
    """The model `load_model` would build, on the meta device and with its `info`, from the config or the
    keys' names and shapes alone: no weight is read (a safetensors file is memory-mapped, so only its header
    is). What a dry run plans with."""
    default_config: Optional[ConfigLike]
    weights, default_config = resolve_source(path_or_name)
    if weights.is_file() and weights.suffix.lower() == ".safetensors":  # its header alone: nothing else is read
        raw = header_tensors(weights)
        default_config = embedded_config(weights) or default_config
    else:
        weights, default_config, raw = _read_source(path_or_name)
    prepared = prepare_weights(raw, use_ema=True)
    detection = detect_checkpoint({k: tuple(v.shape) for k, v in prepared.state.items()}, default_config)
    doc, config_used = resolve_config(weights, config=config, preset=preset, default_config=default_config,
                                      detection=detection)
    with meta_device():
        bundle = build_checked(doc, ldmtool_block(doc).get("family") or "custom", config_used)
    bundle.info = model_info(bundle)
    return bundle


def _read_source(path_or_name: Union[str, Path]) -> tuple[Path, Optional[ConfigLike], dict[str, torch.Tensor]]:
    """(weights, default config, tensors) of a checkpoint file, a shipped name, or a diffusers folder (read
    under the single-file names; the Python API only: commands take files)."""
    from ldmtool.checkpoints.diffusers_folder import is_diffusers_folder, read_diffusers_folder

    folder = Path(path_or_name).expanduser()
    if is_diffusers_folder(folder):
        return folder, None, read_diffusers_folder(folder)
    default_config: Optional[ConfigLike]
    weights, default_config = resolve_source(path_or_name)
    raw = read_state_dict(weights)
    return weights, embedded_config(weights) or default_config, raw


FIRST_STAGE_PREFIX = "first_stage_model."


def with_shared_first_stage(prepared: PreparedWeights, weights: Path, shared: Optional[str]) -> PreparedWeights:
    """Shipped defaults share one first stage: a config's `ldmtool.first_stage_weights` names a file beside
    the weights (autoencoder layout: encoder.*, decoder.*, ...) that supplies the missing
    `first_stage_model.*` weights. Weights the file itself carries win."""
    if not shared or any(k.startswith(FIRST_STAGE_PREFIX) for k in prepared.state):
        return prepared
    path = weights.parent / shared
    if not path.is_file():
        raise CheckpointError(f"{weights}: its config takes the first stage from {shared}, which is not beside it")
    first = {FIRST_STAGE_PREFIX + k: v for k, v in read_state_dict(path).items()}
    return replace(prepared, state={**prepared.state, **first})


def resolve_source(path_or_name: Union[str, Path]) -> tuple[Path, Optional[Path]]:
    """(weights file, its default config or None) for `--model PATH|NAME`."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        beside = path.with_suffix(".yaml")
        return path, beside if beside.is_file() else None
    if path.exists():
        raise UsageError(f"{path}: not a regular file ({file_kind(path.stat().st_mode)})")
    if path.is_symlink():
        raise UsageError(f"{path}: a symbolic link that leads to no file (its target is missing, or links loop)")
    name = str(path_or_name)
    shipped = shipped_model(name)
    if shipped is not None:
        return shipped.weights, shipped.config
    if name in preset_names():
        raise UsageError(f"--model {name}: '{name}' is a preset (architecture only, no weights); "
                         f"give a checkpoint file: --model FILE --preset {name}")
    if path.suffix or "/" in name or "\\" in name:
        raise UsageError(f"{name}: no such checkpoint file")
    names = [m.name for m in shipped_models()]
    raise UsageError(f"--model {name}: not a file, a shipped model ({', '.join(names) or 'none installed'}) "
                     f"or a preset (see 'ldmtool models list')")


def resolve_config(weights: Path, *, config: Optional[ConfigLike], preset: Optional[str],
                   default_config: Optional[ConfigLike], detection: Optional[Detection]) -> tuple[dict[str, Any], str]:
    """The config document to build, and a short note of where it came from."""
    if config is not None and preset is not None:
        raise UsageError(f"--config {config if not isinstance(config, Mapping) else '(dict)'} and --preset {preset}: "
                         f"give one of them (both name the architecture)")
    if config is not None:
        return load_config(config), f"--config {config if not isinstance(config, Mapping) else '(dict)'}"
    if preset is not None:
        return load_preset(preset), f"preset {preset}"
    if isinstance(default_config, Mapping):
        return load_config(default_config), "config stored in the file"
    if default_config is not None:
        return load_config(default_config), f"{Path(default_config).name} beside the weights"
    if detection is None:
        raise CheckpointError(f"{weights}: cannot tell the model family from its keys; pass --config YAML or "
                              f"--preset NAME (see 'ldmtool models list')")
    if detection.config is not None:  # a config-less family: the architecture its shapes record
        return load_config(detection.config), f"detected: {detection.describe()}"
    return load_preset(detection.family), f"detected: {detection.describe()}"


def embedded_config(weights: Path) -> Optional[dict[str, Any]]:
    """The config `ldmtool models convert` stores in a safetensors file's metadata."""
    import yaml

    from ldmtool.checkpoints.files import read_safetensors_metadata

    text = read_safetensors_metadata(weights).get("ldmtool_config")
    if not text:
        return None
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise CheckpointError(f"{weights}: the config stored in this file's metadata is not valid YAML "
                              f"({type(err).__name__}); pass --config or --preset, or convert the file again") from err
    if not isinstance(doc, dict):
        raise CheckpointError(f"{weights}: the config stored in this file's metadata is a {type(doc).__name__}, "
                              f"not a mapping; pass --config or --preset, or convert the file again")
    return doc


def _config_doc(config: Union[ConfigLike, str]) -> dict[str, Any]:
    if isinstance(config, str) and not Path(config).is_file() and config in preset_names():
        return load_preset(config)
    return load_config(config)


UNUSED_BERT_KEYS = ("cond_stage_model.transformer.to_logits.weight", "cond_stage_model.transformer.to_logits.bias")


def optional_keys(bundle: Bundle) -> list[str]:
    """Keys a checkpoint may leave out: schedule buffers (computed from the config), the second copy of
    a shared first/cond stage, OpenCLIP's unused projection and logit scale, and LDM-BERT's unused
    `to_logits` (a vocabulary-sized layer the shipped defaults leave out to save space)."""
    keys = list(bundle.schedule_values())
    if isinstance(bundle, LatentDiffusionBundle) and bundle.cond_stage_model is bundle.first_stage_model:
        keys += [f"cond_stage_model.{k}" for k in bundle.first_stage_model.state_dict()]
    keys += ["cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale", "scale_factor",
             *UNUSED_BERT_KEYS]
    return keys


def _load_into(bundle: Bundle, prepared: PreparedWeights, *, source: str, family: str,
               detection: Optional[Detection]) -> None:
    model_state = bundle.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    state = _without_unused_scale_factor(prepared.state, expected)
    check_state_dict(expected, state, source=source, family=family,
                     likely=other_family(detection, family), optional=optional_keys(bundle),
                     floating=[k for k, v in model_state.items() if v.is_floating_point()])
    bundle.load_state_dict(state, strict=False, assign=True)
    _materialise_leftovers(bundle)


def other_family(detection: Optional[Detection], family: str) -> Optional[str]:
    """What the weights look like, for a mismatch message, when that is not the family being loaded."""
    if detection is None or family in (detection.family, *detection.alternatives):
        return None
    return detection.describe()


def _without_unused_scale_factor(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop a stored `scale_factor` that the model does not take. As in the reference `LatentDiffusion`:
    with `scale_by_std` it is a buffer, so the file's value wins (and it is an expected key); otherwise it
    is a plain attribute from the config, and the reference's non-strict load ignores the file's value."""
    if "scale_factor" in expected or "scale_factor" not in state:
        return state
    return {k: v for k, v in state.items() if k != "scale_factor"}


def _materialise_leftovers(bundle: Bundle) -> None:
    """Give real values to tensors the file did not provide (still on the meta device)."""
    fresh = bundle.schedule_values()
    tensors = list(bundle.named_parameters()) + list(bundle.named_buffers())
    for name, tensor in tensors:
        if not tensor.is_meta:
            continue
        if name in fresh:
            value = fresh[name]
        elif name.endswith("position_ids"):
            value = torch.arange(tensor.shape[-1]).expand(tensor.shape)
        elif name.endswith(("text_projection", "logit_scale")) or name in UNUSED_BERT_KEYS:
            value = torch.zeros(tensor.shape)
        else:
            raise CheckpointError(f"internal: {name} was not loaded and has no default value")
        _set_tensor(bundle, name, value, isinstance(tensor, nn.Parameter))


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if is_param:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _schedule_copies(bundle: Bundle) -> dict[str, torch.Tensor]:
    """float32 copies of the schedule buffers as loaded (taken before a half-precision cast)."""
    names = set(bundle.schedule_values())
    return {name: buf.float().clone() for name, buf in bundle.named_buffers() if name in names and buf.is_floating_point()}


def _schedule_to_fp32(bundle: Bundle, saved: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Samplers read the schedule; keep it float32 whatever the network precision (from `saved`, the values
    before the cast, when given: a cast to fp16/bf16 and back loses the small 1 - alphas_cumprod)."""
    names = set(bundle.schedule_values())
    for name, buf in list(bundle.named_buffers()):
        if name in names and buf.is_floating_point() and buf.dtype != torch.float32:
            value = saved[name] if saved and name in saved else buf
            _set_tensor(bundle, name, value.to(device=buf.device, dtype=torch.float32), False)


def _main_dtype(raw: Mapping[str, torch.Tensor]) -> str:
    counts = Counter(str(v.dtype).replace("torch.", "") for v in raw.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else "none"
