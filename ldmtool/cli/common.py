"""Helpers every task command uses to go from its option records to a batch run.

A command body typically reads (`run` is the RunOptions that `ldmtool.cli.shared.task_command` built):

    discovery = find_inputs(inputs, recursive=images.recursive)
    finish(run_task(MyTask(...), discovery, run))

Nothing here imports torch; the runner and image I/O are imported when a command runs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from ldmtool.io.discover import Discovery
    from ldmtool.options import RunChoice
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.report import Summary


def find_inputs(
    inputs: list[str],
    *,
    recursive: bool = False,
    pair_masks: bool = False,
    masks_dir: Optional[Path] = None,
) -> "Discovery":
    """Expand files, folders, globs, @lists and '-' into items (with masks when `pair_masks`)."""
    from dataclasses import replace

    from ldmtool.io.discover import discover
    from ldmtool.runtime.workflow import seeds_from_inputs

    found = discover(inputs, recursive=recursive, pair_masks=pair_masks, masks_dir=masks_dir)
    return replace(found, items=seeds_from_inputs(found.items))  # a workflow step's items keep their seeds


def run_options(choice: "RunChoice", cli: Mapping[str, Any]) -> "RunOptions":
    """The runner's RunOptions from the run group; `cli` is every option the command was given (the job's
    identity and its replay recipe)."""
    from ldmtool.errors import UsageError
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.shard import parse_shard
    from ldmtool.runtime.sweep import parse_sweeps

    if choice.overwrite and choice.existing not in (None, "overwrite"):
        raise UsageError(f"--overwrite and --existing {choice.existing} contradict each other; give one")
    return RunOptions(
        output=choice.output, name_template=choice.name, fmt=choice.fmt, suffix=choice.suffix, quality=choice.quality,
        existing="overwrite" if choice.overwrite else (choice.existing or "check"), fail_fast=choice.fail_fast,
        dry_run=choice.dry_run, gallery=not choice.no_gallery,
        batch_size=choice.batch_size, seed=choice.seed, item_seed=choice.item_seed, json_events=choice.json_out,
        quiet=choice.quiet, argv=["ldmtool", *sys.argv[1:]], shard=parse_shard(choice.shard) if choice.shard else None,
        engine=choice.run_engine, ray_address=choice.ray_address,
        max_output_pixels=choice.max_output_pixels, cli=dict(cli),
        sweep=parse_sweeps(choice.sweep or (), {name: value for name, value in cli.items() if name != "sweep"}))


def finish(summary: "Summary") -> NoReturn:
    """End the command with the run's exit code (0 all done or skipped, 1 some items failed)."""
    raise typer.Exit(summary.exit_code)
