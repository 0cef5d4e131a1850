"""Helpers every task command uses to go from the shared CLI options to a batch run.

A command body typically reads:

    discovery = find_inputs(inputs, recursive=recursive)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet)
    finish(run_task(MyTask(...), discovery, options))

Nothing here imports torch; the runner and image I/O are imported when a command runs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from ldmtool.cli.options import RUN

if TYPE_CHECKING:
    from ldmtool.io.discover import Discovery
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.report import Summary


# Mask and input-size options for the commands that take masks (inpaint) or many images.
MasksDir = Annotated[
    Optional[Path],
    typer.Option("--masks", help="Folder of masks named like the images (else x_mask.png beside x.png).",
                 rich_help_panel=RUN),
]
InvertMask = Annotated[
    bool, typer.Option("--invert-mask", help="Swap the mask meaning: black = repaint.", rich_help_panel=RUN)
]
MaskFromAlpha = Annotated[
    bool, typer.Option("--mask-from-alpha", help="Repaint the transparent pixels of each image.", rich_help_panel=RUN)
]
MaxPixels = Annotated[
    Optional[int],
    typer.Option("--max-pixels", min=1, help="Refuse input images above this many pixels (default 8192x8192).",
                 rich_help_panel=RUN),
]


def find_inputs(
    inputs: list[str],
    *,
    recursive: bool = False,
    pair_masks: bool = False,
    masks_dir: Optional[Path] = None,
) -> "Discovery":
    """Expand files, folders, globs, @lists and '-' into items (with masks when `pair_masks`)."""
    from ldmtool.io.discover import discover

    return discover(inputs, recursive=recursive, pair_masks=pair_masks, masks_dir=masks_dir)


def run_options(
    *,
    output: Optional[Path] = None,
    name: str = "{stem}.{ext}",
    fmt: Optional[str] = None,
    quality: int = 95,
    overwrite: bool = False,
    existing: Optional[str] = None,
    fail_fast: bool = False,
    batch_size: int = 1,
    seed: Optional[int] = None,
    item_seed: Optional[int] = None,
    json_out: bool = False,
    quiet: bool = False,
    shard: Optional[str] = None,
    engine: str = "local",
    ray_address: Optional[str] = None,
    cli: Optional[dict[str, Any]] = None,
) -> "RunOptions":
    """RunOptions from the shared option values (names as in `ldmtool.cli.options`); `cli` is every option
    the command was given (the job's identity and its replay recipe)."""
    from ldmtool.errors import UsageError
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.shard import parse_shard

    if overwrite and existing not in (None, "overwrite"):
        raise UsageError(f"--overwrite and --existing {existing} contradict each other; give one")
    return RunOptions(output=output, name_template=name, fmt=fmt, quality=quality,
                      existing="overwrite" if overwrite else (existing or "check"), fail_fast=fail_fast,
                      batch_size=batch_size, seed=seed, item_seed=item_seed, json_events=json_out, quiet=quiet,
                      argv=["ldmtool", *sys.argv[1:]], shard=parse_shard(shard) if shard else None,
                      engine=engine, ray_address=ray_address, cli=dict(cli or {}))


def finish(summary: "Summary") -> NoReturn:
    """End the command with the run's exit code (0 all done or skipped, 1 some items failed)."""
    raise typer.Exit(summary.exit_code)
