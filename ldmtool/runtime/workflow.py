"""Workflows (`ldmtool run WORKFLOW.yaml`): a list of steps, each an existing command with its options, run in
one process over one model cache, each step's outputs the next step's inputs.

A workflow file is YAML (read with `yaml.safe_load`): a list of steps, or a mapping with `steps:`. Each step
is a one-key mapping, the command and its options under the names the command line uses (`strength: 0.4`,
`hires-strength` or `hires_strength`; `true` gives a flag, `false` its `--no-` form, a list repeats it):

    steps:
      - txt2img: {prompts: prompts.txt, n: 2}
      - img2img: {scale: 2, strength: 0.4, prompt: "a red circle"}
      - superres: {scale: 2}

Options that name files or folders (`prompts`, `palette`, `lora`, `control-image`, ...) are taken beside
the workflow file when the file is there, else as given.

Every step is an ordinary run of its command, so resume is the command's own: per item, checked against
each output's recipe. A killed workflow run again skips the items every step already wrote and finishes the
rest with the same pixels. Inside a step after the first, each item takes the seed recorded in its input
file (the seed flows through the chain), an img2img step given no `prompt` takes each input's recorded
prompt and negative (per-item prompts flow through the chain), and its outputs' recipes hold the recipe
of their input (`upstream`), so a final output records the whole chain.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

from ldmtool.errors import UsageError

# Options the workflow itself supplies to every step (inputs, where outputs go, reporting).
RESERVED = frozenset({"inputs", "output", "o", "json", "quiet", "item-seed", "dry-run", "sweep", "help"})


@dataclass(frozen=True)
class Step:
    """One step: a command and its options as command-line flags (name without dashes → value)."""

    command: str
    options: dict[str, Any]

    def argv(self, folder: Path, path_options: frozenset[str]) -> list[str]:
        """The step's options as command-line arguments; the values of `path_options` (options that name files
        or folders, each item of a list too) are taken beside the workflow file, in `folder`, when they name
        something there."""
        args: list[str] = []
        for name, value in self.options.items():
            if value is None:
                continue
            if value is True:
                args.append(f"--{name}")
            elif value is False:
                args.append(f"--no-{name}")
            else:
                for one in value if isinstance(value, list) else [value]:
                    if name in path_options and isinstance(one, str):
                        one = beside(folder, one)
                    args += [f"--{name}", str(one)]
        return args


def beside(folder: Path, value: str) -> str:
    """`value` as a path in `folder` when that exists (also the FILE of a `FILE:WEIGHT`), else unchanged (a
    model name, a file found from the current folder)."""
    if value and (folder / value).exists():
        return str(folder / value)
    path, colon, weight = value.rpartition(":")
    if colon and path and (folder / path).exists():
        return f"{folder / path}:{weight}"
    return value


def read_workflow(path: Path, commands: set[str]) -> list[Step]:
    """The steps of a workflow file; UsageError naming the file (and step) for anything malformed."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{path}: cannot read the workflow ({err.strerror or err})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(err).split())[:120]})") from None
    steps = document.get("steps") if isinstance(document, dict) else document
    if not isinstance(steps, list) or not steps:
        raise UsageError(f"{path}: a workflow is a list of steps (or a mapping with 'steps:'), "
                         "e.g. '- txt2img: {prompt: a fox}'")
    return [_step(path, number, entry, commands) for number, entry in enumerate(steps, 1)]


def _step(path: Path, number: int, entry: Any, commands: set[str]) -> Step:
    where = f"{path}: step {number}"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise UsageError(f"{where}: each step is one command with its options, e.g. '- img2img: {{strength: 0.4}}'")
    ((command, options),) = entry.items()
    if command not in commands:
        raise UsageError(f"{where}: {command!r} is not a command a workflow can run ({', '.join(sorted(commands))})")
    options = options or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where} ({command}): its options must be a mapping of option names to values")
    names = {str(name).lstrip("-").replace("_", "-"): value for name, value in options.items()}
    reserved = sorted(set(names) & RESERVED)
    if reserved:
        raise UsageError(f"{where} ({command}): --{reserved[0]} is set by the workflow itself; remove it")
    return Step(command, names)


# ---------------------------------------------------------------- inside a step


@dataclass(frozen=True)
class StepContext:
    """The step now running: `chained` when its inputs are the previous step's outputs."""

    chained: bool


_STEP: ContextVar[Optional[StepContext]] = ContextVar("ldmtool_workflow_step", default=None)


@contextmanager
def running_step(context: StepContext) -> Iterator[None]:
    token = _STEP.set(context)
    try:
        yield
    finally:
        _STEP.reset(token)


def seeds_from_inputs(items: Any) -> Any:
    """In a chained step, file items with the seed recorded in their input file (the seed flows through the
    chain); anything else unchanged."""
    context = _STEP.get()
    if context is None or not context.chained or not isinstance(items, list):
        return items
    return [_with_recorded_seed(item) for item in items]


def _with_recorded_seed(item: Any) -> Any:
    from ldmtool.runtime.resume import stored_recipe

    if item.path is None or item.seed is not None:
        return item
    recipe = stored_recipe(item.path) or {}
    seed = recipe.get("seed")
    return replace(item, seed=seed) if isinstance(seed, int) and not isinstance(seed, bool) else item


def recorded_prompt(path: Optional[Path]) -> Optional[tuple[str, str]]:
    """In a chained step, the (prompt, negative) recorded in the input file's recipe, so a step that was given
    no prompt of its own reworks each image towards the prompt it was made from; None outside a chain, for
    an input without a recorded prompt, or for an unreadable one."""
    context = _STEP.get()
    if context is None or not context.chained or path is None:
        return None
    from ldmtool.runtime.resume import stored_recipe

    parameters = (stored_recipe(path) or {}).get("parameters") or {}
    prompt, negative = parameters.get("prompt"), parameters.get("negative")
    if not isinstance(prompt, str):
        return None
    return prompt, negative if isinstance(negative, str) else ""


def upstream_recipe(path: Optional[Path]) -> dict[str, Any]:
    """In a chained step, `{"upstream": <the input file's recipe>}` (which holds its own upstream), else {}."""
    context = _STEP.get()
    if context is None or not context.chained or path is None:
        return {}
    from ldmtool.runtime.resume import stored_recipe

    recipe = stored_recipe(path)
    return {"upstream": recipe} if recipe else {}
