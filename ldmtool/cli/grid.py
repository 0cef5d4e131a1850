"""`ldmtool grid DIR -o sheet.png`: draw a folder of outputs as a labelled X/Y/Z contact sheet."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldmtool.cli.options import Quiet

EXAMPLE = "Example: ldmtool grid out/ -o sheet.png --x steps --y cfg"


def grid(
    folder: Annotated[Path, typer.Argument(help="A folder of images written by ldmtool.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The sheet; its extension picks the format "
                                         "(.png, .jpg, .webp or .tif; none: .png is added). A third axis writes one "
                                         "sheet per value, sheet-VALUE.png.")] = Path("sheet.png"),
    x: Annotated[Optional[str], typer.Option("--x", help="Parameter across (default: the sweep's, else what "
                                             "varies).", metavar="NAME")] = None,
    y: Annotated[Optional[str], typer.Option("--y", help="Parameter down.", metavar="NAME")] = None,
    z: Annotated[Optional[str], typer.Option("--z", help="Parameter of separate sheets.", metavar="NAME")] = None,
    cell: Annotated[int, typer.Option("--cell", help="Largest side of each thumbnail, in pixels.", min=16)] = 256,
    quiet: Quiet = False,
) -> None:
    """Draw the images in a folder as a labelled grid, with axes from the parameters their recipes record."""
    from ldmtool.io.contact_sheet import draw_grid
    from ldmtool.io.files import shown

    result = draw_grid(folder, output, x=x, y=y, z=z, cell=cell)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if not quiet:
        axes = " x ".join(name or "-" for name in result.axes) or "no varying parameter"
        for sheet in result.sheets:
            typer.echo(f"wrote {shown(sheet.path)} ({sheet.columns}x{sheet.rows} cells; {axes})")


def register(app: typer.Typer) -> None:
    app.command("grid", help=f"{grid.__doc__}\n\n{EXAMPLE}")(grid)
