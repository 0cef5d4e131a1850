"""`ldmtool replay FILE...`: run an output's recipe again (as A1111 and ComfyUI load a workflow from a PNG).

Each file's recipe names its command, the options it ran with, its item (input and mask files, or the
prompt line) and its seed. Replay calls the same command with those options on that one item with
`--item-seed <seed>`, writes the result beside the file as `NAME.replay.EXT` (or into `-o`), and says
whether the pixels are identical. On the machine that wrote the file they are (README, "Reproducibility").
"""
from __future__ import annotations

import inspect
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Mapping, Optional

import typer

from ldmtool.cli.options import Json, Quiet

if TYPE_CHECKING:
    from ldmtool.runtime.resume import ReplayItem

EXAMPLE = "Example: ldmtool replay out/fox.png -o replayed/ --verify"


def replay(
    files: Annotated[list[Path], typer.Argument(help="Images written by ldmtool.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder (or file, for one image) to "
                                                  "write to; default: beside each file as NAME.replay.EXT.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Exit 1 when a replay's pixels differ from the file's.")] = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run the recipe stored in each image again and compare the pixels."""
    from ldmtool.errors import LdmError

    targets = _targets(files, output)  # a bad -o or a target that clashes is a usage error (exit 2)
    failed = differs = 0
    for path, target in zip(files, targets):
        try:
            replay_file(path, target)
            difference = pixel_difference(path, target)
        except LdmError as err:
            failed += 1
            print(f"ldmtool: error: {err}", file=sys.stderr)
            continue
        differs += difference > 0
        reasons = why_different(_recipe(path), _recipe(target)) if difference else []
        _report(path, target, difference, reasons, json_out=json_out, quiet=quiet)
    raise typer.Exit(1 if failed or (verify and differs) else 0)


def replay_file(path: Path, target: Path) -> None:
    """Re-run the recipe stored in `path`, writing `target`."""
    replay_recipe(path, _recipe(path), target)


def _recipe(path: Path) -> dict[str, Any]:
    from ldmtool.io.metadata import read_metadata

    metadata = read_metadata(path)
    return dict(metadata.recipe) if metadata is not None else {}


def why_different(recorded: Mapping[str, Any], replayed: Mapping[str, Any]) -> list[str]:
    """What differs between the recipe a file was written with and its replay's, in words: why the pixels
    may differ (a model or add-on file changed in place, another ldmtool, another torch build or CPU)."""
    from ldmtool.runtime.identity import difference

    reasons = []
    job = difference(replayed.get("job") or {}, recorded.get("job") or {})
    if job:
        reasons.append(job)
    if recorded.get("version") != replayed.get("version"):
        reasons.append(f"written by ldmtool {recorded.get('version')}, replayed by {replayed.get('version')}")
    then, now = recorded.get("machine"), replayed.get("machine") or {}
    if not isinstance(then, dict):
        reasons.append("the file does not record the machine that wrote it")
    else:
        changed = [f"{name} {then.get(name) or 'none'}, now {now.get(name) or 'none'}"
                   for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]
        if changed:
            reasons.append("written on another machine (" + "; ".join(changed) + ")")
    return reasons or ["nothing the recipes record differs (in bf16 the thread count can move pixels: README, "
                       "Reproducibility)"]


def replay_recipe(path: Path, recipe: dict[str, Any], target: Path) -> None:
    """Re-run `recipe` (read from `path`), writing `target`. An input that is gone but has its own recipe in
    this one (`upstream`: a workflow step's input) is made again from it first, so a whole chain replays."""
    from ldmtool.errors import ItemError
    from ldmtool.io.files import shown
    from ldmtool.runtime.resume import replaying
    from ldmtool.runtime.workflow import StepContext, running_step

    replay = _replay_item(path, recipe, target)
    command = _command(path, recipe.get("command"))
    upstream = recipe.get("upstream")
    sources = [source for source in (replay.item.path, replay.item.mask) if source is not None]
    if replay.item.path is not None and not replay.item.path.is_file() and isinstance(upstream, dict):
        replay.item.path.parent.mkdir(parents=True, exist_ok=True)
        replay_recipe(path, upstream, replay.item.path)
    for source in sources:
        if not source.is_file():
            raise ItemError(f"{path}: its input {shown(source)} is no longer there")
    try:
        arguments = _arguments(command, recipe["cli"], replay.item.data, [str(source) for source in sources])
    except ValueError as err:
        raise ItemError(f"{path}: its ldmtool recipe is damaged ({err})") from None
    if "fmt" in arguments and _grey(path):
        arguments["fmt"] = "keep"  # a grey output was written by --format keep from a grey input
    # A recipe with an upstream was a chained workflow step: replayed as one, a step given no prompt takes
    # its input's recorded prompt again, as it did when the file was written.
    with replaying(replay), running_step(StepContext(chained=isinstance(upstream, dict))):
        try:
            command(**arguments)
        except typer.Exit as done:
            if done.exit_code:
                raise ItemError(f"{path}: the replay failed (see above)") from None


def _replay_item(path: Path, recipe: dict[str, Any], target: Path) -> "ReplayItem":
    """The recipe's item with its seed; an ItemError naming the file when the recipe is missing or damaged
    (a hand-edited or truncated recipe fails that one file, not the whole replay)."""
    from ldmtool.errors import ItemError
    from ldmtool.runtime.resume import ReplayItem

    if isinstance(recipe.get("preview_of"), str):  # a layout2img --draw-boxes preview: drawn, not sampled
        raise ItemError(f"{path}: a box preview of {recipe['preview_of']}, drawn from its layout; replay that image")
    if not recipe.get("item") or "cli" not in recipe:
        raise ItemError(f"{path}: no replayable ldmtool recipe in this image (written by another tool or an "
                        "older ldmtool)")
    seed: Any = recipe.get("seed")
    item = recipe["item"]
    shapes = {"seed": isinstance(seed, int) and not isinstance(seed, bool), "item": isinstance(item, dict),
              "cli": isinstance(recipe["cli"], dict)}
    damaged = [name for name, right in shapes.items() if not right]
    if damaged:
        raise ItemError(f"{path}: its ldmtool recipe is damaged ({', '.join(damaged)}: missing or of the wrong type)")
    try:
        return ReplayItem.from_recipe(item, seed=seed, output=target)
    except (AttributeError, TypeError, ValueError):
        raise ItemError(f"{path}: its ldmtool recipe is damaged (item: a field of the wrong type)") from None


def _grey(path: Path) -> bool:
    from PIL import Image

    from ldmtool.io.source import GREY_MODES

    with Image.open(path) as image:
        return image.mode in GREY_MODES


def pixel_difference(a: Path, b: Path) -> int:
    """The largest difference of any channel between two images (255 when their sizes differ)."""
    import numpy as np
    from PIL import Image

    with Image.open(a) as first, Image.open(b) as second:
        x, y = np.asarray(first.convert("RGBA")), np.asarray(second.convert("RGBA"))
    if x.shape != y.shape:
        return 255
    return int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())


def _targets(files: list[Path], output: Optional[Path]) -> list[Path]:
    """Where each file's replay goes; a UsageError when one would overwrite a file to replay (its own
    source: it would then be checked against itself) or another file's replay."""
    from ldmtool.errors import UsageError

    sources = {path.resolve(): path for path in files}
    written: dict[Path, Path] = {}
    targets = [_target(path, output, len(files)) for path in files]
    for path, target in zip(files, targets):
        where = target.resolve()
        if where in sources:
            raise UsageError(f"{path}: its replay would overwrite {sources[where]}, a file to replay; "
                             "give -o another folder")
        if where in written:
            raise UsageError(f"{path}: its replay would overwrite the replay of {written[where]} ({target}); "
                             "replay them into different folders")
        written[where] = path
    return targets


def _target(path: Path, output: Optional[Path], count: int) -> Path:
    from ldmtool.errors import UsageError
    from ldmtool.io.images import IMAGE_SUFFIXES
    from ldmtool.io.writer import format_for_path

    if output is None:
        return path.with_name(f"{path.stem}.replay{path.suffix}")
    if output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir():  # a file, as the task commands' -o
        format_for_path(output)  # .gif, .bmp: a usage error, not a folder of that name
        if count > 1:
            raise UsageError(f"-o {output} names one file but there are {count} images to replay; give a folder")
        return output
    return output / path.name


def _command(path: Path, name: Any) -> Callable[..., Any]:
    from ldmtool.cli.app import app
    from ldmtool.errors import ItemError

    for command in app.registered_commands:
        if command.name == name and name != "replay" and command.callback is not None:
            return command.callback
    raise ItemError(f"{path}: its recipe names the command {name!r}, which this ldmtool does not have")


def _arguments(command: Callable[..., Any], recorded: dict[str, Any], data: Mapping[str, Any],
               sources: list[str]) -> dict[str, Any]:
    """The command's keyword arguments: its defaults, then the recorded options (typed as the command
    declares them), then inputs that name the item itself. A ValueError names a recorded value that the
    command's option cannot take."""
    parameters = inspect.signature(command).parameters
    hints = typing.get_type_hints(command, include_extras=True)
    arguments = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for name, value in recorded.items():
        if name in parameters:
            arguments[name] = _typed(name, value, hints.get(name))
    if "inputs" in parameters:
        arguments["inputs"] = sources
    spec = data.get("spec")
    if "prompts" in parameters and spec is not None:  # a prompt line's item carries the line itself
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str):
            raise ValueError("item: its prompt line is missing or of the wrong type")
        arguments.update(prompt=spec["prompt"], prompts=None)
    arguments.update(quiet=True, json_out=False)
    return arguments


