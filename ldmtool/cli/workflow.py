"""`ldmtool run WORKFLOW.yaml [INPUTS...]`: several commands in one process, each step's outputs the next
step's inputs, over one model cache (see `ldmtool/runtime/workflow.py` for the file format)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ldmtool.cli.options import Json, Quiet

EXAMPLE = "Example: ldmtool run examples/workflows/hires.yaml -o out/ --seed 7"
STEPS_FOLDER = "steps"
MANIFEST = "workflow.jsonl"


def run(
    workflow: Annotated[Path, typer.Argument(help="The workflow file (YAML: a list of steps).", show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Argument(help="The first step's inputs (files, folders, globs).",
                                                         show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the last step's outputs; the steps "
                                         "before it write to OUTPUT/steps/NN-COMMAND/.")] = Path("workflow-out"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="Every step's seed (later steps take each item's "
                                                "seed from its input).")] = None,
    keep_steps: Annotated[bool, typer.Option("--keep-steps/--remove-steps", help="Keep the intermediate "
                                             "outputs (needed to resume without redoing steps, and to replay "
                                             "the last step).")] = True,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a workflow: steps of ldmtool commands chained in one process, resumable per step and item."""
    from ldmtool.cli.app import task_commands
    from ldmtool.runtime.cache import model_cache
    from ldmtool.runtime.workflow import read_workflow

    steps = read_workflow(workflow, task_commands())
    folders = [output / STEPS_FOLDER / f"{number:02d}-{step.command}" for number, step in enumerate(steps, 1)]
    folders[-1] = output
    cache, current, code, records = model_cache(), list(inputs or []), 0, []
    for number, (step, folder) in enumerate(zip(steps, folders), 1):
        loads, hits = len(cache.loads), cache.hits
        argv = [step.command, *current, *step.argv(workflow.parent), "-o", str(folder)]
        if seed is not None and "seed" not in step.options:
            argv += ["--seed", str(seed)]
        argv += ["--json"] if json_out else ["--quiet"] if quiet else []
        if number < len(steps):
            argv.append("--no-gallery")  # a step folder is the next step's input, not something to browse
        step_code = _run_step(argv, chained=number > 1)
        record = {"event": "workflow_step", "step": number, "command": step.command, "output": str(folder),
                  "exit_code": step_code, "models_loaded": cache.loaded_files(since=loads),
                  "cache_hits": cache.hits - hits}
        records.append(record)
        _note(record, output, json_out=json_out, quiet=quiet)
        code = max(code, step_code)
        if step_code not in (0, 1):  # 1: some items failed, the rest go on; anything else stops the chain
            break
        current = [str(folder)]
    if code == 0 and not keep_steps:
        shutil.rmtree(output / STEPS_FOLDER, ignore_errors=True)
    if json_out:
        print(json.dumps({"event": "summary", "workflow": str(workflow), "steps": len(records), "exit_code": code}),
              flush=True)
    raise typer.Exit(code)


def _run_step(argv: list[str], *, chained: bool) -> int:
    """One step as its command line in this process (its own errors are one line on stderr): the exit code."""
    from ldmtool.cli.app import main
    from ldmtool.runtime.workflow import StepContext, running_step

    with running_step(StepContext(chained=chained)):
        try:
            main(argv)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1
    return 0


def _note(record: dict[str, Any], output: Path, *, json_out: bool, quiet: bool) -> None:
    """The step's record: a line in OUTPUT/workflow.jsonl, a JSON event (--json) or a line on stderr."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / MANIFEST, "a", encoding="utf-8") as manifest:
        manifest.write(json.dumps(record) + "\n")
    if json_out:
        print(json.dumps(record), flush=True)
    elif not quiet:
        loaded = ", ".join(Path(path).name for path in record["models_loaded"]) or "none (cache)"
        print(f"ldmtool: step {record['step']} {record['command']}: exit {record['exit_code']}, models loaded: "
              f"{loaded}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("run", help=f"{run.__doc__}\n\n{EXAMPLE}")(run)
