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
`ldmtool replay` calls the command with again). No torch at import.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ldmtool.cli.common import run_options
from ldmtool.cli.options import parameters
from ldmtool.options import ModelChoice, RunChoice, SamplingChoice, is_option_group

INJECTED = ("run", "model", "sampling")


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

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own, opted = _own_parameters(command)
        groups = opted + shared
        signature = own + [p for group in shared for p in group.parameters]

        @functools.wraps(command)
        def wrapper(**options: Any) -> Any:
            cli = dict(options)
            records = {group.argument: group.build(options) for group in groups}
            records["run"] = run_options(records["run"], cli)
            return command(**options, **records)

        wrapper.__signature__ = inspect.Signature(signature)  # what Typer reads
        wrapper.__annotations__ = {p.name: p.annotation for p in signature}
        return wrapper

    return decorate


def _own_parameters(command: Callable[..., Any]) -> tuple[list[inspect.Parameter], list[_Group]]:
    """The command's own parameters with their annotations evaluated (modules use postponed annotations),
    each opt-in group replaced by its options; and those groups. The injected records are left out, so
    their types may be imported for type checking only."""
    own, groups = [], []
    for param in inspect.signature(command).parameters.values():
        if param.name in INJECTED:
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