# What JSON gives back for each type an option has.
_JSON_TYPES: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
                                            Path: (str,), type(None): (type(None),)}


def _typed(name: str, value: Any, hint: Any) -> Any:
    """A recorded option's value as the command takes it (paths come back from JSON as strings); a
    ValueError when it cannot be that option's value."""
    if hint is None:
        return value
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    kinds = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)  # Optional[X]: X, None
    if not any(_fits(value, kind) for kind in kinds):
        raise ValueError(f"option {name}: {value!r} is of the wrong type")
    if Path in kinds and isinstance(value, str):
        return Path(value)
    return value


def _fits(value: Any, kind: Any) -> bool:
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        return isinstance(value, list) and all(_fits(one, element) for one in value)
    if kind not in _JSON_TYPES:
        return True  # a type replay does not know: the command checks it
    takes = _JSON_TYPES[kind]
    return isinstance(value, takes) and (bool in takes or not isinstance(value, bool))


def _report(path: Path, target: Path, difference: int, reasons: list[str], *, json_out: bool, quiet: bool) -> None:
    if json_out:
        print(json.dumps({"event": "replayed", "file": str(path), "output": str(target), "identical": difference == 0,
                          "max_difference": difference, "reasons": reasons}), flush=True)
    elif not quiet:
        verdict = ("identical pixels" if difference == 0 else
                   f"pixels differ by up to {difference}/255: {'; '.join(reasons)}")
        print(f"{path} -> {target}: {verdict}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("replay", help=f"{replay.__doc__}\n\n{EXAMPLE}")(replay)
