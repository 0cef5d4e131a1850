"""`ldmtool gallery DIR`: (re)build an output folder's index.html from its manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldmtool.cli.options import Quiet

EXAMPLE = "Example: ldmtool gallery ~/renders/ --quiet   # e.g. nightly from cron"


def gallery(
    folders: Annotated[list[Path], typer.Argument(help="Output folders written by ldmtool.", show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Rebuild the index.html gallery of output folders from their manifests (runs keep it up to date)."""
    from ldmtool.errors import UsageError
    from ldmtool.io.files import shown
    from ldmtool.io.gallery import build_gallery

    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{shown(folder)}: not a folder")
        page = build_gallery(folder, prune=True)
        if page is None:
            typer.echo(f"{shown(folder)}: no done items in its manifest; no gallery written", err=True)
        elif not quiet:
            typer.echo(f"wrote {shown(page)}")


def register(app: typer.Typer) -> None:
    app.command("gallery", help=f"{gallery.__doc__}\n\n{EXAMPLE}")(gallery)
