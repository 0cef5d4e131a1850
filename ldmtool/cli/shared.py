"""The options every task command shares, declared once (`ldmtool.options`) and attached by one decorator.

    @task_command(model="default-superres")
    def superres(inputs: opt.Inputs, scale: Scale = 4.0, *, text: TextPrompt, images: ImageInputs,
                 run: "RunOptions", model: ModelChoice, sampling: SamplingChoice) -> None:
        ...

`task_command` puts the options of each opt-in group the command names (`text`, `images`) where the group
stands in its signature, and appends the shared groups: run (`RunChoice`) and, for a command with a model,
`ModelChoice` and `SamplingChoice`. Typer reads that signature, so every command shows the same names and
help. When the command runs it gets one record per group instead of thirty arguments: `run` is the
`RunOptions` the runner takes, whose `cli` holds every option by name (the job's identity, and what
`ldmtool replay` calls the command with again). `option_groups` does the same for other commands
(`ldmtool train`). No torch at import.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ldmtool.cli.common import run_options
from ldmtool.cli.options import parameters
from ldmtool.options import ModelChoice, RunChoice, SamplingChoice, is_option_group


@dataclass(frozen=True)
class _Group:
    argument: str  # the command's keyword argument that receives the record
    record: type
    parameters: list[inspect.Parameter]

    def build(self, options: dict[str, Any]) -> Any:
        """The record, taking this group's values out of `options`."""
        return self.record(**{p.name: options.pop(p.name) for p in self.parameters})


def task_command(*, model: Optional[str], seamless: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command function that takes keyword-only `run`, `model` and `sampling` records (and any
    opt-in groups of `ldmtool.options`).

    `model` is the command's default `--model`; None for a command without a model (it gets `run` only).
    `seamless` adds `--seamless` (generators).
    """
    shared = [_Group("run", RunChoice, parameters(RunChoice))]
    if model is not None:
        shared += [_Group("model", ModelChoice, parameters(ModelChoice, defaults={"model": model})),
                   _Group("sampling", SamplingChoice,
                          parameters(SamplingChoice, leave_out=() if seamless else ("seamless",)))]

    def runner_options(records: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
        return {**records, "run": run_options(records["run"], cli)}

    def make(command: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = option_groups(command, appended=shared, finish=runner_options)
        setattr(wrapped, TASK_MARK, True)  # a batch run: its --json output ends with a summary event
        return wrapped

    return make


TASK_MARK = "_ldmtool_task_command"


def option_groups(command: Callable[..., Any], *, appended: Sequence[_Group] = (),
                  finish: Optional[Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = None,
                  ) -> Callable[..., Any]:
    """`command` with each keyword-only parameter that names an option group replaced by that group's
    options, and the `appended` groups' options after its own: the signature Typer reads. The wrapper
    calls `command` with one record per group; `finish(records, options)` may rework the records, given
    every option by name."""
    own, opted = _own_parameters(command, skip={group.argument for group in appended})
    groups = [*opted, *appended]
    signature = own + [p for group in appended for p in group.parameters]

    @functools.wraps(command)
    def wrapper(**options: Any) -> Any:
        given = dict(options)
        records = {group.argument: group.build(options) for group in groups}
        return command(**options, **(finish(records, given) if finish else records))

    wrapper.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]  # read by inspect (Typer)
    wrapper.__annotations__ = {p.name: p.annotation for p in signature}  # Typer reads the hints from here
    return wrapper


def _own_parameters(command: Callable[..., Any], skip: set[str]) -> tuple[list[inspect.Parameter], list[_Group]]:
    """The command's own parameters with their annotations evaluated (modules use postponed annotations),
    each opt-in group replaced by its options; and those groups. The `skip`ped ones (records the caller
    provides) are left out, so their types may be imported for type checking only."""
    own, groups = [], []
    for param in inspect.signature(command).parameters.values():
        if param.name in skip:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, command.__globals__)  # noqa: S307 - our own source's annotations
        if is_option_group(annotation):
            groups.append(_Group(param.name, annotation, parameters(annotation)))
            own += groups[-1].parameters
        else:
            own.append(param.replace(annotation=annotation))
    return own, groups
