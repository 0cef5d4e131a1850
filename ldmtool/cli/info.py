"""`ldmtool info FILE...`: show the generation metadata stored in output images."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ldmtool.cli.options import Json

EXAMPLE = "Example: ldmtool info out/cat.png --json"


def info(
    files: Annotated[list[Path], typer.Argument(help="Images written by ldmtool.", show_default=False)],
    json_out: Json = False,
) -> None:
    """Show the parameters and recipe stored in images written by ldmtool."""
    from ldmtool.io.metadata import print_info

    print_info(files, as_json=json_out)


def register(app: typer.Typer) -> None:
    app.command("info", help=f"{info.__doc__}\n\n{EXAMPLE}")(info)
