"""`ldmtool models list|inspect|convert`: presets, shipped models, and checkpoint files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ldmtool.cli.options import Config, Json, NoEma, Preset

LIST_EXAMPLE = "Example: ldmtool models list --json"
INSPECT_EXAMPLE = "Example: ldmtool models inspect sd-v1-5.ckpt --json"
CONVERT_EXAMPLE = "Example: ldmtool models convert sd-v1-5.ckpt sd-v1-5.safetensors --fp16"

models_app = typer.Typer(help="List presets and shipped models; inspect and convert checkpoints.", no_args_is_help=True)

Checkpoint = Annotated[str, typer.Argument(help="Checkpoint file (.safetensors, .ckpt, .pt, .pth) or shipped model name.", show_default=False)]
Fp16 = Annotated[bool, typer.Option("--fp16", help="Store network weights as float16 (schedule buffers stay float32).")]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def list_command(json_out: Json = False) -> None:
    """List the architecture presets and the default models shipped with ldmtool."""
    from ldmtool.checkpoints.tools import list_models

    data = list_models()
    if json_out:
        _print_json(data)
        return
    presets = [p for p in data["presets"] if not p["shipped"]]
    width = max(len(entry["name"]) for entry in presets + data["shipped"])
    typer.echo("Shipped models (trained, with weights; use with --model NAME):")
    for m in data["shipped"] or [{"name": "(none installed)", "task": "", "description": ""}]:
        typer.echo(f"  {m['name']:<{width}}  {m['task']:<12}  {m['description']}")
    typer.echo("Presets (architecture only, no weights; use with --model FILE --preset NAME):")
    for p in presets:
        typer.echo(f"  {p['name']:<{width}}  {p['task']:<12}  {p['description']}")


def inspect_command(checkpoint: Checkpoint, config: Config = None, preset: Preset = None, json_out: Json = False) -> None:
    """Show a checkpoint's family, parameters per component, EMA, dtype and the config used (exit 3 when the
    weights would not load with that config)."""
    from ldmtool.checkpoints.tools import inspect_checkpoint

    report = inspect_checkpoint(checkpoint, config=config, preset=preset)
    if json_out:
        _print_json(report)
    else:
        _print_report(report)
    if not report["matches"]:  # the file would not load as described (models convert and every command refuse it)
        raise typer.Exit(3)


def _print_report(report: dict[str, Any]) -> None:
    alt = report["detected_alternatives"]
    lines = [
        f"file:            {report['path']}",
        f"family:          {report['family'] or 'unknown'}",
        f"detected:        {report['detected_family'] or 'unknown'}" + (f" (or {', '.join(alt)})" if alt else ""),
        f"config used:     {report['config_used'] or '-'}",
        f"prediction:      {report.get('parameterization') or '-'}",
        f"dtype:           {report['dtype']}",
        f"EMA weights:     {_ema(report)}",
        f"tensors:         {report['tensors']}",
        f"parameters:      {report['parameters_total']:,}",
    ]
    lines += [f"  {name + ':':<15}{count:,}" for name, count in report["parameters"].items()]
    lines.append(f"matches config:  {'yes' if report['matches'] else 'no'}")
    if report["problem"]:
        lines.append(f"problem:         {report['problem']}")
    typer.echo("\n".join(lines))


def _ema(report: dict[str, Any]) -> str:
    if not report["ema_present"]:
        return "no"
    used, missing = report["ema_tensors"], report["ema_missing"]
    return f"yes, for only {used} of {used + missing} network weights (the rest raw)" if missing else "yes"


def convert_command(
    src: Checkpoint,
    dst: Annotated[Path, typer.Argument(help="Output .safetensors file.", show_default=False)],
    fp16: Fp16 = False,
    config: Config = None,
    preset: Preset = None,
    no_ema: NoEma = False,
    json_out: Json = False,
) -> None:
    """Convert a checkpoint to safetensors in the original key layout (EMA weights merged unless --no-ema)."""
    from ldmtool.checkpoints.tools import convert_checkpoint

    result = convert_checkpoint(src, dst, fp16=fp16, config=config, preset=preset, use_ema=not no_ema)
    if result["ema_note"]:
        typer.echo(f"ldmtool: warning: {result['ema_note']}", err=True)
    if json_out:
        _print_json(result)
    else:
        typer.echo(f"wrote {result['output']} ({result['family']}, {result['tensors']} tensors, {result['dtype']}"
                   f"{', EMA merged' if result['ema_used'] else ''})")


def register(app: typer.Typer) -> None:
    models_app.command("list", help=f"{list_command.__doc__}\n\n{LIST_EXAMPLE}")(list_command)
    models_app.command("inspect", help=f"{inspect_command.__doc__}\n\n{INSPECT_EXAMPLE}")(inspect_command)
    models_app.command("convert", help=f"{convert_command.__doc__}\n\n{CONVERT_EXAMPLE}")(convert_command)
    app.add_typer(models_app, name="models", help=f"{models_app.info.help}\n\n{LIST_EXAMPLE}")
