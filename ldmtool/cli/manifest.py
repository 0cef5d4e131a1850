"""`ldmtool manifest merge DIR`: combine the manifest parts that `--shard K/N` runs wrote."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ldmtool.cli.options import Json

manifest_app = typer.Typer(no_args_is_help=True, help="Work with run manifests.\n\nExample: ldmtool manifest merge out/")

EXAMPLE = "Example: ldmtool manifest merge out/ --json"


@manifest_app.command("merge", help=f"Merge the shard manifests in an output folder and report what is missing or failed.\n\n{EXAMPLE}")
def merge(
    folder: Annotated[Path, typer.Argument(help="The output folder the shards wrote to.", show_default=False)],
    json_out: Json = False,
) -> None:
    from ldmtool.runtime.shard import merge_manifests

    report = merge_manifests(folder)
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(f"merged {report.parts} of {report.shard_count} shard manifests: {report.done} done, "
                   f"{len(report.failed)} failed, {len(report.missing)} missing")
        for index in report.missing_shards:
            typer.echo(f"shard {index}/{report.shard_count}: never started (no membership file)", err=True)
        if report.missing_shard_count > len(report.missing_shards):
            typer.echo(f"... and {report.missing_shard_count - len(report.missing_shards)} more shards never started",
                       err=True)
        if report.skipped:
            typer.echo(f"skipped {report.skipped} unreadable manifest lines or membership files", err=True)
        for key in report.failed:
            typer.echo(f"failed: {key}", err=True)
        for key in report.missing:
            typer.echo(f"missing: {key}", err=True)
    raise typer.Exit(0 if report.complete else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(manifest_app, name="manifest")
