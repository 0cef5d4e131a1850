"""How many prompts `--combinatorial` makes of a template, counted from its parse tree without expanding it:
a sequence multiplies its parts, a variant `{a|b}` adds its options (`{2$$a|b|c}`: every ordered choice of
2), a `__name__` wildcard adds its file's lines (each line counted as a template), and a random `{~...}` or
cyclical `{@...}` part counts 1. The count is an upper bound: the library drops repeated texts as it goes.
"""
from __future__ import annotations

from math import factorial
from typing import Any, Callable, Optional

from ldmtool.errors import UsageError

_Env = dict[str, Any]  # variable name -> its command (or, for an immediate `!` assignment, None: one value)


class CombinationCounter:
    """Counts combinations against one wildcard manager (`PromptTemplates.manager`)."""

    def __init__(self, manager: Any, check_files: Optional[Callable[[str], None]] = None):
        self.manager = manager
        self.check_files = check_files  # called with a wildcard's name before its files are read
        self._visiting: set[str] = set()

    def count(self, template: str, env: Optional[_Env] = None) -> int:
        from dynamicprompts.parser.parse import parse

        return self._command(parse(template), env or {})

    def _command(self, command: Any, env: _Env) -> int:
        from dynamicprompts.commands import SequenceCommand, VariantCommand, WildcardCommand, WrapCommand
        from dynamicprompts.commands.variable_commands import VariableAccessCommand, VariableAssignmentCommand

        if _non_finite(command) or isinstance(command, VariableAssignmentCommand):
            return 1  # one value per prompt; an assignment writes no text itself
        if isinstance(command, SequenceCommand):
            return self._sequence(command.tokens, env)
        if isinstance(command, VariantCommand):
            return self._variant(command, env)
        if isinstance(command, WildcardCommand):
            return self._variant_of(self._wildcard_counts(command, env), 1, 1)
        if isinstance(command, WrapCommand):
            return self._command(command.wrapper, env) * self._command(command.inner, env)
        if isinstance(command, VariableAccessCommand):
            return self._variable(command, env)
        return 1  # a literal

    def _sequence(self, tokens: list[Any], env: _Env) -> int:
        from dynamicprompts.commands.variable_commands import VariableAssignmentCommand

        env = dict(env)
        for token in tokens:  # the library reads a sequence's assignments before its other parts
            if isinstance(token, VariableAssignmentCommand) and (token.overwrite or token.name not in env):
                env[token.name] = None if token.immediate else token.value
        total = 1
        for token in tokens:
            total *= self._command(token, env)
        return total

    def _variant(self, command: Any, env: _Env) -> int:
        from dynamicprompts.commands import WildcardCommand

        values = command.values
        if len(values) == 1 and isinstance(values[0], WildcardCommand):  # `{2$$__name__}`: its lines as options
            counts = self._wildcard_counts(values[0], env)
        else:
            counts = [self._command(value, env) for value in values]
        return self._variant_of(counts, command.min_bound, command.max_bound)

    @staticmethod
    def _variant_of(counts: list[int], low: int, high: int) -> int:
        """Choices of `low`..`high` distinct options in order: k! times the k-th elementary symmetric sum."""
        high = min(high, len(counts))
        sums = [1] + [0] * high  # sums[k]: over every k options, the product of their counts
        for count in counts:
            for k in range(high, 0, -1):
                sums[k] += sums[k - 1] * count
        return sum(factorial(k) * sums[k] for k in range(min(low, high), high + 1))

    def _wildcard_counts(self, command: Any, env: _Env) -> list[int]:
        """The count of each line of a wildcard's file, a line repeated as often as its weight says."""
        name = self._wildcard_name(command)
        if name in self._visiting:
            raise UsageError(f"wildcard __{name}__ names itself: its combinations never end")
        env = {**env, **command.variables}
        self._visiting.add(name)
        if self.check_files is not None:
            self.check_files(name)
        try:
            lines = self.manager.get_values(name).iterate_string_values_weighted()
            return [self._line(str(line), env) for line in lines]
        finally:
            self._visiting.discard(name)

    def _line(self, text: str, env: _Env) -> int:
        from ldmtool.pipelines.prompt_templates import is_template

        return self.count(text, env) if is_template(text) else 1  # parsing a plain line is slow and gives 1

    def _wildcard_name(self, command: Any) -> str:
        """The wildcard's name; one written as a template (`__{a|b}__`) is read as its first expansion, as
        the library does."""
        if isinstance(command.wildcard, str):
            return command.wildcard
        from dynamicprompts.enums import SamplingMethod
        from dynamicprompts.sampling_context import SamplingContext

        context = SamplingContext(wildcard_manager=self.manager, default_sampling_method=SamplingMethod.COMBINATORIAL)
        return str(next(iter(context.sample_prompts(command.wildcard, 1))))

    def _variable(self, command: Any, env: _Env) -> int:
        value: Optional[Any] = env.get(command.name, command.default)
        return 1 if value is None else self._command(value, env)


def _non_finite(command: Any) -> bool:
    method = getattr(command, "sampling_method", None)
    return method is not None and method.is_nonfinite()
