"""What `ldmtool models list|inspect|convert` do, as importable functions returning plain data."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

from ldmtool.checkpoints.api import (
    build_checked,
    embedded_config,
    load_model,
    optional_keys,
    other_family,
    resolve_config,
    resolve_source,
    with_shared_first_stage,
)
from ldmtool.checkpoints.config import CONTROL_TARGETS, FIRST_STAGE_TARGETS, ConfigLike, ldmtool_block, load_config
from ldmtool.checkpoints.detect import detect_checkpoint
from ldmtool.checkpoints.files import read_state_dict, save_safetensors
from ldmtool.checkpoints.presets import preset_info, preset_names, shipped_models
from ldmtool.checkpoints.weights import check_state_dict, partial_ema_note, prepare_weights
from ldmtool.errors import CheckpointError, FatalError, UsageError
from ldmtool.io.files import file_in_the_way
from ldmtool.nets.meta import meta_device

COMPONENTS = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "first_stage"),
    ("cond_stage_model.", "cond_stage"),
    ("conditioner.", "cond_stage"),  # sgm (SDXL): text encoders and micro-conditioning
    ("low_scale_model.", "low_scale"),
)
CONFIG_METADATA_KEY = "ldmtool_config"


def list_models() -> dict[str, Any]:
    """Presets (architectures; `shipped` says whether trained weights of that name ship with ldmtool) and the
    shipped default models (weights + config, their task and description)."""
    shipped = []
    for model in shipped_models():
        block = ldmtool_block(load_config(model.config))
        shipped.append({"name": model.name, "task": block.get("task", ""), "description": block.get("description", ""),
                        "weights": str(model.weights), "config": str(model.config)})
    names = {model["name"] for model in shipped}
    presets = []
    for name in preset_names():
        try:
            presets.append({**vars(preset_info(name)), "shipped": name in names})
        except CheckpointError:  # a YAML in presets/ that is not a model config (e.g. a training recipe)
            continue
    return {"presets": presets, "shipped": shipped}


def _component(key: str) -> str:
    for prefix, name in COMPONENTS:
        if key.startswith(prefix):
            return name
    return "first_stage" if key.startswith(("encoder.", "decoder.", "quant", "post_quant")) else "other"


def inspect_checkpoint(path_or_name: str | Path, *, config: Optional[ConfigLike] = None,
                       preset: Optional[str] = None) -> dict[str, Any]:
    """Family (from the config used and from the keys), parameters per component, EMA, dtype, and
    whether the weights match the architecture (checked on the meta device: nothing is materialised)."""
    weights, default_config = resolve_source(path_or_name)
    raw = read_state_dict(weights)
    prepared = prepare_weights(raw, use_ema=True)
    try:
        recipe: Optional[ConfigLike] = embedded_config(weights) or default_config
    except CheckpointError:  # a broken stored config is the report's `problem` (below), not a failure here
        recipe = default_config
    detection = detect_checkpoint({k: tuple(v.shape) for k, v in prepared.state.items()}, recipe)
    report = _weights_summary(weights, raw, prepared, detection)
    try:
        doc, used = resolve_config(weights, config=config, preset=preset,
                                   default_config=embedded_config(weights) or default_config, detection=detection)
    except CheckpointError as err:
        report.update(family=None, config_used=None, matches=False, problem=str(err))
        return report
    family = ldmtool_block(doc).get("family") or "custom"
    shared = ldmtool_block(doc).get("first_stage_weights")
    if shared:
        prepared = with_shared_first_stage(prepared, weights, shared)
        report.update(first_stage_file=str(weights.parent / shared))
    if doc["model"]["target"] in CONTROL_TARGETS:
        report.update(family=family, config_used=used, parameterization=None,
                      parameters={"controlnet": report["parameters_total"]})
        report.update(_match_controlnet(weights))
        return report
    diffusion = doc["model"]["target"] not in FIRST_STAGE_TARGETS
    prediction = (doc["model"].get("params") or {}).get("parameterization", "eps") if diffusion else None
    report.update(family=family, config_used=used, parameterization=prediction)
    report.update(_match(doc, family, prepared, str(weights), detection, used))
    return report


def _weights_summary(weights: Path, raw: dict, prepared, detection) -> dict[str, Any]:
    params: Counter = Counter()
    for key, value in prepared.state.items():
        params[_component(key)] += value.numel()
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in raw.values() if v.is_floating_point())
    return {
        "path": str(weights),
        "detected_family": detection.family if detection else None,
        "detected_alternatives": list(detection.alternatives) if detection else [],
        "ema_present": prepared.ema_present,
        "ema_tensors": prepared.ema_used,
        "ema_missing": len(prepared.ema_missing),
        "ema_note": partial_ema_note(str(weights), prepared.ema_used, prepared.ema_missing),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "tensors": len(raw),
        "parameters": dict(sorted(params.items())),
        "parameters_total": sum(params.values()),
    }


def _match(doc: dict, family: str, prepared, source: str, detection, used: str) -> dict[str, Any]:
    """Strict key/shape check against the architecture built on the meta device."""
    with meta_device():
        bundle = build_checked(doc, family, used)
    model_state = bundle.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    try:
        check_state_dict(expected, bundle.file_state(prepared.state), source=source, family=family,
                         likely=other_family(detection, family), optional=optional_keys(bundle),
                         floating=[k for k, v in model_state.items() if v.is_floating_point()])
    except CheckpointError as err:
        return {"matches": False, "problem": str(err)}
    return {"matches": True, "problem": None}


def _match_controlnet(weights: Path) -> dict[str, Any]:
    """A ControlNet's keys and shapes against the architecture they imply (it runs beside a model, so
    there is no model config to build)."""
    from ldmtool.addons.controlnet import checked_architecture, read_controlnet

    try:
        checked_architecture(weights, read_controlnet(weights))
    except CheckpointError as err:
        return {"matches": False, "problem": str(err)}
    return {"matches": True, "problem": None}


def convert_checkpoint(src: str | Path, dst: str | Path, *, fp16: bool = False, config: Optional[ConfigLike] = None,
                       preset: Optional[str] = None, use_ema: bool = True) -> dict[str, Any]:
    """Write a checkpoint as safetensors in the original key layout (EMA merged when chosen), with its
    config in the file's metadata so it reloads without detection."""
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise UsageError(f"{dst}: the output of 'models convert' must end in .safetensors")
    if not dst.parent.is_dir():
        blocked = file_in_the_way(dst.parent)
        raise UsageError(f"{dst}: cannot write there ({blocked})" if blocked else f"{dst.parent}: output folder does not exist")
    if dst.is_dir():
        raise UsageError(f"{dst}: is a folder; give the output file's name")
    bundle = load_model(src, config=config, preset=preset, dtype=None, use_ema=use_ema)
    state = bundle.state_dict()
    # The latent scale and shift multiply every latent: in fp16 they would change the images (like the schedule).
    keep_fp32 = set(bundle.schedule_values()) | {"scale_factor", "shift_factor"}
    if fp16:
        state = {k: v.half() if v.is_floating_point() and k not in keep_fp32 else v for k, v in state.items()}
    doc = dict(bundle.config)
    metadata = {"format": "pt", "ldmtool_family": str(bundle.family), CONFIG_METADATA_KEY: yaml.safe_dump(doc, sort_keys=False)}
    try:
        save_safetensors(state, dst, metadata)
    except OSError as err:
        raise FatalError(f"{dst}: cannot write ({err.strerror or err})") from err
    info = bundle.load_info
    return {"input": str(info.path), "output": str(dst), "family": bundle.family, "tensors": len(state),
            "ema_used": info.ema_used > 0, "dtype": "float16" if fp16 else info.file_dtype, "config_used": info.config_used,
            "ema_note": partial_ema_note(str(info.path), info.ema_used, info.ema_missing)}
